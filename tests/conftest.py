"""Shared fixtures: every workflow test runs on SQLite and, when a Postgres URL is given
(ACCESSCTL_TEST_POSTGRES_URL, a server URL whose role may create databases), on Postgres
too, each test in a database of its own."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import typer.main
import typer.testing
from typer.testing import CliRunner, Result

from accessctl.cli import app
from accessctl.exceptions import AccessctlError
from accessctl.settings import parse_rate_limit
from forkserver import ForkedPopen, ForkServer

POSTGRES_URL = os.environ.get("ACCESSCTL_TEST_POSTGRES_URL", "").strip()
# A limiter fast enough for tests, slow enough to be visible: 5 starts per 0.5 s.
FAST_LIMIT = "5/0.5"
SEED = [f"00000000-0000-0000-0000-00000000000{i}" for i in range(4)]
ACCESSCTL_BIN = str(Path(sys.executable).parent / "accessctl")
# For a child whose start-up timing is the test's subject: under coverage (CI), every
# Python child would otherwise first start coverage.py (which also imports sqlite3).
UNMEASURED = {"COVERAGE_PROCESS_CONFIG": ""}
# The accessctl processes of Cli.run and Cli.popen are forked from a server that has
# imported accessctl and its libraries already (forkserver.py); 0 starts each from its
# script instead, as every test whose subject is the interpreter's start-up does anyway.
FORK_SERVER = ForkServer() if os.environ.get("ACCESSCTL_TEST_FORK_SERVER", "1") != "0" else None


@pytest.fixture(autouse=True)
def isolated_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """No test sees the developer's configuration, database or working directory."""
    for name in list(os.environ):
        if name.startswith(("ACCESSCTL_", "DBOS_")) and name != "ACCESSCTL_TEST_POSTGRES_URL":
            monkeypatch.delenv(name)
    # The accessctl processes the tests start cache their bytecode as an operator's do
    # (this sandbox's shell sets the variable): each start would otherwise compile
    # accessctl again, a third of a second or more of CPU.
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    return home


# Typer's CliRunner builds the click command from the app on every invoke (about 12 ms of
# CPU), and the suite invokes the CLI in-process thousands of times. A click command is
# made to be invoked again (each invocation makes its own context), and an accessctl
# process builds it once too: build it once per test process.
typer.testing._get_command = functools.cache(typer.main.get_command)  # type: ignore[attr-defined]


