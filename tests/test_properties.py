"""Property: whatever an operator types, the CLI answers with a documented exit code, never
a traceback, and writes nothing when it refuses the input (issue 4, "What it must show").

Generated arguments and stdin drive the real CLI in-process (CliRunner) against one SQLite
database per test. Filing commands always run ``--detach`` (enqueue only), so a valid
example costs a few milliseconds instead of a DBOS launch; the usage checks they exercise
run before the detach/attach split. Writes are compared per example (before/after), since
valid examples legitimately file batches.
"""

from __future__ import annotations

import string
import traceback
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from accessctl.cli import app
from accessctl.exceptions import ExitCode
from conftest import SEED

DOCUMENTED = {int(code) for code in ExitCode}
TABLES = ("batches", "accesses", "errors", "workflow_status", "users")

# --- strategies -----------------------------------------------------------------------------

# Text an operator (or an attacker) might type: anything printable, control characters,
# NUL, lone surrogates (undecodable argv bytes), SQL and shell fragments.
NASTY = st.sampled_from(
    [
        "",
        " ",
        "-",
        "--",
        "-1",
        "--bogus",
        "\x00",
        "a\x00b",
        "\udcff",
        "\x1b[31m",
        "'; DROP TABLE batches; --",
        "' OR '1'='1",
        "%s",
        "${HOME}",
        "日本語",
        "🚀",
        "x" * 300,
        "1e3",
        "0x10",
        "٣",
    ]
)
TEXT = st.one_of(st.text(max_size=40), NASTY)
UUIDS = st.one_of(st.sampled_from(SEED), st.uuids().map(str))
USER_ID = st.one_of(UUIDS, UUIDS.map(str.upper), TEXT)
COUNT = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**7).map(str),
    st.sampled_from(["0", "1", "3", "20", "21", "-0", "+3", " 4 ", "1.0", "1e3"]),
    TEXT,
)
DURATION = st.one_of(
    st.builds(
        lambda n, unit: f"{n}{unit}",
        st.integers(min_value=0, max_value=10**14),
        st.sampled_from("smhdwy"),
    ),
    st.sampled_from(["2026-01-01", "2026-01-01T00:00:00+14:00", "0001-01-01", "9999-12-31"]),
    TEXT,
)
LIMIT = st.one_of(st.integers(min_value=-5, max_value=2**70).map(str), TEXT)
FLAGS = st.lists(st.sampled_from(["--json", "--skip-invalid", "--bogus", "-v"]), max_size=2)
STDIN = st.one_of(
    st.none(),
    st.lists(USER_ID, max_size=6).map(lambda ids: "\n".join(ids) + "\n"),
    st.text(alphabet=string.printable + "\x00日", max_size=80),
)


@st.composite
def invocations(draw: st.DrawFn) -> tuple[list[str], str | None]:
    command = draw(st.sampled_from(["batch", "submit", "errors", "users-add"]))
    args: list[str]
    if command == "batch":
        args = ["batch", draw(COUNT), "--detach"]
        for user in draw(st.lists(USER_ID, max_size=3)):
            args += ["--user", user]
    elif command == "submit":
        args = ["submit", "--detach"]
        args += [a for a in draw(st.lists(USER_ID, max_size=4))]
        if draw(st.booleans()):
            args.append("-")  # read stdin too
    elif command == "errors":
        args = ["errors"]
        if draw(st.booleans()):
            args += ["--since", draw(DURATION)]
        if draw(st.booleans()):
            args += ["--batch", draw(st.one_of(UUIDS, TEXT))]
        if draw(st.booleans()):
            args += ["--limit", draw(LIMIT)]
    else:
        args = ["users", "add", "--name", draw(TEXT), "--email", draw(st.one_of(TEXT, st.emails()))]
        if draw(st.booleans()):
            args += ["--id", draw(USER_ID)]
    if command in ("batch", "submit") and draw(st.booleans()):
        args += ["--key", draw(TEXT)]
    args += draw(FLAGS)
    # Options before positionals is how click reads them; a stray "--" makes the rest
    # positional, which must be handled as well.
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        args.insert(draw(st.integers(min_value=1, max_value=len(args))), "--")
    return args, draw(STDIN)


# --- the property ---------------------------------------------------------------------------


def counts(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            t: int(conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar() or 0) for t in TABLES
        }


def describe(result: Result, args: list[str], stdin: str | None) -> str:
    exc = result.exception
    trace = (
        "".join(traceback.format_exception(exc)) if exc and not isinstance(exc, SystemExit) else ""
    )
    return (
        f"args={args!r} stdin={stdin!r}\nexit={result.exit_code}\n"
        f"stdout={result.stdout!r}\nstderr={result.stderr!r}\n{trace}"
    )


