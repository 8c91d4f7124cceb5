"""No password ever appears in stdout, stderr, a log line, an error row or exception text.

Issue 4, item 3. The Postgres tests run every command through a role whose password holds
URL-special characters (``@ : / ? # [ ]``, percent-encoded in the URL) and a sentinel, with
JSON logs and ``-v``, then dump every row of every table (the application's and DBOS's) as
text and look for the sentinel.

The local test server trusts 127.0.0.1, so it never asks for that password; the test is
still meaningful, because the password travels through every layer of ours (settings,
URL normalisation, engines, DBOS's configuration and client) and must be printed and stored
by none of them. Where a server must actually check the password, ``FakePostgres`` asks
for it, records what arrived (proving the percent-encoded password reached the driver
intact) and refuses it.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from accessctl.db import describe_db_error, hide_password, url_secrets
from conftest import FAST_LIMIT, POSTGRES_URL, Cli, run_accessctl
from pgfakes import FakePostgres

needs_postgres = pytest.mark.skipif(not POSTGRES_URL, reason="ACCESSCTL_TEST_POSTGRES_URL not set")


def make_password(sentinel: str) -> str:
    return f"p@ss:w/rd?#[]%20{sentinel}'\" ;"


def encoded_url(user: str, password: str, host: str, port: int, database: str) -> str:
    return f"postgresql+psycopg://{user}:{quote(password, safe='')}@{host}:{port}/{database}"


@dataclass
class Captured:
    """Everything the commands printed, to search for the sentinel afterwards."""

    outputs: list[tuple[list[str], int, str, str]] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(out + "\n" + err for _, _, out, err in self.outputs)


@dataclass
class SecretDatabase:
    url: str
    sentinel: str
    password: str
    database: str
    role: str
    home: Path
    captured: Captured = field(default_factory=Captured)

    def run(
        self, *args: str, input: str | None = None, expect: int | None = 0, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """The installed command, JSON logs and debug logging on, output captured."""
        full_env = {
            **os.environ,
            "ACCESSCTL_DATABASE_URL": self.url,
            "ACCESSCTL_RATE_LIMIT": FAST_LIMIT,
            "ACCESSCTL_SHUTDOWN_GRACE": "3",
            **env,
        }
        done = run_accessctl(
            ["--log-format", "json", "-v", *args], input=input, env=full_env, cwd=self.home
        )
        self.captured.outputs.append((list(args), done.returncode, done.stdout, done.stderr))
        if expect is not None:
            assert done.returncode == expect, (args, done.returncode, done.stdout, done.stderr)
        return done

    def run_many(self, *runs: tuple[list[str], int, dict[str, str]]) -> None:
        """Independent read-only runs, a few at a time: (args, expected exit, env)."""
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = [
                pool.submit(self.run, *args, expect=expect, **env) for args, expect, env in runs
            ]
            for future in futures:
                future.result()


def _psycopg_conninfo(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def secret_database(isolated_environment: Path) -> Iterator[SecretDatabase]:
    """A fresh database owned by a fresh role with a hostile password."""
    sentinel = f"SENTINEL{uuid.uuid4().hex}"
    password = make_password(sentinel)
    suffix = uuid.uuid4().hex[:12]
    role, database = f"accessctl_secret_{suffix}", f"accessctl_secret_{suffix}"
    server = sa.make_url(POSTGRES_URL)
    with psycopg.connect(_psycopg_conninfo(POSTGRES_URL), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(database), sql.Identifier(role)
            )
        )
    url = encoded_url(role, password, server.host or "127.0.0.1", server.port or 5432, database)
    try:
        yield SecretDatabase(url, sentinel, password, database, role, isolated_environment)
    finally:
        with psycopg.connect(_psycopg_conninfo(POSTGRES_URL), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
            )
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def dump_every_table(url: str) -> dict[str, list[str]]:
    """Every row of every table in the application's and DBOS's schemas, as text."""
    engine = sa.create_engine(url)
    dump: dict[str, list[str]] = {}
    try:
        with engine.connect() as conn:
            tables = conn.execute(
                sa.text(
                    "SELECT table_schema, table_name FROM information_schema.tables "
                    "WHERE table_schema IN ('public', 'dbos') AND table_type = 'BASE TABLE'"
                )
            ).all()
            for schema, table in tables:
                rows = conn.execute(
                    sa.text(f'SELECT t::text FROM "{schema}"."{table}" t')
                ).scalars()
                dump[f"{schema}.{table}"] = list(rows)
    finally:
        engine.dispose()
    return dump


@needs_postgres
def test_no_command_prints_or_stores_the_password(secret_database: SecretDatabase) -> None:
    db = secret_database
    db.run("migrate")
    known = json.loads(
        db.run("users", "add", "--name", "Ada", "--email", "ada@example.com", "--json").stdout
    )["id"]
    db.run(
        "users",
        "import",
        "-",
        input="name,email\nGrace,grace@example.com\nEdsger,edsger@example.com\n",
    )
    assert len(json.loads(db.run("users", "list", "--json").stdout)) == 3

    unknown = str(uuid.uuid4())
    first = json.loads(
        db.run("submit", known, unknown, "--key", "nightly", "--json", expect=1).stdout
    )
    assert (first["recorded"], first["failed"]) == (1, 1)
    db.run("batch", "4", "--user", known, "--json")
    detached = db.run("submit", known, "--detach").stdout.strip()
    db.run("worker", "--burst")
    assert json.loads(db.run("status", detached, "--json").stdout)["state"] == "done"

    errors = json.loads(db.run("errors", "--json").stdout)
    assert [e["message"]["user_id"] for e in errors] == [unknown]
    view = json.loads(db.run("config", "--json").stdout)
    assert view["database_url"] == db.url.replace(quote(db.password, safe=""), "***")
    (db.home / "dbos-config.yaml").write_text(f"name: accessctl\nsystem_database_url: '{db.url}'\n")
    missing = db.url.rsplit("/", 1)[0] + "/accessctl_secret_missing"
    refused = db.url.replace(":5432/", ":1/")
    no_env = {"ACCESSCTL_DATABASE_URL": ""}
    db.run_many(
        (["errors"], 0, {}),
        (["config"], 0, {}),
        # The same URL from every other place the configuration comes from.
        (["config", "--json"], 0, {**no_env, "DBOS_SYSTEM_DATABASE_URL": db.url}),
        (["status"], 0, no_env),  # from dbos-config.yaml in the working directory
        (["--database-url", db.url, "errors", "--json"], 0, no_env),
        # Failures carrying the password: a missing database, a refused port, bad input.
        (["migrate"], 3, {"ACCESSCTL_DATABASE_URL": missing}),
        (["submit", known], 3, {"ACCESSCTL_DATABASE_URL": missing}),
        (["errors"], 3, {"ACCESSCTL_DATABASE_URL": refused}),
        (["batch", "0"], 2, {}),
    )

    # -v really was on (debug lines were logged), and the sentinel is nowhere.
    everything = db.captured.text()
    assert '"level": "debug"' in everything
    assert db.sentinel not in everything
    assert quote(db.password, safe="") not in everything

    dump = dump_every_table(db.url)
    for table in (
        "public.users",
        "public.accesses",
        "public.errors",
        "public.batches",
        "dbos.workflow_status",
        "dbos.workflow_input",
        "dbos.workflow_output",
    ):
        assert dump[table], f"{table} is empty: the dump would prove nothing"
    for table, rows in dump.items():
        for row in rows:
            assert db.sentinel not in row, table
            assert quote(db.password, safe="") not in row, table


@needs_postgres
def test_in_process_runs_never_show_the_password(secret_database: SecretDatabase) -> None:
    """The rest of the commands through CliRunner, with debug logs: an exception would
    surface as ``result.exception``, and its text is searched too."""
    db = secret_database
    tool = Cli(db.url)
    assert tool("migrate").exit_code == 0
    known = tool.add_users(1)[0]
    submitted = tool("-v", "submit", "--skip-invalid", known, str(uuid.uuid4()), "bad", "--json")
    assert submitted.exit_code == 1, submitted.stderr
    batch_id = json.loads(submitted.stdout)["batch_id"]
    results = [
        submitted,
        tool("-v", "users", "list"),
        tool("-v", "errors", "--since", "1h", "--batch", batch_id),
        tool("-v", "status"),
        tool("-v", "status", batch_id, "--json"),
        tool("-v", "batch", "2", "--user", known, "--detach", "--json"),
        tool("-v", "config"),
        tool("-v", "errors", ACCESSCTL_DATABASE_URL=db.url.replace(":5432/", ":1/")),
    ]
    assert [r.exit_code for r in results] == [1, 0, 0, 0, 0, 0, 0, 3]
    for result in results:
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert db.sentinel not in result.stdout + result.stderr
        assert db.sentinel not in repr(result.exception)
    for table, rows in dump_every_table(db.url).items():
        assert not any(db.sentinel in row for row in rows), table


COMMANDS = [["migrate"], ["errors"], ["submit"], ["batch", "3"], ["status"], ["users", "list"]]


def test_a_refused_password_is_exit_3_and_never_shown() -> None:
    sentinel = f"SENTINEL{uuid.uuid4().hex}"
    password = make_password(sentinel)
    with FakePostgres() as server:
        url = encoded_url("alice", password, "127.0.0.1", server.port, "db")
        tool = Cli(url)
        for command in COMMANDS:
            result = tool("-v", *command)
            assert result.exit_code == 3, (command, result.stdout, result.stderr)
            assert result.exception is None or isinstance(result.exception, SystemExit)
            lines = [ln for ln in result.stderr.splitlines() if not ln.startswith("{")]
            assert len(lines) == 1, result.stderr
            assert "password authentication failed" in lines[0]
            assert f"alice:***@127.0.0.1:{server.port}/db" in lines[0]
            assert sentinel not in result.stdout + result.stderr
        # And from a real process, with debug logs.
        for command in (["migrate"], ["submit"]):
            done = tool.run("--log-format", "json", "-v", *command, timeout=60)
            assert done.returncode == 3, done.stderr
            assert "Traceback" not in done.stderr
            assert sentinel not in done.stdout + done.stderr
    # The password reached the server exactly as given: percent-decoding worked.
    assert server.passwords and set(server.passwords) == {password}


def test_passwords_are_hidden_wherever_a_url_carries_them() -> None:
    sentinel = f"SENTINEL{uuid.uuid4().hex}"
    password = make_password(sentinel)
    userinfo = encoded_url("u", password, "127.0.0.1", 5432, "db")
    in_query = f"postgresql+psycopg://u@127.0.0.1/db?password={quote(password, safe='')}&sslpassword={sentinel}x"
    for url in (userinfo, in_query):
        shown = hide_password(url)
        assert sentinel not in shown and "***" in shown
        assert password in url_secrets(url)
    assert hide_password("not a url " + sentinel) == "<malformed URL>"
    # A driver message that quoted a password (none known does; this one is made up).
    exc = RuntimeError(f"connection failed for {password} and {sentinel}x")
    assert sentinel not in describe_db_error(exc, url=in_query)
    assert sentinel not in describe_db_error(exc, password, url=in_query)


# --- a provider that echoes the request back (issue #12) ----------------------------------

PROVIDER_TOKEN = "tok-SENTINEL-5b7e1d"
QUERY_SECRET = "QSECRET-SENTINEL-91c4"


def _decoded_forms(value: object) -> list[str]:
    """A cell as text, and as DBOS may have serialized it (base64 of a pickle): the raw
    text, the base64-decoded bytes and the unpickled object's repr."""
    import base64
    import binascii
    import contextlib
    import pickle

    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    forms = [text]
    if isinstance(value, (str, bytes)) and len(text) >= 8:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return forms
        forms.append(raw.decode("latin-1"))
        # Not a pickle: the decoded bytes were searched already. (Our own test database:
        # unpickling it is safe.)
        with contextlib.suppress(Exception):
            forms.append(repr(pickle.loads(raw)))
    return forms


