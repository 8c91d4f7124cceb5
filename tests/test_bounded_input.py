"""Issue #12, parts 4-6: bounded input, every setting within documented bounds, signals at
any moment during start-up, byte-order marks, relative SQLite paths, damaged SQLite files.

Part 4's fuzz tests (settings and files, Hypothesis) are at the end; they run the real CLI
in-process on ``config`` (no database) or on one migrated SQLite file, so they stay fast.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from accessctl.cli import app
from accessctl.exceptions import ExitCode, UsageError
from accessctl.files import FileBounds, read_bounded
from accessctl.settings import BOUNDS
from conftest import ACCESSCTL_BIN, SEED, UNMEASURED, Cli
from test_bad_input import assert_one_line_error as one_line_error
from test_bad_input import error_lines
from test_faults import wait_for

BOM = "\ufeff"
DOCUMENTED = {0, 1, 2, 3, 4}  # a command that is not interrupted ends with one of these


@pytest.fixture
def sqlite_cli(tmp_path: Path) -> Cli:
    tool = Cli(f"sqlite:///{tmp_path / 'accessctl.sqlite'}")
    assert tool("migrate").exit_code == 0
    return tool


@pytest.fixture
def no_db(tmp_path: Path) -> Cli:
    """A CLI whose database must never be created: the checks come first."""
    return Cli(f"sqlite:///{tmp_path / 'never.sqlite'}")


# --- 4. bounded reads -----------------------------------------------------------------------


def test_devices_and_fifos_are_refused_at_once_not_read_forever(tmp_path: Path) -> None:
    """The real binary, with a timeout: each of these used to read forever (or block)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody ever writes to it: opening it for reading used to block
    tool = Cli(f"sqlite:///{tmp_path / 'never.sqlite'}")
    for source in ("/dev/zero", str(fifo)):
        for args, env in (
            (["--config", source, "config"], {}),
            (["config"], {"ACCESSCTL_CONFIG": source}),
            (["config"], {"ACCESSCTL_PROVIDER_TOKEN_FILE": source}),
            (["submit", "--file", source], {}),
            (["batch", "3", "--file", source], {}),
            (["users", "import", source], {}),
        ):
            started = time.monotonic()
            done = tool.run(*args, timeout=30, **env)
            assert done.returncode == 2, (args, env, done.stderr)
            lines = error_lines(done.stderr)
            assert len(lines) == 1 and lines[0].startswith("accessctl: error: "), done.stderr
            assert "is not a regular file" in lines[0], done.stderr
            assert "Traceback" not in done.stderr
            assert time.monotonic() - started < 20
    assert not (tmp_path / "never.sqlite").exists()