def test_generated_invocations_never_crash_and_never_half_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'accessctl.sqlite'}"
    env = {
        "ACCESSCTL_DATABASE_URL": url,
        "ACCESSCTL_LOG_FORMAT": "json",
        "ACCESSCTL_MAX_BATCH": "20",
    }
    runner = CliRunner()
    migrated = runner.invoke(app, ["migrate"], env=env)
    assert migrated.exit_code == 0, migrated.stderr

    from accessctl.db import make_engine

    engine = make_engine(url)
    seen: dict[int, int] = {}

    # Deterministic: unseeded, all 50 examples were once usage errors and the "reaches both
    # sides" assertion below failed. derandomize fixes the examples; the explicit ones
    # guarantee each side whatever the generator's distribution becomes.
    @settings(
        max_examples=50,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(invocations())
    @example((["batch", "0", "--detach"], None))  # refused: exit 2
    @example((["submit", "--detach", SEED[0], "-"], f"{SEED[1]}\n"))  # accepted: exit 0
    @example((["errors", "--since", "2h", "--json"], None))  # accepted: exit 0
    def check(invocation: tuple[list[str], str | None]) -> None:
        args, stdin = invocation
        before = counts(engine)
        # Lone surrogates in stdin stand for undecodable bytes, as Python reads them.
        raw = None if stdin is None else stdin.encode("utf-8", "surrogateescape")
        result = runner.invoke(app, args, input=raw, env=env)
        context = describe(result, args, stdin)
        assert result.exception is None or isinstance(result.exception, SystemExit), context
        assert "Traceback" not in result.stdout + result.stderr, context
        # The CLI's last resort turns a bug into "internal error" (exit 3): still a bug.
        assert "internal error" not in result.stderr, context
        assert result.exit_code in DOCUMENTED, context
        seen[result.exit_code] = seen.get(result.exit_code, 0) + 1
        after = counts(engine)
        if result.exit_code == ExitCode.USAGE:
            assert after == before, context
            assert result.stderr.strip(), context  # and it said why
        if result.exit_code != ExitCode.OK:
            assert after["users"] == before["users"], context

    try:
        check()
    finally:
        engine.dispose()
    # The generator reaches both sides of the property: refusals and accepted input.
    assert seen.get(int(ExitCode.USAGE), 0) > 0, seen
    assert seen.get(int(ExitCode.OK), 0) > 0, seen


def test_generated_config_values_are_exit_0_or_2(tmp_path: Path) -> None:
    """Any value in any setting: accepted (0) or refused as a bad setting value (2, one line
    naming it), never a crash. (Unreadable files, exit 3, are tests/test_bounded_input.py's.)"""
    runner = CliRunner()
    names = [
        "ACCESSCTL_DATABASE_URL",
        "ACCESSCTL_RATE_LIMIT",
        "ACCESSCTL_CONCURRENCY",
        "ACCESSCTL_MAX_BATCH",
        "ACCESSCTL_CONNECT_TIMEOUT",
        "ACCESSCTL_DEFAULT_USERS",
        "ACCESSCTL_LOG_FORMAT",
        "ACCESSCTL_SHUTDOWN_GRACE",
        "ACCESSCTL_POLL_INTERVAL",
        "ACCESSCTL_PROVIDER_URL",
        "ACCESSCTL_PROVIDER_TIMEOUT",
        "ACCESSCTL_PROVIDER_MAX_ATTEMPTS",
        "ACCESSCTL_PROVIDER_DEADLINE",
    ]
    # Environment values cannot hold NUL bytes or lone surrogates: the OS refuses them.
    env_text = st.text(
        alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
        max_size=40,
    )
    value = st.one_of(
        env_text,
        st.sampled_from(
            ["inf", "nan", "-1", "0", "1e3", "50/30", "none", "sqlite://", "mysql://x/y", "1e308"]
        ),
    )
    seen: set[int] = set()

    @settings(
        max_examples=50,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.sampled_from(names), value)
    @example("ACCESSCTL_CONCURRENCY", "10")  # accepted
    @example("ACCESSCTL_POLL_INTERVAL", "1e308")  # refused
    def check(name: str, text: str) -> None:
        env: dict[str, Any] = {
            "ACCESSCTL_DATABASE_URL": f"sqlite:///{tmp_path / 'unused.sqlite'}",
            name: text,
        }
        result = runner.invoke(app, ["config", "--json"], env=env)
        context = f"{name}={text!r}\n{result.stdout}\n{result.stderr}\n{result.exception!r}"
        assert result.exception is None or isinstance(result.exception, SystemExit), context
        assert "internal error" not in result.stderr, context
        assert result.exit_code in (0, 2), context
        seen.add(result.exit_code)
        if result.exit_code == 2:
            assert result.stderr.startswith("accessctl: error: "), context
            assert len(result.stderr.strip().splitlines()) == 1, context

    check()
    assert seen == {0, 2}, seen
    assert not (tmp_path / "unused.sqlite").exists()
