"""The core: filing batches through the real CLI on both backends."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import FAST_LIMIT, SEED, UNMEASURED, Cli


def test_help_imports_no_database_driver_and_no_dbos() -> None:
    code = (
        "import sys\n"
        "from accessctl.cli import app\n"
        "for argv in (['--help'], ['submit', '--help']):\n"
        "    try:\n"
        "        app(argv, prog_name='accessctl')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('dbos', 'sqlalchemy', 'psycopg', 'sqlite3', 'alembic')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **UNMEASURED},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "HEAVY []" in done.stderr
    assert "Exit codes:" in done.stdout


def test_help_lists_every_exit_code() -> None:
    done = Cli("sqlite:///unused.sqlite").run("--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for code in (
        "0 all requests recorded",
        "1 some requests failed",
        "2 usage error",
        "3 configuration",
        "4 schema not migrated",
        "130/143",
    ):
        assert code in text


SUMMARY_FIELDS = ("batch_id", "key", "total", "recorded", "failed", "state")


def summary_fields(table: str) -> dict[str, str]:
    """A rendered summary's field -> value rows, whatever the table's borders."""
    rows = (re.findall(r"[^\s│┃]+", line) for line in table.splitlines())
    return {r[0]: r[1] for r in rows if len(r) == 2 and r[0] in SUMMARY_FIELDS}


def test_submit_on_fresh_embedded_default_records_seed_failures(isolated_environment: Path) -> None:
    # No database URL at all: the embedded default under $XDG_DATA_HOME, created on first use.
    tool = Cli("")
    env = {"ACCESSCTL_DATABASE_URL": ""}
    result = tool("submit", **env)
    assert result.exit_code == 1, result.output + result.stderr
    # The summary table's values, not its field names (which are always there).
    assert summary_fields(result.stdout) == {
        "batch_id": summary_fields(result.stdout)["batch_id"],
        "key": "-",
        "total": "4",
        "recorded": "0",
        "failed": "4",
        "state": "done",
    }
    assert (isolated_environment / "data" / "accessctl" / "accessctl.sqlite").is_file()
    assert not list(Path.cwd().glob("*.sqlite"))

    errors = json.loads(tool("errors", "--json", **env).stdout)
    assert sorted(e["message"]["user_id"] for e in errors) == SEED
    assert {e["message"]["error_class"] for e in errors} == {"UnknownUser"}
    batch_ids = {e["message"]["batch_id"] for e in errors}
    assert len(batch_ids) == 1


def test_batch_of_known_users_records_every_request(cli: Cli) -> None:
    users = cli.add_users(4)
    args = [a for u in users for a in ("--user", u)]
    summary = cli.json("batch", "40", *args, "--json")
    assert summary["total"] == 40 and summary["recorded"] == 40 and summary["failed"] == 0
    assert cli.scalar("SELECT count(*) FROM accesses") == 40
    assert cli.scalar("SELECT count(DISTINCT request_id) FROM accesses") == 40
    assert cli.scalar("SELECT count(*) FROM errors") == 0
    statuses = cli.rows("SELECT DISTINCT status FROM accesses")
    assert [s[0] for s in statuses] == ["requested"]


def test_unknown_users_each_get_exactly_one_error_row(cli: Cli) -> None:
    known = cli.add_users(1)[0]
    unknown = "11111111-2222-3333-4444-555555555555"
    result = cli("batch", "10", "--user", known, "--user", unknown, "--json")
    assert result.exit_code == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["recorded"], summary["failed"]) == (5, 5)
    errors = cli.json("errors", "--json", "--batch", summary["batch_id"])
    assert len(errors) == 5
    assert {e["message"]["user_id"] for e in errors} == {unknown}
    assert len({e["message"]["workflow_id"] for e in errors}) == 5
    for e in errors:
        assert set(e["message"]) >= {
            "batch_id",
            "workflow_id",
            "user_id",
            "error_class",
            "detail",
            "sqlstate",
        }
    assert cli.scalar("SELECT count(*) FROM accesses") == 5


def test_postgres_unmigrated_schema_exits_4_and_writes_nothing(
    fresh_cli: Cli, backend: str
) -> None:
    if backend != "postgres":
        pytest.skip("the embedded SQLite database creates its schema by itself")
    result = fresh_cli("submit")
    assert result.exit_code == 4
    assert "accessctl migrate" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    tables = fresh_cli.rows(
        "SELECT table_name FROM information_schema.tables WHERE table_schema IN ('public', 'dbos')"
    )
    assert tables == []


def test_outdated_schema_exits_4(cli: Cli) -> None:
    engine = cli.engine()
    with engine.begin() as conn:
        import sqlalchemy as sa

        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0001'"))
    engine.dispose()
    for command in (["errors"], ["submit"], ["status"]):
        result = cli(*command)
        assert result.exit_code == 4, command
        assert "accessctl migrate" in result.stderr


def test_migrate_is_idempotent(cli: Cli) -> None:
    for _ in range(2):
        result = cli("migrate", "--json")
        assert result.exit_code == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["revision"] == "0003"
        # The fixture's migrate stored the shared limit; migrating again keeps it.
        assert answer["shared_limit"]["rate_limit"] == FAST_LIMIT
        assert answer["shared_limit"]["reason"] == "migrate"
    assert cli.scalar("SELECT count(*) FROM alembic_version") == 1
    assert cli.scalar("SELECT count(*) FROM limit_changes") == 1


def test_malformed_ids_are_refused_before_anything_is_filed(cli: Cli) -> None:
    result = cli("submit", SEED[0], "not-a-uuid", SEED[1], "12345")
    assert result.exit_code == 2
    assert "2 malformed" in result.stderr and "argument 2" in result.stderr
    assert "argument 4" in result.stderr
    assert cli.scalar("SELECT count(*) FROM batches") == 0
    assert cli.scalar(f"SELECT count(*) FROM {cli.workflow_table}") == 0


def test_ids_from_file_and_stdin(cli: Cli, tmp_path: Path) -> None:
    users = cli.add_users(3)
    path = tmp_path / "ids.txt"
    path.write_text(f"# nightly\n{users[0]}\n\n{users[1]}\n")
    summary = cli.json("submit", "--file", str(path), "--json")
    assert (summary["total"], summary["recorded"]) == (2, 2)
    result = cli("submit", "-", "--json", input=f"{users[2]}\n")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["recorded"] == 1


def test_status_reports_a_finished_batch(cli: Cli) -> None:
    users = cli.add_users(2)
    summary = cli.json("submit", *users, "--json")
    status = cli.json("status", summary["batch_id"], "--json")
    assert status["state"] == "done"
    assert (status["total"], status["recorded"], status["failed"]) == (2, 2, 0)
    assert cli.json("status", "--json")["batch_id"] == summary["batch_id"]


def test_errors_filters_and_limit(cli: Cli) -> None:
    first = cli.json("submit", SEED[0], SEED[1], "--json")
    second = cli.json("submit", SEED[2], "--json")
    newest = cli.json("errors", "--json", "--limit", "1")
    assert len(newest) == 1 and newest[0]["message"]["batch_id"] == second["batch_id"]
    only_first = cli.json("errors", "--json", "--batch", first["batch_id"])
    assert {e["message"]["user_id"] for e in only_first} == {SEED[0], SEED[1]}
    assert len(cli.json("errors", "--json", "--since", "1h")) == 3
    assert cli.json("errors", "--json", "--since", "2999-01-01") == []
    created = [e["created_at"] for e in cli.json("errors", "--json")]
    assert created == sorted(created, reverse=True)
    table = cli("errors")
    assert table.exit_code == 0 and "UnknownUser" in table.stdout


def test_users_add_import_list(cli: Cli) -> None:
    added = cli.json(
        "users", "add", "--name", "Ada Lovelace", "--email", "ada@example.com", "--json"
    )
    duplicate = cli("users", "add", "--name", "Ada", "--email", "ADA@example.com")
    assert duplicate.exit_code == 2
    listing = cli.json("users", "list", "--json")
    assert [u["id"] for u in listing] == [added["id"]]
    jsonl = (
        '{"name": "Bob", "email": "bob@example.com"}\n{"name": "Ada", "email": "ada@example.com"}\n'
    )
    result = cli("users", "import", "-", "--json", input=jsonl)
    assert json.loads(result.stdout) == {"added": 1, "skipped": 1}
    bad = cli("users", "import", "-", input="name,email\nX,not-an-email\nY,y@example.com\n")
    assert bad.exit_code == 2 and "line 2" in bad.stderr
    assert len(cli.json("users", "list", "--json")) == 2


def test_config_shows_sources_and_hides_password(isolated_environment: Path) -> None:
    tool = Cli("postgresql+psycopg://app:s3cret-pw@db.example:5432/access")
    result = tool("config", "--json", ACCESSCTL_RATE_LIMIT="7/3")
    assert result.exit_code == 0, result.stderr
    view = json.loads(result.stdout)
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert view["database_url"] == "postgresql+psycopg://app:***@db.example:5432/access"
    assert view["rate_limit"] == "7/3"
    assert view["sources"]["rate_limit"] == "ACCESSCTL_RATE_LIMIT"
    assert view["worker_concurrency"] is None and view["metrics_file"] is None
    # The table says "none" for what is unset, and lists a list's items.
    users = [str(uuid.UUID(int=7)), str(uuid.UUID(int=8))]
    table = tool("config", ACCESSCTL_DEFAULT_USERS=",".join(users), COLUMNS="80")
    assert table.exit_code == 0, table.stderr
    lines = [line for line in table.stdout.splitlines()[3:] if line[:1].isalpha()]
    rows = {line.split()[0]: line.split(None, 1)[1].rstrip() for line in lines}
    assert rows["worker_concurrency"] == "none  (default)"
    assert rows["metrics_file"] == "none  (default)"
    assert " ".join(table.stdout.split()).count(f"{users[0]}, {users[1]}") == 1
    assert "None" not in table.stdout and "[" not in table.stdout


def test_installed_command_in_a_subprocess(cli: Cli) -> None:
    users = cli.add_users(2)
    done = cli.run("batch", "6", "--user", users[0], "--user", users[1], "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["recorded"] == 6
    # stderr is JSON log lines, each carrying the batch ID when it is about the batch.
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    finished = [line for line in lines if line.get("event") == "batch finished"]
    assert finished and finished[0]["batch_id"] == json.loads(done.stdout)["batch_id"]


def test_detach_then_worker_burst_finishes_the_batch(cli: Cli) -> None:
    users = cli.add_users(2)
    detached = cli("submit", *users, "--detach")
    assert detached.exit_code == 0, detached.stderr
    batch_id = detached.stdout.strip()
    assert cli.scalar("SELECT count(*) FROM accesses") == 0
    worker = cli.run("worker", "--burst", timeout=60)
    assert worker.returncode == 0, worker.stderr
    status = cli.json("status", batch_id, "--json")
    assert (status["state"], status["recorded"]) == ("done", 2)


def test_migrate_works_from_an_installed_wheel(tmp_path: Path) -> None:
    """The wheel carries the Alembic scripts: `migrate` needs no source checkout."""
    import zipfile

    root = Path(__file__).resolve().parents[1]
    built = subprocess.run(
        ["uv", "build", "--wheel", "--out-dir", str(tmp_path / "dist"), str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("accessctl-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "accessctl" / "migrations" / "env.py").is_file()
    code = "import sys; from accessctl.cli import main; sys.argv = ['accessctl', 'migrate', '--json']; main()"
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "ACCESSCTL_DATABASE_URL": f"sqlite:///{tmp_path / 'wheel.sqlite'}",
    }
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["revision"] == "0003"
    probe = subprocess.run(
        [sys.executable, "-c", "import accessctl.schema as s; print(s.migrations_dir())"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip().startswith(str(site))
