"""Target 5 -- start-up and reading.

* ``accessctl --help`` against ``python -c "import typer, rich"`` (same interpreter), timed
  side by side with hyperfine (a Python timing loop when hyperfine is missing);
* ``accessctl errors --limit 50`` on a database holding 1,000,000 error rows (Postgres: one
  ``INSERT ... SELECT generate_series``; SQLite: one bulk ``executemany``), with the plan
  of the exact statement the command issues (captured from ``accessctl.queries``);
* ``accessctl submit`` of the four default IDs on a fresh embedded database, end to end.

    uv run --group bench python bench/run_all.py --only startup [--quick]
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from common import (
    ACCESSCTL,
    LOG_DIR,
    PYTHON,
    Backend,
    backend,
    base_env,
    log,
    median,
    postgres_available,
    stderr_file,
)


def time_commands(
    commands: dict[str, str],
    env: dict[str, str],
    runs: int,
    *,
    prepare: str | None = None,
    warmup: int = 2,
) -> dict[str, dict[str, Any]]:
    """Median / mean / min seconds per command, measured in one interleaved session."""
    hyperfine = shutil.which("hyperfine")
    if hyperfine:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        out = LOG_DIR / f"hyperfine-{uuid.uuid4().hex[:6]}.json"
        cmd = [hyperfine, "-N", "-i", "--runs", str(runs), "--export-json", str(out)]
        cmd += ["--warmup", str(warmup)] if prepare is None else ["--prepare", prepare]
        for name, command in commands.items():
            cmd += ["-n", name, command]
        subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        data = json.loads(out.read_text())
        return {
            r["command"]: {
                "median_s": round(r["median"], 4),
                "mean_s": round(r["mean"], 4),
                "min_s": round(r["min"], 4),
                "runs": len(r["times"]),
                "tool": "hyperfine",
            }
            for r in data["results"]
        }
    import shlex

    times: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(warmup + runs):
        for name, command in commands.items():
            if prepare:
                subprocess.run(prepare, shell=True, env=env, check=False)
            t0 = time.perf_counter()
            subprocess.run(shlex.split(command), env=env, capture_output=True, check=False)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {
        name: {
            "median_s": round(median(ts), 4),
            "mean_s": round(sum(ts) / len(ts), 4),
            "min_s": round(min(ts), 4),
            "runs": len(ts),
            "tool": "python loop",
        }
        for name, ts in times.items()
    }


def help_vs_imports(runs: int) -> dict[str, Any]:
    env = base_env()
    timed = time_commands(
        {
            "accessctl --help": f"{ACCESSCTL} --help",
            "python -c 'import typer, rich'": f"{PYTHON} -c 'import typer, rich'",
            "python -c 'import dbos' (context)": f"{PYTHON} -c 'import dbos'",
        },
        env,
        runs,
        warmup=3,
    )
    ratio = (
        timed["accessctl --help"]["median_s"] / timed["python -c 'import typer, rich'"]["median_s"]
    )
    # The same pair with no bytecode cache (PYTHONDONTWRITEBYTECODE=1, as this sandbox's
    # shell sets): every module compiled from source at every start.
    # An empty cache prefix: Python then ignores any __pycache__ beside the sources.
    empty = tempfile.mkdtemp(prefix="accessctl-bench-nocache-")
    cold_env = {**env, "PYTHONPYCACHEPREFIX": empty, "PYTHONDONTWRITEBYTECODE": "1"}
    cold = time_commands(
        {
            "accessctl --help (no bytecode cache)": f"{ACCESSCTL} --help",
            "python -c 'import typer, rich' (no bytecode cache)": f"{PYTHON} -c 'import typer, rich'",
        },
        cold_env,
        runs,
    )
    cold_ratio = (
        cold["accessctl --help (no bytecode cache)"]["median_s"]
        / cold["python -c 'import typer, rich' (no bytecode cache)"]["median_s"]
    )
    out = {
        "times": {**timed, **cold},
        "ratio": round(ratio, 2),
        "ratio_no_bytecode_cache": round(cold_ratio, 2),
        "met": ratio <= 1.5,
    }
    log(f"startup: --help / import typer,rich = {ratio:.2f} (no bytecode cache: {cold_ratio:.2f})")
    return out


def import_breakdown(runs: int) -> dict[str, Any]:
    """What a read-only command imports, cumulatively, timed side by side (bytecode cached).
    Alembic is no longer on that path (the schema check reads ``alembic_version`` and
    compares it with ``accessctl.schema.SCHEMA_HEAD``); it is timed last, for context."""
    cli = "accessctl.cli"
    steps = [
        ("python -c pass", "pass"),
        ("import typer, rich", "import typer, rich"),
        ("import accessctl.cli (what --help loads)", f"import {cli}"),
        ("+ structlog (logs)", f"import {cli}, accessctl.logs"),
        ("+ sqlalchemy", f"import {cli}, accessctl.logs, sqlalchemy"),
        ("+ ORM models (accessctl.queries)", f"import {cli}, accessctl.logs, accessctl.queries"),
        (
            "+ schema check (accessctl.schema, no Alembic)",
            f"import {cli}, accessctl.logs, accessctl.queries, accessctl.schema",
        ),
        (
            "+ psycopg (what `errors` loads on Postgres)",
            f"import {cli}, accessctl.logs, accessctl.queries, accessctl.schema, psycopg",
        ),
        (
            "+ alembic (only `migrate`, or a schema not at SCHEMA_HEAD)",
            f"import {cli}, accessctl.logs, accessctl.queries, accessctl.schema, psycopg, "
            "alembic.runtime.migration, alembic.script",
        ),
        ("import dbos (context)", "import dbos"),
    ]
    return time_commands(
        {label: f"{PYTHON} -c '{code}'" for label, code in steps}, base_env(), runs
    )


# Which modules `accessctl errors --limit 50` really loads (the command run in-process).
MODULES_PROBE = """
import json, os, sys
from accessctl.cli import app
try:
    app(["errors", "--limit", "50"])
