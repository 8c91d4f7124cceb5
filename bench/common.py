"""Shared plumbing for the benchmarks: databases, processes, samplers, profiles, facts.

Every benchmark drives the installed ``accessctl`` command as an operator would, against a
database of its own: a temporary ``XDG_DATA_HOME`` (so the *default* embedded SQLite file is
used) or a Postgres database named ``accessctl_bench_*`` that it creates and drops. Names the
product defines (queues, seed users, workflow IDs) are imported from it, never restated.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from accessctl.settings import SEED_USER_IDS as SEED_USER_IDS
from accessctl.workflows import QUEUE_NAME as QUEUE_NAME

ROOT = Path(__file__).resolve().parent.parent
ACCESSCTL = str(Path(sys.executable).parent / "accessctl")
PYTHON = sys.executable
ADMIN_URL = os.environ.get(
    "ACCESSCTL_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
LOG_DIR = Path(tempfile.gettempdir()) / f"accessctl-bench-{os.getpid()}"
PYCACHE = Path(tempfile.gettempdir()) / "accessctl-bench-pycache"


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def backends(*, sqlite_first: bool = False) -> list[str]:
    """The backends to measure: SQLite always, Postgres when it answers."""
    kinds = ["postgres"] if postgres_available() else []
    return ["sqlite", *kinds] if sqlite_first else [*kinds, "sqlite"]


# --- databases --------------------------------------------------------------------------


@dataclass
class Backend:
    """A database of the benchmark's own, and the environment that points accessctl at it."""

    kind: str  # "sqlite" or "postgres"
    url: str
    env: dict[str, str]
    dbname: str | None = None
    tmpdir: Path | None = None

    @property
    def table(self) -> str:
        """DBOS's workflow table: in schema ``dbos`` on Postgres."""
        return "workflow_status" if self.kind == "sqlite" else "dbos.workflow_status"

    def engine(self) -> sa.Engine:
        if self.kind == "sqlite":
            return sa.create_engine(self.url, connect_args={"timeout": 30})
        return sa.create_engine(self.url, pool_size=2, max_overflow=2)

    def rows(self, sql: str, **params: Any) -> list[Any]:
        engine = self.engine()
        try:
            with engine.connect() as conn:
                return list(conn.execute(sa.text(sql), params).all())
        finally:
            engine.dispose()

    def scalar(self, sql: str, **params: Any) -> Any:
        return self.rows(sql, **params)[0][0]


def base_env(**extra: str) -> dict[str, str]:
    """The machine's environment less any accessctl/DBOS settings, plus JSON logs. Python
    caches bytecode as on an operator's machine (this sandbox's shell sets
    PYTHONDONTWRITEBYTECODE), in a cache outside the work tree."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCESSCTL_", "DBOS_"))
        and k not in ("XDG_DATA_HOME", "PYTHONDONTWRITEBYTECODE")
    }
    return {**env, "PYTHONPYCACHEPREFIX": str(PYCACHE), "ACCESSCTL_LOG_FORMAT": "json", **extra}


def _admin(sql: str) -> Any:
    engine = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            result = conn.execute(sa.text(sql))
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


def postgres_available() -> bool:
    try:
        _admin("SELECT 1")
        return True
    except Exception:
        return False


def create_database(tag: str) -> tuple[str, str]:
    """A new, empty Postgres database: (its URL, its name)."""
    name = f"accessctl_bench_{tag}_{uuid.uuid4().hex[:8]}"
    _admin(f'CREATE DATABASE "{name}"')
    return sa.make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False), name


def drop_database(name: str | None) -> None:
    if name is not None:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def backend(kind: str, tag: str, *, users: bool = True) -> Iterator[Backend]:
    """A fresh, migrated database (holding the seed users unless ``users=False``)."""
    if kind == "sqlite":
        tmpdir = Path(tempfile.mkdtemp(prefix=f"accessctl-bench-{tag}-"))
        # The default embedded database: no URL, only a data home of our own.
        url = f"sqlite:///{tmpdir / 'accessctl' / 'accessctl.sqlite'}"
        b = Backend(kind, url, base_env(XDG_DATA_HOME=str(tmpdir)), None, tmpdir)
    else:
        url, name = create_database(tag)
        b = Backend(kind, url, base_env(ACCESSCTL_DATABASE_URL=url), name)
    try:
        run_cli(b.env, ["migrate"], f"{tag}-migrate", timeout=120)
        if users:
            people = [f"u{i},u{i}@x.test,{u}" for i, u in enumerate(SEED_USER_IDS)]
            csv = "\n".join(["name,email,id", *people])
            run_cli(b.env, ["users", "import", "-"], f"{tag}-users", stdin=csv)
        yield b
    finally:
        drop_database(b.dbname)
        if b.tmpdir is not None:
            shutil.rmtree(b.tmpdir, ignore_errors=True)


def set_shared_limit(env: dict[str, str], tag: str) -> None:
    """Store the limit (and concurrency) that ``env`` names as the database's shared one,
    as an operator would with `accessctl limit set`: runs then follow it."""
    args = ["limit", "set", env["ACCESSCTL_RATE_LIMIT"]]
    if env.get("ACCESSCTL_CONCURRENCY"):
        args += ["--concurrency", env["ACCESSCTL_CONCURRENCY"]]
    run_cli(env, args, f"{tag}-limit")


def pg_counters(b: Backend) -> dict[str, int]:
    """This database's commit and row counters (Postgres only; empty on SQLite)."""
    if b.kind != "postgres":
        return {}
    engine = b.engine()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
            row = conn.execute(
                sa.text(
                    "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted "
                    "FROM pg_stat_database WHERE datname = current_database()"
                )
            ).one()
        return dict(row._mapping)
    finally:
        engine.dispose()