def dump_every_table_decoded(url: str) -> dict[str, list[str]]:
    """Every cell of every table (the application's and DBOS's, on either backend) in
    every decoded form, per table."""
    engine = sa.create_engine(url)
    dump: dict[str, list[str]] = {}
    try:
        inspector = sa.inspect(engine)
        schemas = [None] if engine.dialect.name == "sqlite" else ["public", "dbos"]
        with engine.connect() as conn:
            for schema in schemas:
                for table in inspector.get_table_names(schema=schema):
                    name = f'"{schema}"."{table}"' if schema else f'"{table}"'
                    forms: list[str] = []
                    for row in conn.execute(sa.text(f"SELECT * FROM {name}")):
                        for cell in row:
                            forms.extend(_decoded_forms(cell))
                    dump[f"{schema or 'main'}.{table}"] = forms
    finally:
        engine.dispose()
    return dump


def _run_against_an_echoing_provider(
    run: Any, users: list[str], provider_url: str
) -> list[tuple[str, str]]:
    """A 401 and a 500 (twice) that quote the request's Authorization header and query
    string, then every command that shows what was stored; their (stdout, stderr)."""
    from accessctl.testing.provider import FakeProvider

    outputs: list[tuple[str, str]] = []
    for mode in ("echo-401", "echo-500"):
        with FakeProvider(hostile=mode) as provider:
            env = {
                "ACCESSCTL_PROVIDER_URL": provider.url + provider_url,
                "ACCESSCTL_PROVIDER_TOKEN": PROVIDER_TOKEN,
                "ACCESSCTL_PROVIDER_MAX_ATTEMPTS": "2",
            }
            done = run("batch", "2", *[a for u in users for a in ("--user", u)], "--json", **env)
            assert {c.answered for c in provider.calls} == {int(mode[-3:])}
            assert all(c.authorization for c in provider.calls)
            outputs.append((done.stdout, done.stderr))
            for args in (["errors", "--json"], ["errors"], ["config", "--json"], ["status"]):
                shown = run(*args, **env)
                outputs.append((shown.stdout, shown.stderr))
    return outputs


