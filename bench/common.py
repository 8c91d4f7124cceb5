"""Shared plumbing for the benchmarks: databases, processes, samplers, profiles, facts.

Every benchmark drives the installed ``accessctl`` command as an operator would, against a
database of its own: a temporary ``XDG_DATA_HOME`` (so the *default* embedded SQLite file is
used) or a Postgres database named ``accessctl_bench_*`` that it creates and drops.
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

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV_BIN = Path(sys.executable).parent
ACCESSCTL = str(
    ROOT / ".venv" / "bin" / "accessctl"
    if (ROOT / ".venv" / "bin" / "accessctl").exists()
    else VENV_BIN / "accessctl"
)
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
ADMIN_URL = os.environ.get(
    "ACCESSCTL_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
SEED_USERS = tuple(f"00000000-0000-0000-0000-00000000000{i}" for i in range(4))
REQUEST_QUEUE = "access-requests"
BATCH_QUEUE = "access-batches"
LOG_DIR = Path(tempfile.gettempdir()) / f"accessctl-bench-{os.getpid()}"
PYCACHE = Path(tempfile.gettempdir()) / "accessctl-bench-pycache"


def log(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


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
        return self.sys("workflow_status")

    def sys(self, name: str) -> str:
        """A DBOS system table: schema ``dbos`` on Postgres, none on SQLite."""
        return name if self.kind == "sqlite" else f"dbos.{name}"

    def engine(self) -> sa.Engine:
        if self.kind == "sqlite":
            return sa.create_engine(self.url, connect_args={"timeout": 30})
        return sa.create_engine(self.url, pool_size=2, max_overflow=2)

    def scalar(self, sql: str, **params: Any) -> Any:
        engine = self.engine()
        try:
            with engine.connect() as conn:
                return conn.execute(sa.text(sql), params).scalar()
        finally:
            engine.dispose()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        engine = self.engine()
        try:
            with engine.connect() as conn:
                return list(conn.execute(sa.text(sql), params).all())
        finally:
            engine.dispose()


def base_env(**extra: str) -> dict[str, str]:
    """The machine's environment less any accessctl/DBOS settings, plus JSON logs."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCESSCTL_", "DBOS_"))
        and k not in ("XDG_DATA_HOME", "PYTHONDONTWRITEBYTECODE")
    }
    # As on an operator's machine, Python caches bytecode (this sandbox's shell sets
    # PYTHONDONTWRITEBYTECODE, which makes every start compile ~500 modules). The cache
    # lives outside the work tree.
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    env["ACCESSCTL_LOG_FORMAT"] = "json"
    env.update(extra)
    return env


def _admin() -> sa.Engine:
    return sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")


def postgres_available() -> bool:
    try:
        engine = _admin()
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


def create_backend(kind: str, tag: str) -> Backend:
    if kind == "sqlite":
        tmpdir = Path(tempfile.mkdtemp(prefix=f"accessctl-bench-{tag}-"))
        path = tmpdir / "accessctl" / "accessctl.sqlite"
        # The default embedded database: no URL, only a data home of our own.
        return Backend(kind, f"sqlite:///{path}", base_env(XDG_DATA_HOME=str(tmpdir)), None, tmpdir)
    name = f"accessctl_bench_{tag}_{uuid.uuid4().hex[:8]}"
    engine = _admin()
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    url = sa.make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    return Backend(kind, url, base_env(ACCESSCTL_DATABASE_URL=url), name)


def drop_backend(backend: Backend) -> None:
    if backend.kind == "sqlite":
        if backend.tmpdir is not None:
            shutil.rmtree(backend.tmpdir, ignore_errors=True)
        return
    engine = _admin()
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{backend.dbname}" WITH (FORCE)'))
    engine.dispose()


