"""What an operator reads, copies and parses: ID prefixes as arguments, one-line usage
errors, JSON errors on stdout, global options anywhere, readable help."""

from __future__ import annotations

import json
import uuid

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from accessctl.cli import app
from accessctl.clicore import AccessctlGroup
from conftest import SEED, Cli


def only_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("accessctl: error: "), stderr
    return lines[0]


def failing_batch(cli: Cli) -> str:
    result = cli("submit", *SEED, "--json")
    assert result.exit_code == 1, result.stderr
    return str(json.loads(result.stdout)["batch_id"])


def test_a_unique_prefix_names_a_batch_everywhere(cli: Cli) -> None:
    batch_id = failing_batch(cli)
    prefix = batch_id[:8]
    assert cli.json("status", prefix, "--json")["batch_id"] == batch_id
    assert cli.json("status", batch_id[:13], "--json")["batch_id"] == batch_id  # with a dash
    assert cli.json("status", prefix.upper(), "--json")["batch_id"] == batch_id
    assert len(cli.json("errors", "--batch", prefix, "--json")) == 4
    dry = cli.json("retry", prefix, "--dry-run", "--json")
    assert sorted(r["user_id"] for r in dry) == SEED
    assert all(r["detail"].startswith("no user with id") for r in dry)
    cancelled = cli("cancel", prefix, "--json")
    assert cancelled.exit_code == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["batch_id"] == batch_id


def test_a_prefix_that_is_short_unknown_or_ambiguous_is_one_clear_line(cli: Cli) -> None:
    batch_id = failing_batch(cli)
    short = cli("status", batch_id[:3])
    assert short.exit_code == 2
    assert "at least 4 hex digits" in only_error_line(short.stderr)
    unknown_prefix = "0000" if not batch_id.startswith("0000") else "ffff"
    unknown = cli("status", unknown_prefix)
    assert unknown.exit_code == 2
    assert f"'{unknown_prefix}' matches no known ID" in only_error_line(unknown.stderr)
    # Two batches whose IDs share a prefix: the prefix names neither.
    engine = cli.engine()
    try:
        import sqlalchemy as sa

        from accessctl.models import Batch, utcnow

        twins = [uuid.UUID("abcd0000-0000-4000-8000-00000000000" + d) for d in "12"]
        with engine.begin() as conn:
            for twin in twins:
                conn.execute(sa.insert(Batch).values(id=twin, total=0, created_at=utcnow()))
    finally:
        engine.dispose()
    ambiguous = cli("status", "abcd", "--json")
    assert ambiguous.exit_code == 2
    line = only_error_line(ambiguous.stderr)
    assert "ambiguous" in line and str(twins[0]) in line and str(twins[1]) in line
    assert json.loads(ambiguous.stdout) == {
        "error": line.removeprefix("accessctl: error: "),
        "exit_code": 2,
    }
    assert cli.json("status", "abcd0000-0000-4000-8000-000000000002", "--json")["total"] == 0
    assert cli("status", "not-hex!").exit_code == 2


def test_access_prefixes_and_a_repeated_id_count_once(cli: Cli) -> None:
    users = cli.add_users(2)
    cli.json("submit", *users, "--json")
    accesses = cli.json("accesses", "list", "--json")
    first = accesses[0]["id"]
    result = cli("accesses", "approve", first[:10], first)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == "1 access(es) now approved"
    by_user = cli.json("accesses", "list", "--user", users[0][:12], "--json")
    assert [a["user_id"] for a in by_user] == [users[0]]


def test_retry_and_its_dry_run_agree_on_a_batch_of_refused_lines(cli: Cli) -> None:
    result = cli("submit", "not-a-uuid", "also-bad", "--skip-invalid", "--json")
    assert result.exit_code == 1, result.stderr
    batch_id = json.loads(result.stdout)["batch_id"]
    for extra in ([], ["--dry-run"], ["--dry-run", "--json"]):
        retried = cli("retry", batch_id, *extra)
        assert retried.exit_code == 2, (extra, retried.stdout, retried.stderr)
        assert "refused input lines" in only_error_line(retried.stderr)
    assert cli.scalar("SELECT count(*) FROM batches") == 1


