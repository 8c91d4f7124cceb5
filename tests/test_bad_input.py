"""Every bad input gets one clear line on stderr, a documented exit code, and nothing filed.

Issue 4, items 1 (arguments), 2 (configuration and database), 4 (hostile text),
5 (concurrent migrate) and 6 (exit codes 0-3; 4 is tests/test_core.py's, 130/143 are
tests/test_faults.py's). Secrets (item 3) are tests/test_secrets.py's; the property-based
test is tests/test_properties.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import Result

from accessctl.exceptions import ExitCode
from accessctl.schema import SCHEMA_HEAD, head_revision
from conftest import POSTGRES_URL, SEED, Cli, start_accessctl
from pgfakes import BlackHole

needs_postgres = pytest.mark.skipif(not POSTGRES_URL, reason="ACCESSCTL_TEST_POSTGRES_URL not set")

# A string that must never appear in any output: it is only ever a password.
SECRET = f"s3cret{uuid.uuid4().hex[:12]}"


def error_lines(stderr: str) -> list[str]:
    """stderr without the JSON log lines: what an operator reads as the error."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


def assert_one_line_error(result: Result, code: int, *needles: str) -> str:
    """Exit ``code``, exactly one ``accessctl: error:`` line naming every needle, no traceback."""
    context = f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.exit_code == code, context
    assert "Traceback" not in result.stdout + result.stderr, context
    lines = error_lines(result.stderr)
    assert len(lines) == 1, context
    assert lines[0].startswith("accessctl: error: "), context
    assert "internal error" not in lines[0], context  # a bug caught by the last resort
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def assert_usage_error(result: Result, *needles: str) -> None:
    """click's own usage errors look like ours: exit 2, one ``accessctl: error:`` line
    naming the command's help, no usage block, no traceback."""
    line = assert_one_line_error(result, 2, *needles)
    assert "Usage:" not in result.stderr, result.stderr
    assert "--help'" in line, line


def assert_nothing_filed(cli: Cli) -> None:
    for table in ("batches", "accesses", "errors", cli.workflow_table):
        assert cli.scalar(f"SELECT count(*) FROM {table}") == 0, table


# --- 1. arguments ---------------------------------------------------------------------------

BAD_COUNTS = ["0", "-1", "abc", "1e3", "11", "", " ", "1.5", "+3", "0x10", "٣", "10" + "0" * 30]


def test_batch_count_out_of_bounds_names_the_bounds(cli: Cli) -> None:
    for count in BAD_COUNTS:
        result = cli("batch", count, ACCESSCTL_MAX_BATCH="10")
        assert_one_line_error(result, 2, "N must be", "from 1 to 10")
    # A negative count looks like an option to click: it still names the bounds, wherever
    # it stands, and `--` works as usual.
    for args in (["-1"], ["--", "-1"], ["-1", "--json"], ["--json", "-7"], ["-1e3"], ["-2.5"]):
        result = cli("batch", *args, ACCESSCTL_MAX_BATCH="10")
        assert_one_line_error(result, 2, "from 1 to 10", args[-1] if args[-1] != "--json" else "-1")
    # The default maximum is named too.
    assert_one_line_error(cli("batch", "1000001"), 2, "from 1 to 1000000", "ACCESSCTL_MAX_BATCH")
    # An option's value that looks negative is the option's, not N.
    result = cli("batch", "--key", "-1", "0")
    assert_one_line_error(result, 2, "from 1 to")
    assert_nothing_filed(cli)


def test_negative_count_in_a_real_shell_is_exit_2_naming_the_bounds(tmp_path: Path) -> None:
    tool = Cli(f"sqlite:///{tmp_path / 'unused.sqlite'}")
    for args in (["batch", "-1"], ["batch", "--", "-1"]):
        done = tool.run(*args, ACCESSCTL_MAX_BATCH="500", timeout=60)
        assert done.returncode == 2, done.stderr
        assert error_lines(done.stderr) == [
            "accessctl: error: N must be from 1 to 500 (ACCESSCTL_MAX_BATCH), got -1"
        ]
    assert not (tmp_path / "unused.sqlite").exists()