def _assert_no_provider_secret(outputs: list[tuple[str, str]], url: str) -> None:
    everything = "\n".join(out + err for out, err in outputs)
    # Non-vacuous: the echo was stored (redacted), and logs were on.
    assert "Authorization: ***" in everything
    assert "api_key=***" in everything
    assert '"level": "debug"' in everything
    assert PROVIDER_TOKEN not in everything and QUERY_SECRET not in everything
    dump = dump_every_table_decoded(url)
    outputs_table = next(t for t in dump if t.endswith(".operation_outputs"))
    # The step outputs were decoded: the redacted echo is visible in them.
    assert any("Authorization: ***" in form for form in dump[outputs_table])
    for table in ("errors", "workflow_status", "workflow_input"):
        assert any(t.endswith(f".{table}") and dump[t] for t in dump), table
    for table, forms in dump.items():
        for form in forms:
            assert PROVIDER_TOKEN not in form, table
            assert QUERY_SECRET not in form, table


def test_an_echoing_provider_leaves_no_token_anywhere(cli: Cli) -> None:
    users = cli.add_users(1)

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        options: dict[str, Any] = dict(env)
        done = cli.run("--log-format", "json", "-v", *args, **options)
        assert done.returncode in (0, 1), done.stderr
        assert "Traceback" not in done.stderr
        return done

    outputs = _run_against_an_echoing_provider(run, users, f"?api_key={QUERY_SECRET}&x=1")
    _assert_no_provider_secret(outputs, cli.database_url)


@needs_postgres
def test_an_echoing_provider_with_a_secret_database(secret_database: SecretDatabase) -> None:
    """Both secrets at once: the provider's token and the database's password."""
    db = secret_database
    db.run("migrate")
    known = json.loads(
        db.run("users", "add", "--name", "Ada", "--email", "ada@example.com", "--json").stdout
    )["id"]

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return db.run(*args, expect=None, **env)

    outputs = _run_against_an_echoing_provider(run, [known], f"?api_key={QUERY_SECRET}")
    assert all(code in (0, 1) for _, code, _, _ in db.captured.outputs)
    _assert_no_provider_secret(outputs, db.url)
    everything = db.captured.text()
    assert db.sentinel not in everything
    for table, forms in dump_every_table_decoded(db.url).items():
        assert not any(db.sentinel in form for form in forms), table