def test_errors_table_shows_the_refused_input(cli: Cli) -> None:
    cli("submit", "not-a-uuid", "--skip-invalid")
    table = cli("errors").stdout  # 80 columns, as in cron mail
    assert "'not-a-uuid'" in table
    wide = cli("errors", "-o", "wide").stdout
    assert "input 'not-a-uuid' (line 1)" in wide


def test_users_add_says_which_is_taken(cli: Cli) -> None:
    first = cli("users", "add", "--name", "Ada", "--email", "ada@example.com", "--id", SEED[0])
    assert first.exit_code == 0, first.stderr
    same_email = cli("users", "add", "--name", "B", "--email", "ADA@example.com")
    assert f"email 'ada@example.com' already belongs to user {SEED[0]}" in only_error_line(
        same_email.stderr
    )
    assert "id" not in only_error_line(same_email.stderr).split("user", 1)[0]
    same_id = cli("users", "add", "--name", "C", "--email", "c@example.com", "--id", SEED[0])
    line = only_error_line(same_id.stderr)
    assert f"id {SEED[0]} is already taken" in line and "email" not in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["errors", "--limit", "0", "--json"], "--limit"),
        (["batches", "--bogus", "-o", "json"], "No such option: --bogus"),
        (["status", "--json", "--database-url", "mysql://x/y"], "database"),
        (["batch", "--json"], "Missing argument 'N'"),
    ],
)
def test_a_failing_json_command_prints_a_json_error(args: list[str], needle: str) -> None:
    result = CliRunner().invoke(app, args, env={"ACCESSCTL_LOG_FORMAT": "json"})
    assert result.exit_code in (2, 3), result.stderr
    line = only_error_line(result.stderr)
    assert needle in line
    document = json.loads(result.stdout)
    assert document == {
        "error": line.removeprefix("accessctl: error: "),
        "exit_code": result.exit_code,
    }


def test_without_json_a_failure_prints_nothing_on_stdout() -> None:
    result = CliRunner().invoke(app, ["errors", "--limit", "0"])
    assert result.exit_code == 2 and result.stdout == ""


def test_global_options_work_after_the_command(cli: Cli) -> None:
    failing_batch(cli)
    before = cli("--log-format", "json", "--no-color", "batches", "--limit", "1")
    after = cli("batches", "--limit", "1", "--no-color", "--log-format", "json")
    assert after.exit_code == 0, after.stderr
    assert after.stdout == before.stdout
    moved = AccessctlGroup.hoist_global_options
    group = get_command(app)
    assert isinstance(group, AccessctlGroup)
    assert moved(group, ["batches", "--no-color", "-o", "ids", "--database-url=sqlite:///x"]) == [
        "--no-color",
        "--database-url=sqlite:///x",
        "batches",
        "-o",
        "ids",
    ]
    assert moved(group, ["errors", "--since", "2h", "-v", "--config", "c.yaml"]) == [
        "-v",
        "--config",
        "c.yaml",
        "errors",
        "--since",
        "2h",
    ]
    # `limit set` has its own --concurrency: it stays the command's.
    assert moved(group, ["limit", "set", "--concurrency", "5", "--rate-limit", "50/30"]) == [
        "--rate-limit",
        "50/30",
        "limit",
        "set",
        "--concurrency",
        "5",
    ]
    # A value that looks like an option stays a value; `--` ends the options.
    assert moved(group, ["submit", "--key", "--no-color"]) == ["submit", "--key", "--no-color"]
    assert moved(group, ["submit", "--", "-v"]) == ["submit", "--", "-v"]


def test_the_readmes_json_examples_have_the_keys_the_commands_print(cli: Cli) -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("`status --json`:", 1)[1]
    example = json.loads(section.split("```json\n", 1)[1].split("```", 1)[0])
    failing_batch(cli)
    status = cli.json("status", "--json")
    assert list(status) == list(example)


def test_batch_names_its_own_options_in_a_malformed_id_error() -> None:
    result = CliRunner().invoke(app, ["batch", "3", "-u", "bad"])
    line = only_error_line(result.stderr)
    assert result.exit_code == 2
    assert "--user 1: 'bad' is not a UUID" in line
    assert "use --skip-invalid" not in line and "submit --skip-invalid" in line