@contextlib.contextmanager
def backend(kind: str, tag: str, *, users: bool = True) -> Iterator[Backend]:
    """A fresh, migrated database holding the four seed users (so requests succeed)."""
    b = create_backend(kind, tag)
    try:
        if kind == "postgres":
            try:
                run_cli(b.env, ["migrate"], f"{tag}-migrate", timeout=120)
            except subprocess.TimeoutExpired:
                # Seen once on this shared machine while the code under test was being
                # edited: a migrate stuck on its lock. One fresh database, once.
                log(f"{tag}: migrate timed out; retrying on a fresh database")
                drop_backend(b)
                b = create_backend(kind, tag)
                run_cli(b.env, ["migrate"], f"{tag}-migrate", timeout=120)
        if users:
            for i, user_id in enumerate(SEED_USERS):
                run_cli(
                    b.env,
                    ["users", "add", "--id", user_id, "--name", f"u{i}", "--email", f"u{i}@x.test"],
                    f"{tag}-users",
                )
        elif kind == "sqlite":
            run_cli(b.env, ["migrate"], f"{tag}-migrate")
        yield b
    finally:
        drop_backend(b)


def set_shared_limit(env: dict[str, str], tag: str) -> None:
    """Store the limit (and concurrency) that ``env`` names as the database's shared one,
    as an operator would with `accessctl limit set`: runs then follow it (limits.py)."""
    args = ["limit", "set", env.get("ACCESSCTL_RATE_LIMIT") or "50/30"]
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
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return LOG_DIR / f"{safe}.stderr.log"


def stderr_file(name: str) -> Any:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return open(stderr_path(name), "ab")


def log_events(name: str) -> list[dict[str, Any]]:
    """The JSON log lines (``ACCESSCTL_LOG_FORMAT=json``) a process wrote to its stderr file."""
    path = stderr_path(name)
    if not path.exists():
        return []
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def event_epoch(event: dict[str, Any]) -> float | None:
    """A log line's ``timestamp`` (ISO 8601, UTC) as epoch seconds."""
    stamp = event.get("timestamp")
    if not stamp:
        return None
    moment = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def find_event(name: str, events: Sequence[str]) -> dict[str, Any] | None:
    """The first log line of process ``name`` whose ``event`` is one of ``events``."""
    return next((e for e in log_events(name) if e.get("event") in events), None)


def wait_for_event(
    name: str, events: Sequence[str], proc: Proc, timeout: float, interval: float = 0.01
) -> dict[str, Any] | None:
    """Tail process ``name``'s stderr file until a line with one of ``events`` appears (None
    if the process exits or ``timeout`` passes first)."""
    path = stderr_path(name)
    deadline = time.monotonic() + timeout
    offset = 0
    buffer = ""
    while time.monotonic() < deadline:
        if path.exists():
            with open(path, errors="replace") as fh:
                fh.seek(offset)
                chunk = fh.read()
                offset = fh.tell()
            buffer += chunk
            *lines, buffer = buffer.split("\n")
            for line in lines:
                if not line.startswith("{"):
                    continue
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("event") in events:
                        return event
        if proc.poll() is not None:
            return find_event(name, events)
        time.sleep(interval)
    return None