except SystemExit:
    pass
names = ("sqlalchemy", "sqlalchemy.orm", "psycopg", "structlog", "accessctl.models",
         "accessctl.schema", "alembic", "dbos", "rich")
with open(os.environ["BENCH_MODULES_OUT"], "w") as fh:
    json.dump({name: name in sys.modules for name in names}, fh)
"""


def modules_loaded(env: dict[str, str]) -> dict[str, bool]:
    out = Path(tempfile.mkdtemp(prefix="accessctl-bench-modules-")) / "modules.json"
    try:
        subprocess.run(
            [PYTHON, "-c", MODULES_PROBE],
            env={**env, "BENCH_MODULES_OUT": str(out)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
            check=False,
        )
        return json.loads(out.read_text()) if out.exists() else {}
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def _fill_postgres(b: Backend, n: int) -> None:
    engine = b.engine()
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO errors (id, message, batch_id, request_id, created_at) "
                "SELECT gen_random_uuid(), jsonb_build_object("
                "'batch_id', b.id::text, 'workflow_id', 'bench-' || g, "
                "'user_id', '00000000-0000-0000-0000-000000000001', "
                "'error_class', 'UnknownUser', 'detail', 'no user with id ...', "
                "'sqlstate', NULL), b.id, 'bench-' || g, "
                "now() - make_interval(secs => g) "
                "FROM generate_series(1, :n) AS g "
                "CROSS JOIN LATERAL (SELECT ('00000000-0000-4000-8000-' || "
                "lpad((g % 100)::text, 12, '0'))::uuid AS id) AS b"
            ),
            {"n": n},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE errors"))
    engine.dispose()


def _fill_sqlite(b: Backend, n: int) -> None:
    """A bulk executemany of rows in exactly the format SQLAlchemy stores them."""
    from accessctl.models import Error

    dialect = sa.create_engine("sqlite://").dialect
    columns = ["id", "message", "batch_id", "request_id", "created_at"]
    procs = [Error.__table__.c[c].type.bind_processor(dialect) for c in columns]
    now = datetime.now(UTC)
    batches = [uuid.UUID(f"00000000-0000-4000-8000-{i:012d}") for i in range(100)]

    def rows() -> Any:
        for g in range(1, n + 1):
            batch = batches[g % 100]
            values = (
                uuid.uuid4(),
                {
                    "batch_id": str(batch),
                    "workflow_id": f"bench-{g}",
                    "user_id": "00000000-0000-0000-0000-000000000001",
                    "error_class": "UnknownUser",
                    "detail": "no user with id ...",
                    "sqlstate": None,
                },
                batch,
                f"bench-{g}",
                now - timedelta(seconds=g),
            )
            yield tuple(p(v) if p else v for p, v in zip(procs, values, strict=True))

    path = sa.make_url(b.url).database
    assert path is not None
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    with conn:
        conn.executemany(
            f"INSERT INTO errors ({', '.join(columns)}) VALUES (?, ?, ?, ?, ?)", rows()
        )
    conn.execute("ANALYZE")
    conn.close()


def _captured_statement(b: Backend, **kwargs: Any) -> tuple[str, dict[str, Any] | tuple[Any, ...]]:
    """The SQL that ``accessctl errors`` sends, captured from the real query function."""
    from accessctl.db import make_engine
    from accessctl.queries import list_errors

    engine = make_engine(b.url)
    seen: list[tuple[str, Any]] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        seen.append((statement, params))

    list_errors(engine, limit=50, **kwargs)
    engine.dispose()
    return seen[-1]


def _plan(b: Backend, statement: str, params: Any) -> list[str]:
    engine = b.engine()
    try:
        with engine.connect() as conn:
            if b.kind == "postgres":
                cursor = conn.connection.cursor()
                cursor.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, params)
                return [r[0] for r in cursor.fetchall()]
            cursor = conn.connection.cursor()
            cursor.execute("EXPLAIN QUERY PLAN " + statement, params)
            return [" ".join(str(x) for x in r[1:]) for r in cursor.fetchall()]
    finally:
        engine.dispose()


def errors_on_million(kind: str, rows: int, runs: int) -> dict[str, Any]:
    with backend(kind, f"err{kind[:2]}", users=False) as b:
        t0 = time.monotonic()
        (_fill_postgres if kind == "postgres" else _fill_sqlite)(b, rows)
        fill = time.monotonic() - t0
        count = int(b.scalar("SELECT count(*) FROM errors") or 0)
        batch = "00000000-0000-4000-8000-000000000007"
        timed = time_commands(
            {
                "errors --limit 50": f"{ACCESSCTL} errors --limit 50",
                "errors --limit 50 --json": f"{ACCESSCTL} errors --limit 50 --json",
                "errors --batch B --limit 50": f"{ACCESSCTL} errors --batch {batch} --limit 50",
                "accessctl --help (same session)": f"{ACCESSCTL} --help",
            },
            {**b.env, "COLUMNS": "200"},
            runs,
        )
        modules = modules_loaded(b.env)
        plans = {}
        for label, kwargs in (("newest 50", {}), ("--batch, newest 50", {"batch": batch})):
            statement, params = _captured_statement(b, batch=kwargs.get("batch"), since=None)
            plans[label] = {"sql": " ".join(statement.split()), "plan": _plan(b, statement, params)}
    median_s = timed["errors --limit 50"]["median_s"]
    out = {
        "backend": kind,
        "rows": count,
        "fill_s": round(fill, 1),
        "times": timed,
        "plans": plans,
        "modules": modules,
        "met": median_s <= 0.5,
    }
    log(f"errors on {count} rows ({kind}): {median_s:.3f}s median")
    return out


def submit_fresh(runs: int) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="accessctl-bench-submit-"))
    env = base_env(XDG_DATA_HOME=str(home))
    ids = " ".join(f"00000000-0000-0000-0000-00000000000{i}" for i in range(4))
    try:
        fresh = time_commands(
            {"submit 4 IDs, fresh embedded database": f"{ACCESSCTL} submit {ids}"},
            env,
            runs,
            prepare=f"rm -rf {home}/accessctl",
        )
        warm = time_commands(
            {"submit 4 IDs, existing embedded database": f"{ACCESSCTL} submit {ids}"},
            env,
            runs,
            warmup=1,
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    times = {**fresh, **warm}
    median_s = times["submit 4 IDs, fresh embedded database"]["median_s"]
    log(f"submit fresh: {median_s:.2f}s median")
    return {"times": times, "met": median_s <= 2.0}


def submit_phases() -> list[dict[str, Any]]:
    """Where a `submit` of 4 IDs spends its time, from DBOS's own timestamps: start-up
    (process start -> the filing transaction, which stamps the batch workflow's
    ``created_at``), queue wait (created -> the batch workflow started), the batch itself
    (started -> done: its 4 requests run meanwhile), and shutdown (done -> process exit).
    Fresh, then existing, database."""
    home = Path(tempfile.mkdtemp(prefix="accessctl-bench-phases-"))
    env = base_env(XDG_DATA_HOME=str(home))
    ids = [f"00000000-0000-0000-0000-00000000000{i}" for i in range(4)]
    db = home / "accessctl" / "accessctl.sqlite"
    out: list[dict[str, Any]] = []
    try:
        for label in ("fresh", "existing"):
            t0 = time.time()
            with stderr_file(f"submit-phases-{label}") as err:
                subprocess.run(
                    [ACCESSCTL, "submit", *ids],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    check=False,
                    timeout=120,
                )
            t1 = time.time()
            conn = sqlite3.connect(db)
            created, started, done = conn.execute(
                "SELECT created_at, started_at_epoch_ms, updated_at FROM workflow_status "
                "WHERE queue_name = 'access-batches' ORDER BY created_at DESC LIMIT 1"
            ).fetchone()
            first, last = conn.execute(
                "SELECT min(started_at_epoch_ms), max(updated_at) FROM workflow_status "
                "WHERE queue_name = 'access-requests' AND created_at >= ?",
                (created,),
            ).fetchone()
            conn.close()
            out.append(
                {
                    "database": label,
                    "total_s": round(t1 - t0, 2),
                    "startup_s": round(created / 1000 - t0, 2),
                    "queue_wait_s": round((started - created) / 1000, 2),
                    "first_request_wait_s": round((first - created) / 1000, 2) if first else None,
                    "requests_done_s": round((last - created) / 1000, 2) if last else None,
                    "batch_s": round((done - started) / 1000, 2),
                    "shutdown_s": round(t1 - done / 1000, 2),
                }
            )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    log(f"submit phases: {out}")
    return out


def run(quick: bool = False) -> dict[str, Any]:
    runs = 5 if quick else 10
    # The target is about 1,000,000 rows; --quick fills 200,000 (and says so in the report).
    rows = 200_000 if quick else 1_000_000
    out: dict[str, Any] = {"help": help_vs_imports(runs), "imports": import_breakdown(runs)}
    out["errors"] = [
        errors_on_million(kind, rows, runs)
        for kind in [*(["postgres"] if postgres_available() else []), "sqlite"]
    ]
    out["submit"] = submit_fresh(3 if quick else 5)
    out["submit"]["phases"] = submit_phases()
    return out