def test_stdin_may_be_a_pipe_but_is_bounded(no_db: Cli) -> None:
    # One endless line, as `cat /dev/zero | accessctl submit -` gives: refused at 64 KiB.
    proc = subprocess.Popen(
        [ACCESSCTL_BIN, "submit", "-"],
        env={**os.environ, **no_db.base_env()},
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    assert proc.stdin is not None and proc.stderr is not None
    with pytest.raises(BrokenPipeError):  # it stops reading; the writer would go on forever
        for _ in range(100_000):  # 6.4 GB if it never stopped
            proc.stdin.write(b"\0" * 65536)
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 2, err
    assert error_lines(err.decode()) == [
        "accessctl: error: stdin: has a line longer than 64 KiB, the limit for a user ID input "
        "(--file, stdin)"
    ]


def test_a_closed_stdin_is_a_usage_error(no_db: Cli) -> None:
    done = subprocess.run(
        ["sh", "-c", f'exec "{ACCESSCTL_BIN}" submit - <&-'],
        env={**os.environ, **no_db.base_env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert error_lines(done.stderr) == [
        "accessctl: error: stdin: is closed; nothing to read for '-'"
    ]


def test_files_over_their_bounds_are_usage_errors(no_db: Cli, tmp_path: Path) -> None:
    long_line = tmp_path / "long-line.txt"
    long_line.write_bytes(SEED[0].encode() + b"\n" + b"x" * (64 * 1024 + 1) + b"\n")
    big_config = tmp_path / "big.yaml"
    big_config.write_bytes(b"# padding\n" * (110 * 1024))  # over 1 MiB, short lines
    big_token = tmp_path / "token"
    big_token.write_bytes(b"t" * (64 * 1024 + 1))
    for args, stdin, env, needle in (
        (["submit", "--file", str(long_line)], None, {}, "line longer than 64 KiB"),
        (["users", "import", str(long_line)], None, {}, "line longer than 64 KiB"),
        (["submit", "-"], "a" * 70_000, {}, "stdin: has a line longer than 64 KiB"),
        (["config"], None, {"ACCESSCTL_CONFIG": str(big_config)}, "larger than 1 MiB"),
        (
            ["config"],
            None,
            {"ACCESSCTL_PROVIDER_TOKEN_FILE": str(big_token)},
            "larger than 64 KiB",
        ),
    ):
        one_line_error(no_db(*args, input=stdin, **env), 2, needle)
    assert not Path(no_db.database_url.removeprefix("sqlite:///")).exists()


def test_read_bounded_stops_at_the_total_and_the_line_bound(tmp_path: Path) -> None:
    """The size bound of the big inputs (256 MiB) is the same code with another number."""
    small = FileBounds("test input", max_bytes=100 * 1024, max_line=1000)
    path = tmp_path / "f"
    path.write_bytes(b"x" * 999 + b"\n" + b"y\n" * 1000)  # a 999-byte line passes
    assert read_bounded(str(path), "f", small).splitlines()[0] == "x" * 999
    path.write_bytes(b"ab\n" + b"x" * 1001 + b"\n")  # 1001 bytes between two newlines
    with pytest.raises(UsageError, match="line longer than"):
        read_bounded(str(path), "f", small)
    # A long line split across two 64 KiB chunks is still one line.
    chunky = FileBounds("test input", max_bytes=1024 * 1024, max_line=100 * 1024)
    path.write_bytes(b"\n" + b"z" * (60 * 1024) + b"z" * (41 * 1024) + b"\n")
    with pytest.raises(UsageError, match="line longer than"):
        read_bounded(str(path), "f", chunky)
    path.write_bytes(b"0123456789\n" * 10_000)  # 110,000 bytes, short lines
    with pytest.raises(UsageError, match="larger than 97 KiB"):
        read_bounded(str(path), "f", FileBounds("test input", 97 * 1024, 1000))


# --- 4. settings within documented bounds ---------------------------------------------------

ENV_OF = {
    "concurrency": "ACCESSCTL_CONCURRENCY",
    "worker_concurrency": "ACCESSCTL_WORKER_CONCURRENCY",
    "max_batch": "ACCESSCTL_MAX_BATCH",
    "connect_timeout": "ACCESSCTL_CONNECT_TIMEOUT",
    "shutdown_grace": "ACCESSCTL_SHUTDOWN_GRACE",
    "poll_interval": "ACCESSCTL_POLL_INTERVAL",
    "provider_timeout": "ACCESSCTL_PROVIDER_TIMEOUT",
    "provider_max_attempts": "ACCESSCTL_PROVIDER_MAX_ATTEMPTS",
    "provider_deadline": "ACCESSCTL_PROVIDER_DEADLINE",
}


def text_of(value: float, kind: type) -> str:
    return str(int(value)) if kind is int else repr(float(value))


@pytest.mark.parametrize("name", sorted(ENV_OF))
def test_every_numeric_setting_is_checked_against_its_bounds(no_db: Cli, name: str) -> None:
    bound, var = BOUNDS[name], ENV_OF[name]
    step = 1 if bound.kind is int else bound.low / 10 or 0.001
    for inside in (bound.low, bound.high):
        result = no_db("config", "--json", **{var: text_of(inside, bound.kind)})
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)[name] == inside
    for outside in (bound.low - step, bound.high + step, bound.high * 1e300):
        text = text_of(outside, bound.kind)
        one_line_error(
            no_db("config", **{var: text}), 2, var, bound.label, "out of bounds", bound.describe()
        )
    for nonsense in ("nan", "inf", "-inf", "1_0", "٣", "0x10", " ", "1 2", "9" * 10_000):
        if not nonsense.strip():
            continue  # blank counts as unset (README)
        result = no_db("config", **{var: nonsense})
        one_line_error(result, 2, var, bound.describe())
    assert not Path(no_db.database_url.removeprefix("sqlite:///")).exists()


def test_the_rate_limit_is_checked_against_its_bounds(no_db: Cli) -> None:
    ok = no_db("config", "--json", ACCESSCTL_RATE_LIMIT=" 1000000 / 0.01 ")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["rate_limit"] == "1000000/0.01"
    assert no_db("config", ACCESSCTL_RATE_LIMIT="1/86400").exit_code == 0
    for text, needle in (
        ("1000001/1", "rate limit '1000001' is out of bounds (from 1 to 1,000,000 starts)"),
        ("0/1", "out of bounds"),
        ("1/0.009", "rate limit period '0.009' is out of bounds (from 0.01 to 86,400 seconds)"),
        ("1/86401", "from 0.01 to 86,400 seconds"),
        ("1/1e308", "out of bounds"),
        ("9" * 10_000 + "/1", "out of bounds"),
        ("1/" + "9" * 10_000, "out of bounds"),
        ("٣/1", "is not LIMIT/SECONDS"),
        ("1/nan", "is not LIMIT/SECONDS"),
    ):
        one_line_error(
            no_db("config", ACCESSCTL_RATE_LIMIT=text), 2, "ACCESSCTL_RATE_LIMIT", needle
        )
    # The flag and the config file are checked the same way, each named as the origin.
    one_line_error(no_db("--rate-limit", "5/0", "config"), 2, "--rate-limit", "period")
    one_line_error(no_db("--concurrency", "1001", "config"), 2, "--concurrency", "1,000")
    # `limit set` (the stored, shared limit) takes the same bounds; click checks its option.
    result = no_db("limit", "set", "--concurrency", "1001")
    assert result.exit_code == 2 and "less than or equal to 1000" in result.stderr, result.stderr
    assert not Path(no_db.database_url.removeprefix("sqlite:///")).exists()


def test_settings_from_the_config_file_name_the_file_and_key(
    no_db: Cli, isolated_environment: Path
) -> None:
    config = isolated_environment / "dbos-config.yaml"
    config.write_text("env:\n  ACCESSCTL_POLL_INTERVAL: 1e308\n")
    one_line_error(
        no_db("config"),
        2,
        f"{config} env.ACCESSCTL_POLL_INTERVAL",
        "poll interval '1e308' is out of bounds (from 0.01 to 60 seconds)",
    )


def test_other_bounded_settings(no_db: Cli, tmp_path: Path) -> None:
    many = ",".join(str(uuid.uuid4()) for _ in range(10_001))
    one_line_error(no_db("config", ACCESSCTL_DEFAULT_USERS=many), 2, "from 0 to 10,000 IDs")
    long_url = "http://example.com/" + "p" * 2048
    for url, needle in (
        ("http://[::1", "Invalid IPv6 URL"),
        ("http://[::1]:99999/x", "http(s)://HOST[:PORT]/PATH"),
        ("http://host:port/x", "http(s)://HOST[:PORT]/PATH"),
        ("ftp://example.com/x", "http(s)://HOST[:PORT]/PATH"),
        (long_url, "from 1 to 2,048 characters"),
    ):
        one_line_error(
            no_db("config", ACCESSCTL_PROVIDER_URL=url), 2, "ACCESSCTL_PROVIDER_URL", needle
        )
    one_line_error(
        no_db("config", ACCESSCTL_PROVIDER_TOKEN="t" * 16_385), 2, "from 1 to 16,384 characters"
    )
    one_line_error(
        no_db("config", ACCESSCTL_DATABASE_URL="sqlite:////" + "d/" * 2100 + "x"),
        2,
        "from 1 to 4,096 characters",
    )


def test_an_empty_flag_is_a_usage_error(no_db: Cli) -> None:
    for args, needle in (
        (["--database-url", "", "config"], "--database-url: database URL is empty"),
        (["--rate-limit", "", "config"], "--rate-limit: rate limit '' is not LIMIT/SECONDS"),
    ):
        one_line_error(no_db(*args), 2, needle)


def test_token_files_that_hold_no_token(no_db: Cli, tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1"
    latin1.write_bytes(b"caf\xe9")
    two_lines = tmp_path / "two-lines"
    two_lines.write_text("one\ntwo\n")
    empty = tmp_path / "empty"
    empty.write_text(BOM + "\n")
    var = "ACCESSCTL_PROVIDER_TOKEN_FILE"
    for path, code, needle in (
        (latin1, 2, "is not UTF-8 text"),
        (two_lines, 2, "several lines"),
        (empty, 2, "is empty"),
        (tmp_path / "missing", 3, "no such file"),
        (tmp_path, 3, "is a directory"),
    ):
        one_line_error(no_db("config", **{var: str(path)}), code, var, needle)


def test_a_ten_thousand_digit_count_is_a_usage_error(no_db: Cli) -> None:
    huge = "1" + "0" * 10_000
    for args in (["batch", huge], ["batch", "--", "-" + huge], ["batch", "0" * 10_000 + "3x"]):
        line = one_line_error(no_db(*args), 2, "N must be")
        assert len(line) < 200  # named, not echoed
    assert not Path(no_db.database_url.removeprefix("sqlite:///")).exists()


def test_a_data_directory_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    tool = Cli("")  # the default database, under XDG_DATA_HOME
    # /proc refuses new directories even to root, like a read-only mount.
    for data_home in (str(a_file), "/proc/self/accessctl-test"):
        for command in (["errors"], ["migrate"], ["submit"]):
            result = tool(*command, ACCESSCTL_DATABASE_URL="", XDG_DATA_HOME=data_home)
            one_line_error(result, 3, "cannot create the data directory", "XDG_DATA_HOME")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_data_directory_is_one_line(tmp_path: Path) -> None:
    data_home = tmp_path / "ro"
    data_home.mkdir()
    data_home.chmod(0o555)
    try:
        result = Cli("")("errors", ACCESSCTL_DATABASE_URL="", XDG_DATA_HOME=str(data_home))
        one_line_error(result, 3, "cannot create the data directory", "Permission denied")
    finally:
        data_home.chmod(0o755)


# --- 6. byte-order marks, relative SQLite paths, damaged SQLite files ------------------------


def test_a_byte_order_mark_is_ignored_in_every_input(sqlite_cli: Cli, tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text(BOM + SEED[0] + "\n" + SEED[1] + "\n", encoding="utf-8")
    result = sqlite_cli("submit", "--file", str(ids), "--detach", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["total"] == 2
    result = sqlite_cli("submit", "-", "--detach", "--json", input=BOM + SEED[2] + "\n")
    assert result.exit_code == 0, result.stderr
    # CSV: the header's first name used to be "\ufeffname", so the header was refused.
    csv_file = tmp_path / "people.csv"
    csv_file.write_bytes((BOM + "name,email\nAda,ada@example.com\n").encode("utf-8"))
    result = sqlite_cli("users", "import", str(csv_file), "--json")
    assert result.exit_code == 0, result.stderr
    jsonl = BOM + json.dumps({"name": "Bea", "email": "bea@example.com"}) + "\n"
    result = sqlite_cli("users", "import", "-", "--json", input=jsonl)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"added": 1, "skipped": 0}
    token = tmp_path / "token"
    token.write_bytes((BOM + "s3cret-token\n").encode("utf-8"))
    config = tmp_path / "dbos-config.yaml"
    config.write_bytes((BOM + "env:\n  ACCESSCTL_CONCURRENCY: 7\n").encode("utf-8"))
    result = sqlite_cli(
        "--config", str(config), "config", "--json", ACCESSCTL_PROVIDER_TOKEN_FILE=str(token)
    )
    assert result.exit_code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert (shown["concurrency"], shown["provider_token"]) == (7, "(set)")
    from accessctl.settings import resolve_settings

    resolved = resolve_settings(
        {"config_file": str(config)}, {"ACCESSCTL_PROVIDER_TOKEN_FILE": str(token)}
    )
    assert resolved.provider_token == "s3cret-token"


def test_a_relative_sqlite_path_is_refused(tmp_path: Path, isolated_environment: Path) -> None:
    for url in ("sqlite:///relative.sqlite", "sqlite:///./x/y.sqlite", "sqlite:///~/a.sqlite"):
        for command in (["config"], ["errors"], ["migrate"]):
            one_line_error(Cli(url)(*command), 2, "is relative", "absolute path")
    assert list(isolated_environment.glob("*.sqlite")) == []


def damage(database_url: str, table: str) -> None:
    """Overwrite the root page of ``table`` with garbage, as a bad disk sector would."""
    path = database_url.removeprefix("sqlite:///")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    conn.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)


def test_a_damaged_sqlite_file_is_refused_before_executing_or_migrating(sqlite_cli: Cli) -> None:
    users = sqlite_cli.add_users(300)  # the users table spans pages: its root is interior
    damage(sqlite_cli.database_url, "users")
    for command in (
        ["migrate"],
        ["batch", "2", "--user", users[0]],
        ["submit", users[0]],
        ["worker", "--burst"],
    ):
        one_line_error(sqlite_cli(*command), 3, "is damaged", "restore it from a backup")
    # A reader that meets the damage says the same, in one line.
    one_line_error(sqlite_cli("users", "list", "--limit", "1000"), 3, "restore it from a backup")
    assert sqlite_cli.scalar("SELECT count(*) FROM batches") == 0


# --- 5. signals at any moment during start-up -----------------------------------------------

MOMENTS = [0.05, 0.2, 0.5, 1.0, 2.0]


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (Linux: /proc's SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.parametrize("moment", MOMENTS)
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_at_any_early_moment_exits_with_its_code_in_one_line(
    tmp_path: Path, moment: float, signum: int, code: int
) -> None:
    """From importing the CLI to waiting on the batch: the documented code, one line."""
    tool = Cli(f"sqlite:///{tmp_path / 'accessctl.sqlite'}", new_interpreter=True)
    # A slow limit keeps the batch running well past the last moment.
    proc = tool.popen(
        "batch", "5", ACCESSCTL_RATE_LIMIT="1/60", ACCESSCTL_SHUTDOWN_GRACE="2", **UNMEASURED
    )
    # Counted from the moment the entry point has its handlers (the kernel shows them in
    # SigCgt; SIGTERM's, since Python itself catches SIGINT from its start): before that
    # a signal meets a process that ran nothing of ours (test_sigterm_at_once_is_never_a_
    # traceback), and a loaded machine can take longer than the smallest moment to start.
    wait_for(lambda: catches(proc.pid, signal.SIGTERM), timeout=30, what="the handlers")
    time.sleep(moment)  # the moment is what is tested: there is no event to wait for
    assert proc.poll() is None, "it ended before the signal"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("accessctl: error: interrupted"), err
    for line in err.splitlines():
        if line.startswith("{"):
            json.loads(line)  # the rest is log lines, whole


def test_sigterm_at_once_is_never_a_traceback(tmp_path: Path) -> None:
    """Right after exec: before Python runs any code of ours, the signal's default action
    ends the process (a shell reports 143 all the same); after, our handler exits 143."""
    tool = Cli(f"sqlite:///{tmp_path / 'accessctl.sqlite'}")
    for _ in range(3):
        proc = tool.popen("batch", "5", ACCESSCTL_RATE_LIMIT="1/60")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (143, -signal.SIGTERM), err
        assert "Traceback" not in err
        assert len(error_lines(err)) <= 1, err


def test_the_entry_point_sets_its_handlers_before_importing_anything() -> None:
    """The window in which Python's own SIGINT handling applies ends as soon as the entry
    module is imported: it may import nothing that is not loaded already."""
    code = (
        "import sys; before = set(sys.modules); import accessctl.entry as e; "
        "print(sorted(set(sys.modules) - before))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout.replace("'", '"')))
    assert {"accessctl", "accessctl.entry"} <= loaded <= {"_signal", "accessctl", "accessctl.entry"}


def test_signals_hands_over_from_the_early_handler_and_back() -> None:
    from accessctl import entry
    from accessctl.signals import graceful_signals as _signals

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        entry.install_early_handlers()
        with _signals() as (stop, reason):
            # Graceful while the batch runs: the first signal only sets the event.
            assert signal.getsignal(signal.SIGINT) is not entry._exit_now
            signal.raise_signal(signal.SIGTERM)
            assert stop.is_set() and reason() == ExitCode.TERMINATED
        assert signal.getsignal(signal.SIGINT) is entry._exit_now
        assert signal.getsignal(signal.SIGTERM) is entry._exit_now
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# --- 4. fuzz: settings and files ------------------------------------------------------------

SETTING_VARS = [
    "ACCESSCTL_DATABASE_URL",
    "ACCESSCTL_RATE_LIMIT",
    "ACCESSCTL_CONCURRENCY",
    "ACCESSCTL_DEFAULT_USERS",
    "ACCESSCTL_LOG_FORMAT",
    "ACCESSCTL_CONNECT_TIMEOUT",
    "ACCESSCTL_MAX_BATCH",
    "ACCESSCTL_SHUTDOWN_GRACE",
    "ACCESSCTL_POLL_INTERVAL",
    "ACCESSCTL_PROVIDER_URL",
    "ACCESSCTL_PROVIDER_TOKEN",
    "ACCESSCTL_PROVIDER_TOKEN_FILE",
    "ACCESSCTL_PROVIDER_TIMEOUT",
    "ACCESSCTL_PROVIDER_MAX_ATTEMPTS",
    "ACCESSCTL_PROVIDER_DEADLINE",
    "ACCESSCTL_CONFIG",
]
# Environment values cannot hold NUL bytes or lone surrogates: the OS refuses them.
ENV_TEXT = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    max_size=40,
)
NUMBERISH = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(
        [
            "1e308",
            "1e-300",
            "-0",
            "+5",
            " 7 ",
            "\t3\n",
            "1_000",
            "٣",
            "\uff11\uff12"  # fullwidth digits,
            "0x10",
            "9" * 5000,
            "0." + "0" * 400 + "1",
            "50/30",
            "none",
            "1/0",
            "1e9/1",
            "http://[::1",
            "http://example.com:99999/",
            "sqlite:///relative.db",
            "sqlite://",
            "/dev/zero",
            "/nonexistent/file",
        ]
    ),
)
SETTING_VALUE = st.one_of(ENV_TEXT, NUMBERISH)


def check_outcome(result: Result, context: str) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), context
    assert "Traceback" not in result.stdout + result.stderr, context
    assert "internal error" not in result.stderr, context
    assert result.exit_code in DOCUMENTED, context
    if result.exit_code != 0:
        lines = error_lines(result.stderr)
        assert len(lines) == 1 and lines[0].startswith("accessctl: error: "), context


def test_fuzzed_settings_get_documented_codes_and_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    seen: dict[int, int] = {}

    @settings(
        max_examples=120,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples on every run, in CI and here
        suppress_health_check=list(HealthCheck),
    )
    @given(st.dictionaries(st.sampled_from(SETTING_VARS), SETTING_VALUE, min_size=1, max_size=3))
    @example({"ACCESSCTL_CONCURRENCY": "1000"})  # 0: inside the bounds
    @example({"ACCESSCTL_POLL_INTERVAL": "1e308"})  # 2: out of bounds
    @example({"ACCESSCTL_PROVIDER_TOKEN_FILE": "/nonexistent/file"})  # 3: cannot be read
    def check(values: dict[str, str]) -> None:
        env = {"ACCESSCTL_DATABASE_URL": f"sqlite:///{tmp_path / 'unused.sqlite'}", **values}
        result = runner.invoke(app, ["config", "--json"], env=env)
        check_outcome(result, f"{values!r}\n{result.stdout}\n{result.stderr}")
        seen[result.exit_code] = seen.get(result.exit_code, 0) + 1

    check()
    assert {0, 2, 3} <= set(seen), seen  # every outcome class the test asserts about
    assert not (tmp_path / "unused.sqlite").exists()


def file_contents() -> st.SearchStrategy[bytes]:
    line = st.one_of(
        st.sampled_from(SEED),
        st.uuids().map(str),
        st.text(max_size=30),
        st.sampled_from(["# comment", "", "name,email,id", "env:", "  ACCESSCTL_CONCURRENCY: 3"]),
    )
    text = st.lists(line, max_size=6).map(lambda lines: "\n".join(lines).encode("utf-8", "replace"))
    return st.builds(
        lambda prefix, body, tail: prefix + body + tail,
        st.sampled_from([b"", BOM.encode("utf-8"), b"\xff\xfe", b"\x00"]),
        st.one_of(text, st.binary(max_size=60)),
        st.sampled_from([b"", b"\n", b"\x00\x00", b"\xc3", b"x" * (64 * 1024 + 1), b"\r\n"]),
    )


def test_fuzzed_files_get_documented_codes_and_never_half_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'accessctl.sqlite'}"
    env = {"ACCESSCTL_DATABASE_URL": url, "ACCESSCTL_LOG_FORMAT": "json"}
    runner = CliRunner()
    assert runner.invoke(app, ["migrate"], env=env).exit_code == 0
    from accessctl.db import make_engine

    engine = make_engine(url)
    seen: dict[int, int] = {}
    path = tmp_path / "input"

    def counts() -> tuple[Any, ...]:
        with engine.connect() as conn:
            return tuple(
                conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar()
                for t in ("batches", "errors", "users", "workflow_status")
            )

    @settings(
        max_examples=80,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(file_contents(), st.sampled_from(["submit", "users", "config", "token", "stdin"]))
    @example(f"{BOM}{SEED[0]}\n".encode(), "submit")  # 0: filed, BOM and all
    @example(b"x" * (64 * 1024 + 1), "submit")  # 2: a line over the bound
    @example(b"name: [unclosed\n", "config")  # 3: not YAML
    def check(content: bytes, use: str) -> None:
        path.write_bytes(content)
        args, stdin = {
            "submit": (["submit", "--detach", "--file", str(path)], None),
            "stdin": (["submit", "--detach", "-"], content),
            "users": (["users", "import", str(path)], None),
            "config": (["--config", str(path), "config"], None),
            "token": (["config"], None),
        }[use]
        extra = {"ACCESSCTL_PROVIDER_TOKEN_FILE": str(path)} if use == "token" else {}
        before = counts()
        result = runner.invoke(app, args, input=stdin, env={**env, **extra})
        check_outcome(result, f"{use} {content[:200]!r}\n{result.stdout}\n{result.stderr}")
        if result.exit_code != 0:
            assert counts() == before  # refused: nothing filed, nothing imported
        seen[result.exit_code] = seen.get(result.exit_code, 0) + 1

    try:
        check()
    finally:
        engine.dispose()
    assert {0, 2, 3} <= set(seen), seen