# --- processes --------------------------------------------------------------------------


def stderr_path(name: str) -> Path:
    """Where process ``name`` writes its stderr (its JSON logs)."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return LOG_DIR / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.stderr.log"


def find_event(name: str, events: Sequence[str]) -> dict[str, Any] | None:
    """The first JSON log line of process ``name`` whose ``event`` is one of ``events``."""
    path = stderr_path(name)
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") in events:
                return event
    return None


def event_epoch(event: dict[str, Any]) -> float:
    """A log line's ``timestamp`` (ISO 8601, UTC) as epoch seconds."""
    moment = datetime.fromisoformat(str(event["timestamp"]))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def run_cli(
    env: dict[str, str],
    args: list[str],
    name: str,
    *,
    timeout: float = 600,
    check: bool = True,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``accessctl ARGS`` to completion; stderr (JSON logs) goes to a log file."""
    with open(stderr_path(name), "ab") as err:
        result = subprocess.run(
            [ACCESSCTL, *args],
            env=env,
            input=stdin,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=timeout,
            check=False,
        )
    if check and result.returncode not in (0, 1):
        raise RuntimeError(f"accessctl {' '.join(args)} exited {result.returncode}; see {LOG_DIR}")
    return result


@dataclass
class Finished:
    returncode: int
    wall: float
    cpu: float  # user + system seconds
    maxrss_kib: int


@dataclass
class Proc:
    """A child process whose CPU time and peak RSS we collect with wait4."""

    popen: subprocess.Popen[bytes]
    started: float
    name: str
    result: Finished | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> Finished | None:
        if self.result is None:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid == 0:
                return None
            self.popen.returncode = os.waitstatus_to_exitcode(status)
            wall = time.monotonic() - self.started
            cpu = usage.ru_utime + usage.ru_stime
            self.result = Finished(self.popen.returncode, wall, cpu, usage.ru_maxrss)
        return self.result

    def wait(self, timeout: float) -> Finished:
        deadline = time.monotonic() + timeout
        while (done := self.poll()) is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"{self.name} still running after {timeout:.0f}s")
            time.sleep(0.02)
        return done

    def kill(self, sig: int = signal.SIGKILL) -> Finished:
        """Send ``sig``, then SIGKILL if the process is still there 15 s later."""
        for s in (sig, signal.SIGKILL):
            if self.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, s)
                deadline = time.monotonic() + 15
                while self.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
        return self.wait(60)


def spawn(
    cmd: list[str], env: dict[str, str], name: str, *, stdout: Any = subprocess.DEVNULL
) -> Proc:
    with open(stderr_path(name), "ab") as err:
        popen = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=err)
    return Proc(popen, time.monotonic(), name)


def spawn_cli(env: dict[str, str], args: list[str], name: str) -> Proc:
    return spawn([ACCESSCTL, *args], env, name)


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a live process, in KiB; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0, 0
    values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M))
    return int(values.get("VmRSS", 0)), int(values.get("VmHWM", 0))


def cpu_busy_sample() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    parts = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(parts) - parts[3] - parts[4], sum(parts)


class Sampler:
    """Calls ``probe`` every ``interval`` seconds in a thread, keeping (t, value) pairs."""

    def __init__(self, probe: Callable[[], Any], interval: float) -> None:
        self.probe = probe
        self.interval = interval
        self.samples: list[tuple[float, Any]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append((time.monotonic() - self._t0, self.probe()))
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class MachineCpu:
    """Busy fraction of all cores between enter and exit (1.0 = every core busy)."""

    def __enter__(self) -> MachineCpu:
        self.start = cpu_busy_sample()
        self.busy = float("nan")
        return self

    def __exit__(self, *exc: object) -> None:
        end = cpu_busy_sample()
        total = end[1] - self.start[1]
        self.busy = (end[0] - self.start[0]) / total if total else float("nan")


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# --- profiles ---------------------------------------------------------------------------


def start_profile(pid: int, out: Path, duration: float) -> subprocess.Popen[bytes] | None:
    """py-spy (raw format, 50 Hz) on ``pid``, if it can be had: on PATH or through ``uvx``
    (never added to the project)."""
    cmd = [found] if (found := shutil.which("py-spy")) else None
    if cmd is None and (uvx := shutil.which("uvx")):
        probe = subprocess.run([uvx, "py-spy", "--version"], capture_output=True, timeout=180)
        cmd = [uvx, "py-spy"] if probe.returncode == 0 else None
    args = f"record --pid {pid} --format raw --rate 50 --nonblocking --duration {int(duration)}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    return subprocess.Popen([*cmd, *args.split(), "--output", str(out)], **quiet) if cmd else None


def _frame(frame: str) -> tuple[str, str]:
    """(``function (dir/file.py)``, its package) of a py-spy raw frame ``func (path:line)``."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame, frame
    func, path = match.groups()
    parts = Path(path).parts  # py-spy shortens paths to the module's: "sqlalchemy/engine/..."
    package = parts[0] if len(parts) > 1 and not path.startswith("/") else Path(path).stem
    return f"{func} ({'/'.join(parts[-2:])})", package


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """From py-spy's raw output, in % of samples: self time by function, inclusive time by
    package, and by role -- a thread's outermost accessctl (else dbos) function."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    roles: Counter[str] = Counter()
    for line in path.read_text().splitlines() if path.exists() else []:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        self_time[frames[-1][0]] += count
        for package in {p for _, p in frames}:
            inclusive[package] += count
        owned = [f for pkg in ("accessctl", "dbos") for f, p in frames if p == pkg]
        roles[owned[0] if owned else "other"] += count
    total = sum(roles.values())
    if not total:
        return {"available": False}

    def shares(counter: Counter[str], n: int | None = None) -> list[tuple[str, float]]:
        return [(name, round(100 * k / total, 1)) for name, k in counter.most_common(n)]

    return {
        "available": True,
        "samples": total,
        "self": shares(self_time, top),
        "inclusive": shares(inclusive),
        "roles": shares(roles),
    }


# --- facts about this machine -----------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    def grep(path: str, pattern: str) -> str:
        match = re.search(pattern, Path(path).read_text())
        return match.group(1).strip() if match else ""

    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(int(grep("/proc/meminfo", r"MemTotal:\s+(\d+)") or 0) / 1024**2, 1),
        "cpu": grep("/proc/cpuinfo", r"model name\s*:\s*(.*)"),
        "kernel": platform.release(),
        "load_average_at_start": load_average(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def versions() -> dict[str, str]:
    """Versions of what ran; accessctl's from the source tree (installed metadata can lag
    an editable install), with its pinned workflow version."""
    from importlib.metadata import version

    import accessctl
    from accessctl.workflows import WORKFLOW_VERSION

    out = {
        "python": platform.python_version(),
        **{name: version(name) for name in ("dbos", "sqlalchemy", "psycopg")},
        "sqlite": sqlite3.sqlite_version,
        "accessctl": f"{accessctl.__version__} (workflows {WORKFLOW_VERSION})",
        "postgres": "unavailable",
    }
    with contextlib.suppress(Exception):
        out["postgres"] = str(_admin("SHOW server_version"))
    return out


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def save_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