def test_submit_over_the_maximum_batch_is_refused(cli: Cli) -> None:
    result = cli("submit", *SEED[:3], ACCESSCTL_MAX_BATCH="2")
    assert_one_line_error(result, 2, "3 requests exceed the maximum batch of 2")
    assert_nothing_filed(cli)


def test_malformed_ids_from_args_file_and_stdin_are_reported_at_once(
    cli: Cli, tmp_path: Path
) -> None:
    path = tmp_path / "ids.txt"
    path.write_text(f"# nightly\n{SEED[0]}\nnot-a-uuid\n\n{SEED[1]}x\n")
    stdin = f"{SEED[3]}\n'; DROP TABLE batches; --\n"
    result = cli("submit", SEED[2], "bogus", "-", "--file", str(path), input=stdin)
    line = assert_one_line_error(
        result,
        2,
        "4 malformed user ID(s), nothing filed",
        "argument 2: 'bogus' is not a UUID",
        'stdin line 2: "\'; DROP TABLE batches; --" is not a UUID',
        "line 3: 'not-a-uuid' is not a UUID",
        "line 5: ",
        "--skip-invalid",
    )
    assert line.index("argument 2") < line.index("stdin line 2") < line.index("line 3:")
    # batch --user / --file are checked the same way.
    result = cli("batch", "3", "--user", SEED[0], "--user", "nope", "--file", str(path))
    assert_one_line_error(result, 2, "3 malformed", "--user 2: 'nope'", "line 3:", "line 5:")
    assert_nothing_filed(cli)


def test_many_malformed_ids_are_counted_and_the_first_ten_named(cli: Cli) -> None:
    stdin = "".join(f"bad-{i}\n" for i in range(1, 26))
    line = assert_one_line_error(cli("submit", "-", input=stdin), 2, "25 malformed", "and 15 more")
    assert "stdin line 10: 'bad-10'" in line and "bad-11" not in line
    assert_nothing_filed(cli)


def test_skip_invalid_files_the_valid_ids_and_records_each_invalid_one(cli: Cli) -> None:
    users = cli.add_users(2)
    stdin = (
        f"{users[0]}\nnot-a-uuid\nbad\x00id\n\n{users[1]}\n'; DROP TABLE errors; --\nZoë-日本-🚀\n"
    )
    result = cli("submit", "--skip-invalid", "-", "--json", input=stdin)
    assert result.exit_code == 1, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert (summary["total"], summary["recorded"], summary["failed"]) == (6, 2, 4)
    errors = cli.json("errors", "--json", "--batch", summary["batch_id"])
    recorded = sorted((e["message"]["line"], e["message"]["input"]) for e in errors)
    # NUL cannot go into JSONB: it is stored escaped, never raw.
    assert recorded == [
        (2, "not-a-uuid"),
        (3, "bad\\0id"),
        (6, "'; DROP TABLE errors; --"),
        (7, "Zoë-日本-🚀"),
    ]
    assert {e["message"]["error_class"] for e in errors} == {"InvalidUserId"}
    assert {e["message"]["batch_id"] for e in errors} == {summary["batch_id"]}
    assert cli.scalar("SELECT count(*) FROM accesses") == 2
    assert cli.scalar("SELECT count(*) FROM errors") == 4
    assert cli.scalar("SELECT count(*) FROM batches") == 1


def test_skip_invalid_records_invalid_ids_from_two_sources_at_the_same_line(
    cli: Cli, tmp_path: Path
) -> None:
    path = tmp_path / "ids.txt"
    path.write_text("from-the-file\n")
    result = cli("submit", "--skip-invalid", "from-the-args", "--file", str(path), "--json")
    assert result.exit_code == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["failed"] == 2
    assert cli.scalar("SELECT count(*) FROM errors") == 2