def run_cli(
    env: dict[str, str],
    args: list[str],
    name: str,
    *,
    timeout: float = 600,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``accessctl ARGS`` to completion; stderr (JSON logs) goes to a log file."""
    with stderr_file(name) as err:
        result = subprocess.run(
            [ACCESSCTL, *args],
            env=env,
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
        if self.result is not None:
            return self.result
        pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        self.popen.returncode = os.waitstatus_to_exitcode(status)
        self.result = Finished(
            self.popen.returncode,
            time.monotonic() - self.started,
            usage.ru_utime + usage.ru_stime,
            usage.ru_maxrss,
        )
        return self.result

    def wait(self, timeout: float) -> Finished:
        deadline = time.monotonic() + timeout
        while True:
            done = self.poll()
            if done is not None:
                return done
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"{self.name} still running after {timeout:.0f}s")
            time.sleep(0.02)

    def kill(self, sig: int = signal.SIGKILL) -> Finished:
        if self.result is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            deadline = time.monotonic() + 15
            while self.poll() is None:
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                time.sleep(0.02)
        assert self.result is not None
        return self.result


def spawn(
    cmd: list[str], env: dict[str, str], name: str, *, stdout: Any = subprocess.DEVNULL
) -> Proc:
    with stderr_file(name) as err:
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
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


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
    return os.getloadavg()[0]


# --- profiles ---------------------------------------------------------------------------


def py_spy_command() -> list[str] | None:
    """py-spy if it can be had: on PATH, or through ``uvx`` (never added to the project)."""
    found = shutil.which("py-spy")
    if found:
        return [found]
    uvx = shutil.which("uvx")
    if uvx:
        probe = subprocess.run(
            [uvx, "py-spy", "--version"], capture_output=True, text=True, timeout=180, check=False
        )
        if probe.returncode == 0:
            return [uvx, "py-spy"]
    return None


def start_profile(pid: int, out: Path, duration: float) -> subprocess.Popen[bytes] | None:
    cmd = py_spy_command()
    if cmd is None:
        return None
    return subprocess.Popen(
        [
            *cmd,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            "50",
            "--nonblocking",
            "--duration",
            str(int(duration)),
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


CATEGORIES = (
    ("accessctl", "(accessctl/"),
    ("dbos", "(dbos/"),
    ("sqlalchemy", "(sqlalchemy/"),
    ("psycopg (incl. waiting on the server)", "(psycopg/"),
    ("sqlite3 (incl. waiting on locks)", "(sqlite3/"),
    ("json", "(json/"),
    ("structlog/logging", "(structlog/"),
)
# What a thread is working on: the outermost matching frame names its role.
ROLES = (
    ("request workflows (file_request)", "file_request (accessctl/"),
    ("batch workflow (run_batch: counting rows)", "run_batch (accessctl/"),
    (
        "DBOS per-workflow bookkeeping (owner checks, outcome, checkpoint cleanup)",
        "_execute_workflow_wthread (dbos/",
    ),
    ("queue polling / dequeue (DBOS)", "queue_worker_thread (dbos/"),
    ("adopter / lease (accessctl)", "(accessctl/lease.py"),
    ("notification listener (DBOS)", "run_notifier (dbos/"),
    ("filing the batch (file_batch: one transaction)", "file_batch (accessctl/"),
    ("following the batch (run_attached)", "run_attached (accessctl/"),
    ("start-up: imports, launch, schema check", "main (accessctl/cli/__init__.py"),
)


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)".
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    func, path = match.groups()
    short = "/".join(Path(path).parts[-2:])
    return f"{func} ({short})"


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Self time by function and inclusive time by package, from py-spy's raw output."""
    if not path.exists():
        return {"available": False}
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    roles: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        self_time[_frame_name(frames[-1])] += count
        seen = set()
        for frame in frames:
            for category, needle in CATEGORIES:
                if needle in frame and category not in seen:
                    seen.add(category)
                    inclusive[category] += count
        role = next((name for name, needle in ROLES if any(needle in f for f in frames)), "other")
        roles[role] += count
    if not total:
        return {"available": False}
    return {
        "available": True,
        "samples": total,
        "self": [(name, round(100 * n / total, 1)) for name, n in self_time.most_common(top)],
        "inclusive": [(name, round(100 * n / total, 1)) for name, n in inclusive.most_common()],
        "roles": [(name, round(100 * n / total, 1)) for name, n in roles.most_common()],
    }


# --- facts about this machine -----------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    mem_kib = 0
    with contextlib.suppress(OSError):
        match = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
        mem_kib = int(match.group(1)) if match else 0
    cpu_model = ""
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu_model = match.group(1).strip() if match else ""
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "cpu": cpu_model,
        "kernel": platform.release(),
        "load_average_at_start": round(load_average(), 2),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _accessctl_version() -> str:
    """The version of the code that runs (the source tree; installed metadata can lag an
    editable install), with its pinned workflow version."""
    import accessctl
    from accessctl.workflows import WORKFLOW_VERSION

    return f"{accessctl.__version__} (workflows {WORKFLOW_VERSION})"


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out: dict[str, str] = {
        "python": platform.python_version(),
        "dbos": version("dbos"),
        "sqlalchemy": version("sqlalchemy"),
        "psycopg": version("psycopg"),
        "sqlite": sqlite3.sqlite_version,
        "accessctl": _accessctl_version(),
    }
    try:
        engine = _admin()
        with engine.connect() as conn:
            out["postgres"] = str(conn.execute(sa.text("SHOW server_version")).scalar())
        engine.dispose()
    except Exception:
        out["postgres"] = "unavailable"
    hyperfine = shutil.which("hyperfine")
    if hyperfine:
        out["hyperfine"] = subprocess.run(
            [hyperfine, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    return out


def save_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