def punctual_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every provider attempt counts as reaching its call in time. A loaded machine (the
    suite runs on several processes) can take more than half the call slack from a start to
    its call, which sends the try round again; tests about something else must not
    depend on that. The ownership half of the check stays real."""
    from accessctl import workflows

    attempt_state = workflows._attempt_state
    monkeypatch.setattr(workflows, "_attempt_state", lambda w: (0.0, attempt_state(w)[1]))


def create_postgres_database(
    base_url: str = POSTGRES_URL, template: str | None = None
) -> tuple[str, str]:
    """A fresh database on the test server, empty or a copy of ``template``: (name, URL)."""
    name = f"accessctl_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
    copy = f' TEMPLATE "{template}"' if template else ""
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"{copy}'))
    admin.dispose()
    url = sa.make_url(base_url).set(database=name).render_as_string(hide_password=False)
    return name, url


def drop_postgres_database(name: str, base_url: str = POSTGRES_URL) -> None:
    admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


BACKENDS = [
    "sqlite",
    pytest.param(
        "postgres",
        marks=pytest.mark.skipif(not POSTGRES_URL, reason="ACCESSCTL_TEST_POSTGRES_URL not set"),
    ),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class DatabasePool:
    """Postgres test databases made one ahead, and dropped after use, in threads of their
    own: a CREATE DATABASE takes about a third of a second and a DROP up to a second,
    mostly the server's, which the tests meanwhile overlap. Keyed by template (None:
    empty)."""

    def __init__(self) -> None:
        self._maker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-databases")
        self._dropper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-drops")
        self._next: dict[str | None, Future[tuple[str, str]]] = {}

    def _make(self, template: str | None) -> Future[tuple[str, str]]:
        return self._maker.submit(create_postgres_database, POSTGRES_URL, template)

    def take(self, template: str | None) -> tuple[str, str]:
        """A database nobody has used: (name, URL)."""
        made = self._next.pop(template, None) or self._make(template)
        self._next[template] = self._make(template)
        return made.result()

    def give_back(self, name: str) -> None:
        """Drop a used database, in the background."""
        self._dropper.submit(drop_postgres_database, name)

    def close(self) -> None:
        for made in self._next.values():
            with contextlib.suppress(Exception):
                drop_postgres_database(made.result()[0])
        self._maker.shutdown()
        self._dropper.shutdown(wait=True)


@pytest.fixture(scope="session")
def database_pool() -> Iterator[DatabasePool]:
    pool = DatabasePool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def database_url(
    backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    migrated_templates: MigratedTemplates,
    database_pool: DatabasePool,
) -> Iterator[str]:
    """A database of the test's own: a copy of the run's migrated template when the test
    uses ``cli``, else empty (``fresh_cli``, or a test that migrates it itself)."""
    template = None
    if "cli" in request.fixturenames:
        template = migrated_templates.get(backend)
    if backend == "sqlite":
        path = tmp_path / "accessctl.sqlite"
        if template is not None:
            shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
        return
    # Straight from the template: one CREATE DATABASE per test, made while the last ran.
    name, url = database_pool.take(template)
    try:
        yield url
    finally:
        close_query_engine(url)
        database_pool.give_back(name)


# Commands that apply the shared rate limit (limits.py): a test that gives one of them
# another ACCESSCTL_RATE_LIMIT/ACCESSCTL_CONCURRENCY means "the shared limit is now this",
# and sets it as an operator would, with `accessctl limit set`, before the run.
LIMITED_COMMANDS = {"submit", "batch", "retry", "worker"}
LIMIT_VARIABLES = ("ACCESSCTL_RATE_LIMIT", "ACCESSCTL_CONCURRENCY")


def start_accessctl(
    args: list[str], *, new_interpreter: bool = False, **popen: Any
) -> subprocess.Popen[Any]:
    """``accessctl ARGS`` in a process of its own (``subprocess.Popen``'s options): forked
    from the fork server, or the installed script in a new interpreter where the
    interpreter's start-up is what is tested."""
    command = [ACCESSCTL_BIN, *args]
    if FORK_SERVER is None or new_interpreter:
        return subprocess.Popen(command, **popen)
    return ForkedPopen(FORK_SERVER, command, **popen)


def run_accessctl(
    args: list[str], *, input: str | None = None, timeout: float = 120, **popen: Any
) -> subprocess.CompletedProcess[str]:
    """``start_accessctl`` to its end, text output captured (killed after ``timeout``)."""
    with start_accessctl(
        args,
        stdin=subprocess.PIPE if input is not None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    ) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    return subprocess.CompletedProcess(proc.args, proc.wait(), out, err)


# The tests' own queries on a Postgres database, through one pooled engine per database
# for the test: they poll (wait_for, every 50 ms), and a new engine per query cost 2.3 ms
# of CPU here plus a server backend's start. SQLite keeps a new engine per query: it is
# cheap there, and no connection then outlives a query on a file a test may replace.
_QUERY_ENGINES: dict[str, sa.Engine] = {}


@contextlib.contextmanager
def query_connection(url: str) -> Iterator[sa.Connection]:
    from accessctl.db import make_engine

    if url.startswith("sqlite"):
        sqlite_engine = make_engine(url)
        try:
            with sqlite_engine.connect() as conn:
                yield conn
        finally:
            sqlite_engine.dispose()
        return
    if url not in _QUERY_ENGINES:
        _QUERY_ENGINES[url] = make_engine(url, pool_size=1)
    with _QUERY_ENGINES[url].connect() as conn:
        yield conn


def close_query_engine(url: str) -> None:
    engine = _QUERY_ENGINES.pop(url, None)
    if engine is not None:
        engine.dispose()


@pytest.fixture(autouse=True)
def _close_query_engines() -> Iterator[None]:
    """Close the tests' query connections when the test ends (``database_url`` closes its
    own before it drops the database)."""
    yield
    for url in list(_QUERY_ENGINES):
        close_query_engine(url)


@dataclass
class Cli:
    """The real CLI, in-process (Typer's CliRunner), against one test database."""

    database_url: str
    env: dict[str, str] = field(default_factory=dict)
    runner: CliRunner = field(default_factory=CliRunner)
    # Start run/popen's processes from the installed script, not the fork server: for
    # tests whose subject is the interpreter's start-up.
    new_interpreter: bool = False

    def _apply_shared_limit(self, args: tuple[str, ...], env: dict[str, str]) -> None:
        wanted = {k: env[k] for k in LIMIT_VARIABLES if k in env}
        current = self.base_env()
        if not wanted or not LIMITED_COMMANDS & set(args):
            return
        if all(current.get(k) == v for k, v in wanted.items()):
            return
        try:  # a malformed value is the test's subject: the command itself must refuse it
            if "ACCESSCTL_RATE_LIMIT" in wanted:
                parse_rate_limit(wanted["ACCESSCTL_RATE_LIMIT"], "test")
            if "ACCESSCTL_CONCURRENCY" in wanted and int(wanted["ACCESSCTL_CONCURRENCY"]) < 1:
                return
        except (AccessctlError, ValueError):
            return
        command = ["limit", "set"]
        if "ACCESSCTL_RATE_LIMIT" in wanted:
            command.append(wanted["ACCESSCTL_RATE_LIMIT"])
        if "ACCESSCTL_CONCURRENCY" in wanted:
            command += ["--concurrency", wanted["ACCESSCTL_CONCURRENCY"]]
        result = self.runner.invoke(app, command, env={**current, **env}, catch_exceptions=False)
        assert result.exit_code == 0, result.output + result.stderr
        self.env.update(wanted)

    def base_env(self) -> dict[str, str]:
        return {
            "ACCESSCTL_DATABASE_URL": self.database_url,
            "ACCESSCTL_RATE_LIMIT": FAST_LIMIT,
            "ACCESSCTL_LOG_FORMAT": "json",
            "ACCESSCTL_SHUTDOWN_GRACE": "3",
            **self.env,
        }

    def __call__(self, *args: str, input: str | None = None, **env: str) -> Result:
        self._apply_shared_limit(args, env)
        return self.runner.invoke(
            app, list(args), input=input, env={**self.base_env(), **env}, catch_exceptions=False
        )

    def json(self, *args: str, **env: str) -> Any:
        result = self(*args, **env)
        assert result.exit_code in (0, 1), result.output + result.stderr
        return json.loads(result.stdout)

    def run(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        """``accessctl`` in a process of its own, to its end (killed after ``timeout``)."""
        self._apply_shared_limit(args, env)
        return run_accessctl(
            list(args),
            timeout=timeout,
            new_interpreter=self.new_interpreter,
            env={**os.environ, **self.base_env(), **env},
        )

    def popen(self, *args: str, **env: str) -> subprocess.Popen[str]:
        """``accessctl`` in a process of its own: forked from the fork server, or the
        installed script in a new interpreter (``new_interpreter``)."""
        self._apply_shared_limit(args, env)
        return start_accessctl(
            list(args),
            new_interpreter=self.new_interpreter,
            env={**os.environ, **self.base_env(), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def engine(self) -> sa.Engine:
        from accessctl.db import make_engine

        return make_engine(self.database_url)

    def scalar(self, sql: str, **params: Any) -> Any:
        with query_connection(self.database_url) as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with query_connection(self.database_url) as conn:
            return list(conn.execute(sa.text(sql), params))

    @property
    def workflow_table(self) -> str:
        return (
            "workflow_status" if self.database_url.startswith("sqlite") else "dbos.workflow_status"
        )

    def add_users(self, count: int) -> list[str]:
        ids = [str(uuid.uuid4()) for _ in range(count)]
        lines = ["name,email,id"] + [
            f"User {i},user{i}-{u[:8]}@example.com,{u}" for i, u in enumerate(ids)
        ]
        result = self("users", "import", "-", input="\n".join(lines) + "\n")
        assert result.exit_code == 0, result.output + result.stderr
        return ids


# Test processes per core for `-n auto` (pyproject.toml's addopts). Most of a test's time
# is spent waiting on the accessctl processes and timers it started, so three per core keep
# two cores busy. Under coverage each process needs about half as much CPU again, and at
# three per core a 2-core machine was so loaded that a provider call reached the fake
# provider later than the limiter's call slack allows (test_provider.py's limit test failed
# two CI runs in four). More than eight would open more Postgres connections than a default
# server's 100.
WORKERS_PER_CORE = 3
WORKERS_PER_CORE_UNDER_COVERAGE = 2
MAX_WORKERS = 8


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own override
    coverage = sys.modules.get("coverage")
    measured = coverage is not None and coverage.Coverage.current() is not None
    per_core = WORKERS_PER_CORE_UNDER_COVERAGE if measured else WORKERS_PER_CORE
    return min(MAX_WORKERS, per_core * len(os.sched_getaffinity(0)))


# Where the run's migrated templates are recorded, shared by every xdist worker: set by
# the controlling process before the workers start (they inherit its environment).
TEMPLATES_DIR_VARIABLE = "ACCESSCTL_TEST_TEMPLATES_DIR"


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller, or a run without xdist
        os.environ[TEMPLATES_DIR_VARIABLE] = tempfile.mkdtemp(prefix="accessctl-templates-")


def pytest_unconfigure(config: pytest.Config) -> None:
    """The controller drops the run's Postgres template once every worker is done."""
    if FORK_SERVER is not None:
        FORK_SERVER.close()
    if hasattr(config, "workerinput"):
        return
    root = Path(os.environ.pop(TEMPLATES_DIR_VARIABLE, "") or "/nonexistent")
    record = root / "postgres.template"
    if record.exists():
        with contextlib.suppress(Exception):
            drop_postgres_database(record.read_text())
    shutil.rmtree(root, ignore_errors=True)


class MigratedTemplates:
    """One migrated database per backend per test run, copied for each test: a migrate
    (Alembic and DBOS's migrations) costs about 1.7 s of CPU, a copy a few milliseconds.
    SQLite: the template file; Postgres: a template database (``CREATE DATABASE ...
    TEMPLATE``). Made once for the whole run, by whichever xdist worker asks first, under
    a file lock; the others wait for it and read its name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._known: dict[str, str] = {}

    def get(self, backend: str) -> str:
        if backend not in self._known:
            with open(self.root / f"{backend}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                record = self.root / f"{backend}.template"
                if not record.exists():
                    record.write_text(_make_template(backend, self.root))
                self._known[backend] = record.read_text()
        return self._known[backend]


@pytest.fixture(scope="session")
def migrated_templates() -> MigratedTemplates:
    return MigratedTemplates(Path(os.environ[TEMPLATES_DIR_VARIABLE]))


def _make_template(backend: str, root: Path) -> str:
    if backend == "sqlite":
        path = root / "template.sqlite"
        url = f"sqlite:///{path}"
    else:
        name, url = create_postgres_database()
    result = Cli(url)("migrate")
    assert result.exit_code == 0, result.output + result.stderr
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        if backend == "sqlite":
            # Everything into the main file, which is what is copied.
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        else:
            # A template must have no other session while it is copied.
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
    engine.dispose()
    return str(path) if backend == "sqlite" else name


@pytest.fixture
def cli(database_url: str) -> Cli:
    """The CLI against a migrated database of its own (a copy of the run's template,
    made by ``database_url``)."""
    return Cli(database_url)


@pytest.fixture
def fresh_cli(database_url: str) -> Cli:
    """The CLI against a database nobody has migrated."""
    return Cli(database_url)