def test_empty_input_is_a_usage_error(cli: Cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    comments = tmp_path / "comments.txt"
    comments.write_text("# nothing today\n\n   \n")
    for args, stdin in (
        (["submit", "--file", str(empty)], None),
        (["submit", "--file", str(comments)], None),
        (["submit", "-"], ""),
        (["submit", "-"], "\n \n# only a comment\n"),
        (["submit", "--skip-invalid", "-"], ""),
        (["batch", "3", "--file", str(empty)], None),
    ):
        assert_one_line_error(cli(*args, input=stdin), 2, "no user IDs")
    for args, stdin in ((["users", "import", "-"], ""), (["users", "import", str(empty)], None)):
        assert_one_line_error(cli(*args, input=stdin), 2, "user file")
    assert_nothing_filed(cli)
    assert cli.scalar("SELECT count(*) FROM users") == 0


def test_unreadable_files_are_usage_errors(cli: Cli, tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9\n")
    for path, needle in (
        (tmp_path / "missing.txt", "no such file"),
        (tmp_path, "is a directory"),
        (latin1, "is not UTF-8 text"),
    ):
        assert_one_line_error(cli("submit", "--file", str(path)), 2, needle)
        assert_one_line_error(cli("users", "import", str(path)), 2, needle)
    assert_nothing_filed(cli)


def test_unknown_options_and_missing_arguments_are_one_line_usage_errors(cli: Cli) -> None:
    for args, needle in (
        (["submit", "--bogus"], "No such option: --bogus"),
        (["batch", "3", "--bogus"], "No such option: --bogus"),
        (["batch", "-x"], "No such option: -x"),
        (["errors", "--nope"], "No such option: --nope"),
        (["--nope", "errors"], "No such option: --nope"),
        (["users", "add", "--name", "x", "--email", "x@example.com", "--bogus"], "--bogus"),
        (["status", "--all"], "No such option: --all"),
        (["no-such-command"], "No such command"),
        (["batch"], "Missing argument"),
        (["users", "add"], "Missing option"),
        (["errors", "--limit", "0"], "--limit"),
        (["errors", "--limit", "1; DROP TABLE errors"], "--limit"),
        (["--concurrency", "abc", "batches"], "--concurrency"),
        (["prune"], "--older-than"),
        (["users", "add"], "users add: Missing option"),
    ):
        assert_usage_error(cli(*args), needle)
    assert_nothing_filed(cli)


def test_bad_filters_are_usage_errors(cli: Cli) -> None:
    for args, needle in (
        (["errors", "--since", "yesterday"], "--since 'yesterday' is not a duration"),
        (["errors", "--since", "1' OR '1'='1"], "is not a duration"),
        (["errors", "--since", "99999999999d"], "reaches back too far"),
        (["errors", "--since", "9" * 40 + "s"], "is not a duration"),
        (["errors", "--batch", "'; DROP TABLE errors; --"], "--batch"),
        (["errors", "--batch", "a\x00b"], "is not a UUID"),
        (["status", "x' OR 1=1 --"], "batch ID"),
        (["status", str(uuid.uuid4())], "no batch with ID"),
    ):
        assert_one_line_error(cli(*args), 2, needle)
    # A huge --limit is simply "all of them", on both drivers.
    for args in (
        ["errors", "--limit", "9" * 25, "--json"],
        ["users", "list", "--limit", "9" * 25],
        ["batches", "--limit", "9" * 25],
    ):
        result = cli(*args)
        assert result.exit_code == 0, result.stderr
    assert_nothing_filed(cli)


# --- 2. configuration and database ----------------------------------------------------------

# A URL that cannot be used as written is a malformed setting (exit 2); one that is
# well formed but leads nowhere is the database being unreachable (exit 3).
BAD_URLS = [
    pytest.param(
        f"postgresql+psycopg://u:{SECRET}@127.0.0.1:notaport/db", "malformed", 2, id="malformed"
    ),
    pytest.param(
        f"mysql://u:{SECRET}@127.0.0.1/db", "unsupported database driver 'mysql'", 2, id="driver"
    ),
    pytest.param(
        f"postgresql+asyncpg://u:{SECRET}@127.0.0.1/db", "unsupported", 2, id="async-driver"
    ),
    pytest.param(f"postgresql+psycopg://u:{SECRET}@127.0.0.1:5432", "no database", 2, id="no-db"),
    pytest.param("sqlite://", "needs a file path", 2, id="sqlite-memory"),
    # Relative to whichever directory the command runs in: never the cwd (README).
    pytest.param("sqlite:///relative.sqlite", "is relative", 2, id="sqlite-relative"),
    pytest.param(
        f"postgresql://u:{SECRET[:6]}@{SECRET[6:]}@127.0.0.1:1/db",
        "percent-encode",
        2,
        id="unencoded-at-sign",
    ),
    pytest.param(
        f"postgresql://u:{SECRET}@127.0.0.1:1/db\nx", "control characters", 2, id="newline"
    ),
    pytest.param(
        f"postgresql+psycopg://u:{SECRET}@127.0.0.1:1/db",
        "cannot connect to postgresql+psycopg://u:***@127.0.0.1:1/db",
        3,
        id="refused",
    ),
    pytest.param(
        f"postgresql+psycopg://u:{SECRET}@127.0.0.2:5999/db",
        "cannot connect to postgresql+psycopg://u:***@127.0.0.2:5999/db",
        3,
        id="no-server-at-loopback-address",
    ),
    pytest.param(
        f"postgresql+psycopg://u@127.0.0.1:1/db?password={SECRET}",
        "password=***",
        3,
        id="password-in-query",
    ),
]


@pytest.mark.parametrize(("url", "needle", "code"), BAD_URLS)
def test_unusable_database_url_is_exit_2_or_3_in_one_line_password_hidden(
    url: str, needle: str, code: int
) -> None:
    tool = Cli(url)
    for command in (
        ["migrate"],
        ["errors"],
        ["submit"],
        ["batch", "2"],
        ["status"],
        ["users", "list"],
    ):
        started = time.monotonic()
        result = tool(*command, ACCESSCTL_CONNECT_TIMEOUT="2")
        elapsed = time.monotonic() - started
        assert_one_line_error(result, code, needle)
        assert SECRET not in result.stdout + result.stderr
        assert SECRET[6:] not in result.stdout + result.stderr
        assert elapsed < 10, (command, elapsed)
    # `config` connects to nothing: it refuses what cannot be used at all, and shows the
    # rest with its password hidden.
    result = tool("config", "--json")
    assert SECRET not in result.stdout + result.stderr
    if "cannot connect" in needle or "password=" in needle:
        assert result.exit_code == 0, result.stderr
        assert "***" in json.loads(result.stdout)["database_url"]
    else:
        assert_one_line_error(result, code, needle)


def test_sqlite_paths_that_cannot_hold_a_database_are_exit_3(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database\n" * 100)
    for url, needle in (
        (f"sqlite:///{tmp_path / 'missing' / 'dir' / 'x.sqlite'}", "does not exist"),
        (f"sqlite:///{tmp_path}", "cannot connect"),
        (f"sqlite:///{garbage}", "not a database"),
    ):
        for command in (["migrate"], ["errors"], ["submit"]):
            assert_one_line_error(Cli(url)(*command), 3, needle)
    assert not (tmp_path / "missing").exists()


def test_a_server_that_never_answers_is_exit_3_within_the_connect_timeout() -> None:
    with BlackHole() as hole:
        tool = Cli(f"postgresql+psycopg://u:{SECRET}@127.0.0.1:{hole.port}/db")
        for command in (["errors"], ["submit"]):
            started = time.monotonic()
            result = tool(*command, ACCESSCTL_CONNECT_TIMEOUT="2")
            elapsed = time.monotonic() - started
            assert_one_line_error(result, 3, "timeout", f"u:***@127.0.0.1:{hole.port}/db")
            assert SECRET not in result.stdout + result.stderr
            # The timeout, not something else, ended the wait; and it did end it.
            assert 1.5 <= elapsed < 8, elapsed


@needs_postgres
def test_real_server_refusals_are_exit_3(tmp_path: Path) -> None:
    server = sa.make_url(POSTGRES_URL)
    role = f"accessctl_test_nologin_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{role}" NOLOGIN'))
    try:
        cases = [
            (
                server.set(database=f"accessctl_test_missing_{uuid.uuid4().hex[:8]}"),
                "does not exist",
            ),
            (
                server.set(username=f"accessctl_test_nobody_{uuid.uuid4().hex[:8]}"),
                "does not exist",
            ),
            (server.set(username=role), "not permitted to log in"),
        ]
        for url, needle in cases:
            shown = url.set(password=SECRET).render_as_string(hide_password=False)
            for command in (["migrate"], ["errors"], ["submit"]):
                result = Cli(shown)(*command)
                assert_one_line_error(result, 3, "cannot connect", needle, ":***@")
                assert SECRET not in result.stdout + result.stderr
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


# A file that cannot be used (not YAML, the wrong shape) is configuration: exit 3. A value
# in it that is malformed or out of bounds is a bad setting, like one typed: exit 2.
BROKEN_CONFIGS = [
    pytest.param(
        f"system_database_url: postgresql://u:{SECRET}@127.0.0.1/db\nname: [unclosed\n",
        ["dbos-config.yaml: line 3 is not valid YAML"],
        3,
        id="invalid-yaml",
    ),
    pytest.param(
        "system_database_url: 5432\n",
        ["key 'system_database_url' must be a string"],
        3,
        id="url-int",
    ),
    pytest.param(
        "system_database_url:\n  - a\n  - b\n",
        ["key 'system_database_url' must be a string"],
        3,
        id="url-list",
    ),
    pytest.param("- just\n- a list\n", ["expected a mapping"], 3, id="top-level-list"),
    pytest.param("env: [1, 2]\n", ["key 'env' must map"], 3, id="env-list"),
    pytest.param(
        "env:\n  ACCESSCTL_MAX_BATCH: lots\n",
        ["env.ACCESSCTL_MAX_BATCH", "'lots' is not a whole number", "from 1 to 10,000,000"],
        2,
        id="env-value",
    ),
    pytest.param(
        f"system_database_url: 'mysql://u:{SECRET}@127.0.0.1/db'\n",
        ["dbos-config.yaml system_database_url", "unsupported database driver"],
        2,
        id="url-driver",
    ),
    pytest.param(
        "system_database_url: 'postgresql://u@127.0.0.1/'\n",
        ["dbos-config.yaml system_database_url", "names no database"],
        2,
        id="url-no-db",
    ),
]


@pytest.mark.parametrize(("text", "needles", "code"), BROKEN_CONFIGS)
def test_broken_dbos_config_is_exit_2_or_3_naming_the_file_and_key(
    text: str, needles: list[str], code: int, isolated_environment: Path
) -> None:
    (isolated_environment / "dbos-config.yaml").write_text(text)
    tool = Cli("")  # no URL in the environment: the config file is read
    for command in (["errors"], ["submit"], ["config"]):
        result = tool(*command, ACCESSCTL_DATABASE_URL="")
        line = assert_one_line_error(result, code, *needles)
        assert str(isolated_environment / "dbos-config.yaml") in line
        assert SECRET not in result.stdout + result.stderr


def test_config_file_that_cannot_be_read_is_exit_3(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: caf\xe9\n")
    tool = Cli(f"sqlite:///{tmp_path / 'x.sqlite'}")
    for path, needle in (
        (tmp_path / "missing.yaml", "cannot read (no such file)"),
        (latin1, "not UTF-8"),
    ):
        assert_one_line_error(tool("--config", str(path), "errors"), 3, str(path), needle)
        assert_one_line_error(tool("errors", ACCESSCTL_CONFIG=str(path)), 3, needle)


def test_bad_settings_in_the_environment_are_exit_2_naming_the_bounds(tmp_path: Path) -> None:
    tool = Cli(f"sqlite:///{tmp_path / 'x.sqlite'}")
    for name, value, needle in (
        ("ACCESSCTL_CONNECT_TIMEOUT", "inf", "not a number (from 0.1 to 300 seconds)"),
        ("ACCESSCTL_CONNECT_TIMEOUT", "nan", "not a number"),
        ("ACCESSCTL_CONNECT_TIMEOUT", "-1", "out of bounds (from 0.1 to 300 seconds)"),
        ("ACCESSCTL_MAX_BATCH", "1e3", "not a whole number"),
        ("ACCESSCTL_SHUTDOWN_GRACE", "inf", "not a number"),
        ("ACCESSCTL_RATE_LIMIT", "50 per 30", "LIMIT/SECONDS"),
        ("ACCESSCTL_RATE_LIMIT", "1/" + "9" * 400, "period"),
        ("ACCESSCTL_DEFAULT_USERS", "not-a-uuid", "not a UUID"),
        ("ACCESSCTL_LOG_FORMAT", "xml", "not 'json' or 'console'"),
    ):
        for command in (["errors"], ["batch", "3"]):
            assert_one_line_error(tool(*command, **{name: value}), 2, name, needle)
    assert not (tmp_path / "x.sqlite").exists()


# --- 4. hostile text ------------------------------------------------------------------------

HOSTILE_NAMES = [
    'O\'Brien "Bobby" Tables',
    "Robert'); DROP TABLE users; --",
    "x' OR '1'='1",
    "Zoë Ñandú 日本語 עברית 🚀",
    "%s %(name)s {0} $1 ? :name",
    "back\\slash \\x00 \\u0000 not a NUL",
    "tab\tand\u2028separator \x1b[31mred",
    "n" * 200,
]


def test_hostile_names_and_emails_round_trip_exactly(cli: Cli) -> None:
    added = {}
    for i, name in enumerate(HOSTILE_NAMES):
        email = f'o\'hara+{i}."q"@例え.example.com'
        result = cli("users", "add", "--name", name, "--email", email, "--json")
        assert result.exit_code == 0, result.stderr
        added[json.loads(result.stdout)["id"]] = (name, email.lower())
    listed = cli.json("users", "list", "--json")
    assert {u["id"]: (u["name"], u["email"]) for u in listed} == added
    # The table renderer copes too, and every table is still there.
    assert cli("users", "list").exit_code == 0
    for table in ("users", "accesses", "errors", "batches", "alembic_version"):
        assert cli.scalar(f"SELECT count(*) FROM {table}") is not None
    assert cli.scalar("SELECT count(*) FROM users") == len(HOSTILE_NAMES)


def test_hostile_user_input_that_cannot_be_stored_is_refused(cli: Cli) -> None:
    for args, needle in (
        (["--name", "nul\x00byte", "--email", "a@example.com"], "NUL"),
        (["--name", "ok", "--email", "a\x00@example.com"], "NUL"),
        (["--name", "n" * 201, "--email", "a@example.com"], "maximum is 200"),
        (["--name", "n" * 100_000, "--email", "a@example.com"], "maximum is 200"),
        (["--name", "ok", "--email", "e" * 100_000 + "@example.com"], "not an email"),
        (["--name", "   ", "--email", "a@example.com"], "name is empty"),
        (["--name", "lone \udcff surrogate", "--email", "a@example.com"], "not valid UTF-8"),
        (
            ["--name", "ok", "--email", "a@example.com", "--id", "'; DROP TABLE users; --"],
            "not a UUID",
        ),
    ):
        line = assert_one_line_error(cli("users", "add", *args), 2, needle)
        assert len(line) < 500  # long input is named, not echoed
    for stdin in (
        "name,email\nnul\x00,a@example.com\n",
        '{"name": "nul\\u0000", "email": "a@example.com"}\n',
        '{"name": "a", "email": "a@example.com", "id": 5}\n',
        '{"name": "\\udcff", "email": "a@example.com"}\n',
        "name,email\nok,b@example.com\n" + "n" * 300 + ",c@example.com\n",
    ):
        assert_one_line_error(cli("users", "import", "-", input=stdin), 2, "nothing imported")
    assert cli.scalar("SELECT count(*) FROM users") == 0


def test_hostile_keys_are_bound_parameters(cli: Cli) -> None:
    user = cli.add_users(1)[0]
    key = 'nightly\'); DROP TABLE batches; -- "☃" %s $1'
    summary = cli.json("submit", user, "--key", key, "--json")
    assert summary["key"] == key and summary["recorded"] == 1
    assert cli.rows("SELECT key FROM batches") == [(key,)]
    assert cli.json("status", "--json")["key"] == key
    for bad, needle in (
        ("nul\x00key", "printable"),
        ("line\nbreak", "printable"),
        ("k" * 201, "maximum is 200"),
        ("   ", "blank"),
    ):
        assert_one_line_error(cli("submit", user, "--key", bad), 2, needle)
    assert cli.scalar("SELECT count(*) FROM batches") == 1


def test_json_output_always_parses_after_hostile_invalid_ids(cli: Cli) -> None:
    hostile = [
        "quote'\"",
        "\x1b[31mred\x1b[0m",
        "nul\x00in the middle",
        "line\u2028separator",
        "日本語-🚀",
        "lone \udcff byte",
        "x" * 5000,
    ]
    result = cli("submit", "--skip-invalid", "--json", "--", *hostile)
    assert result.exit_code == 1, result.stderr
    assert json.loads(result.stdout)["failed"] == len(hostile)
    errors = cli.json("errors", "--json")
    inputs = {e["message"]["line"]: e["message"]["input"] for e in errors}
    assert inputs[1] == "quote'\"" and inputs[5] == "日本語-🚀"
    assert inputs[3] == "nul\\0in the middle"
    assert inputs[6] == "lone \\xff byte"
    assert len(inputs[7]) <= 200
    for text in inputs.values():
        assert "\x00" not in text
    # The rich table escapes control characters instead of breaking its lines.
    table = cli("errors")
    assert table.exit_code == 0, table.stderr
    assert "\x1b" not in table.stdout


# --- 5. concurrent migrate ------------------------------------------------------------------


def test_ten_concurrent_migrates_bring_the_schema_to_head_once(fresh_cli: Cli) -> None:
    env = {**os.environ, **fresh_cli.base_env()}
    procs = [
        start_accessctl(
            ["migrate", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(10)
    ]
    outcomes: list[tuple[int, str, str]] = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            outcomes.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    head = head_revision()
    for code, out, err in outcomes:
        assert code == 0, err
        answer = json.loads(out)
        assert answer["revision"] == head
        assert answer["shared_limit"]["rate_limit"] == "5/0.5"
    # The shared limit was stored, and recorded, exactly once.
    assert fresh_cli.scalar("SELECT count(*) FROM limit_changes") == 1
    dbos = "" if fresh_cli.database_url.startswith("sqlite") else "dbos."
    assert fresh_cli.rows("SELECT version_num FROM alembic_version") == [(head,)]
    assert fresh_cli.scalar(f"SELECT count(*) FROM {dbos}dbos_migrations") == 1
    assert fresh_cli.scalar(f"SELECT count(*) FROM {fresh_cli.workflow_table}") == 0
    # And the result is usable.
    assert fresh_cli.json("errors", "--json") == []


def test_schema_head_constant_is_the_newest_migration() -> None:
    # Commands compare the database's revision with SCHEMA_HEAD instead of loading Alembic.
    assert head_revision() == SCHEMA_HEAD


# --- 6. exit codes --------------------------------------------------------------------------


def test_exit_codes_are_exactly_the_documented_set() -> None:
    assert {int(code) for code in ExitCode} == {0, 1, 2, 3, 4, 130, 143}


def test_exit_codes_0_to_3(cli: Cli) -> None:
    known = cli.add_users(1)[0]
    outcomes: dict[int, Any] = {
        0: cli("submit", known, "--json"),
        1: cli("submit", known, str(uuid.uuid4()), "--json"),
        2: cli("batch", "0"),
        3: cli("errors", ACCESSCTL_DATABASE_URL="postgresql+psycopg://u@127.0.0.1:1/db"),
    }
    for code, result in outcomes.items():
        assert result.exit_code == code, (code, result.stdout, result.stderr)
    # Exit 4 (schema not migrated / outdated) is tests/test_core.py's; 130 and 143
    # (interrupted) are tests/test_faults.py's.
