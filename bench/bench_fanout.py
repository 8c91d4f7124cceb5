"""Targets 3 and 4 -- filing a batch (time, atomicity) and memory.

Since 0.2.0 a batch is filed in ONE transaction (``accessctl/filing.py``): the ``batches``
row, the ``run_batch`` workflow row and all N ``file_request`` workflow rows (ENQUEUED on
``access-requests``), written with ``executemany``. The children become visible all at once
when it commits.

* ``filing``: ``accessctl batch N`` (attached, the default 50/30 limit) on a fresh
  database, N = 10,000 and 100,000 (``--quick``: 2,000 and 20,000). Measured: process
  start -> all N children visible (the count polled every 0.05 s; any partial count seen
  before that is recorded), process start -> the ``"batch filed"`` log line, and the
  transaction itself (the ``batches`` row's ``created_at``, stamped at its start, -> the log
  line, written right after the commit). The process's RSS is sampled every 0.05 s through
  filing and ``FOLLOW_S`` seconds of following, then it is stopped (SIGTERM, then SIGKILL:
  at 50/30 it would run for hours); its peak RSS also comes from ``wait4``.
* ``detach``: ``accessctl batch N --detach`` for the same N: wall time, filing time, peak RSS.
* ``atomicity``: ``accessctl batch N --detach --key K`` SIGKILLed while its filing
  transaction is open (Postgres: a session of the database holds a transaction ID; SQLite:
  another connection cannot take the write lock), twice, at different points; the rows of
  batch K are counted after each kill (expected: none), then the same command is run again
  (expected: the whole batch, N + 1 workflow rows ENQUEUED, one ``batches`` row). Then an
  attached ``accessctl batch N --key K2`` is SIGKILLed the moment its ``"batch filed"`` line
  appears (expected: the whole batch).
* ``profile``: one py-spy profile of the largest attached filing on Postgres.
* ``insert_probe``: the request rows written by DBOS's own bulk enqueue
  (``init_workflows``) against filing.py's single ``executemany`` statement, same rows.

    uv run --group bench python bench/run_all.py --only fanout [--quick]
"""

from __future__ import annotations

import signal
import sqlite3
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from common import (
    BATCH_QUEUE,
    LOG_DIR,
    REQUEST_QUEUE,
    SEED_USERS,
    Backend,
    Sampler,
    backend,
    event_epoch,
    find_event,
    log,
    log_events,
    pg_counters,
    postgres_available,
    rss_kib,
    spawn_cli,
    start_profile,
    summarize_profile,
    wait_for_event,
)

FILED = ("batch filed", "batch filed for workers")
ALREADY = ("attached to the batch already filed", "batch already filed")
# How long the attached process is followed after its batch became visible.
FOLLOW_S = 5.0


def _child_counter(b: Backend) -> tuple[sa.Engine, Callable[[], int]]:
    engine = b.engine()
    stmt = sa.text(f"SELECT count(*) FROM {b.table} WHERE queue_name = :q")

    def count() -> int:
        with engine.connect() as conn:
            return int(conn.execute(stmt, {"q": REQUEST_QUEUE}).scalar() or 0)

    return engine, count


def _batch_started(b: Backend, batch_id: str | None = None) -> float | None:
    """When the filing transaction wrote the ``batches`` row (epoch seconds)."""
    from accessctl.models import Batch

    engine = b.engine()
    try:
        with engine.connect() as conn:
            stmt = sa.select(Batch.created_at)
            if batch_id is not None:
                stmt = stmt.where(Batch.id == uuid.UUID(batch_id))
            value: datetime | None = conn.scalar(stmt.order_by(Batch.created_at).limit(1))
    finally:
        engine.dispose()
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive UTC
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _status_counts(b: Backend, batch_id: str) -> dict[str, int]:
    rows = b.rows(
        f"SELECT status, count(*) FROM {b.table} WHERE workflow_uuid = :w OR workflow_uuid LIKE :p "
        "GROUP BY status",
        w=f"batch-{batch_id}",
        p=f"req-{batch_id}-%",
    )
    return {str(s): int(c) for s, c in rows}


def batch_state(b: Backend, batch_id: str) -> dict[str, Any]:
    """What of batch ``batch_id`` is in the database: its ``batches`` row, its workflow rows
    (by status), their inputs, and its ``errors`` rows."""
    from accessctl.models import Batch, Error

    engine = b.engine()
    bid = uuid.UUID(batch_id)
    try:
        with engine.connect() as conn:
            batches = conn.scalar(sa.select(sa.func.count()).where(Batch.id == bid))
            errors = conn.scalar(sa.select(sa.func.count()).where(Error.batch_id == bid))
            inputs = conn.execute(
                sa.text(
                    f"SELECT count(*) FROM {b.sys('workflow_input')} "
                    "WHERE workflow_uuid = :w OR workflow_uuid LIKE :p"
                ),
                {"w": f"batch-{batch_id}", "p": f"req-{batch_id}-%"},
            ).scalar()
    finally:
        engine.dispose()
    statuses = _status_counts(b, batch_id)
    return {
        "batches_rows": int(batches or 0),
        "workflow_rows": sum(statuses.values()),
        "by_status": statuses,
        "input_rows": int(inputs or 0),
        "errors_rows": int(errors or 0),
    }


def filing_run(kind: str, n: int, tag: str, *, profile_to: Path | None = None) -> dict[str, Any]:
    with backend(kind, tag) as b:
        engine, count = _child_counter(b)
        before = pg_counters(b)
        wall0 = time.time()
        proc = spawn_cli(b.env, ["batch", str(n)], tag)
        profiler = start_profile(proc.pid, profile_to, duration=600) if profile_to else None
        visible_s: float | None = None
        partial_counts: list[int] = []
        with Sampler(lambda: rss_kib(proc.pid), 0.05) as rss:
            deadline = proc.started + 600
            while time.monotonic() < deadline and proc.poll() is None:
                seen = count()
                if seen >= n:
                    visible_s = time.monotonic() - proc.started
                    break
                if seen:
                    partial_counts.append(seen)
                time.sleep(0.05)
            follow_until = time.monotonic() + FOLLOW_S
            while time.monotonic() < follow_until and proc.poll() is None:
                time.sleep(0.1)
            exited_early = proc.result is not None
            t_stop = time.monotonic()
            finished = proc.kill(signal.SIGTERM)  # SIGKILL after 15 s
            stop_s = time.monotonic() - t_stop
        engine.dispose()
        if profiler is not None:
            profiler.wait(timeout=60)
        time.sleep(1.2 if kind == "postgres" else 0)  # let the server flush its stats
        after = pg_counters(b)
        children = b.rows(
            f"SELECT count(*), min(created_at), max(created_at), "
            f"sum(CASE WHEN status = 'ENQUEUED' THEN 1 ELSE 0 END) FROM {b.table} "
            "WHERE queue_name = :q",
            q=REQUEST_QUEUE,
        )[0]
        parent = b.rows(
            f"SELECT workflow_uuid, created_at FROM {b.table} WHERE queue_name = :q", q=BATCH_QUEUE
        )
        tx_start = _batch_started(b)
    filed = find_event(tag, FILED)
    filed_at = event_epoch(filed) if filed else None
    samples = [(round(t, 2), r) for t, (r, _) in rss.samples if r]
    hwm = [h for _, (_, h) in rss.samples if h]
    # Peak while filing: up to the moment the children were seen (the commit), then overall.
    visible_t = (visible_s or 0) + (proc.started - rss._t0)
    filing_hwm = max((h for t, (_, h) in rss.samples if h and t <= visible_t + 0.05), default=0)
    enqueued = int(children[0])
    out: dict[str, Any] = {
        "backend": kind,
        "n": n,
        "enqueued": enqueued,
        "complete": enqueued == n,
        "enqueued_at_stop": int(children[3] or 0),
        "partial_counts_seen": sorted(set(partial_counts)),
        "parent_rows": len(parent),
        "visible_s": round(visible_s, 2) if visible_s is not None else None,
        "filed_log_s": round(filed_at - wall0, 2) if filed_at else None,
        "before_filing_s": round(tx_start - wall0, 2) if tx_start else None,
        "transaction_s": round(filed_at - tx_start, 2) if filed_at and tx_start else None,
        # created_at is stamped per insert round (filing.CHUNK requests), so this is when
        # the first and the last round were written, relative to the transaction's start.
        "created_at_spread_s": round((int(children[2]) - int(children[1])) / 1000, 2)
        if enqueued
        else None,
        "last_round_s": round(int(children[2]) / 1000 - tx_start, 2)
        if enqueued and tx_start
        else None,
        "peak_rss_mib": round(max(finished.maxrss_kib, max(hwm, default=0)) / 1024, 1),
        "peak_rss_filing_mib": round(filing_hwm / 1024, 1),
        "rss_at_stop_mib": round(samples[-1][1] / 1024, 1) if samples else None,
        "rss_samples": samples[:: max(1, len(samples) // 80)],
        "exited_before_stop": exited_early,
        "exit_code": finished.returncode,
        "stop_s": round(stop_s, 2),
        "cpu_s": round(finished.cpu, 2),
    }
    if before and after:
        out["pg_commits"] = after["xact_commit"] - before["xact_commit"]
        out["pg_rows_written_per_child"] = round(
            sum(after[k] - before[k] for k in ("tup_inserted", "tup_updated", "tup_deleted"))
            / max(1, enqueued),
            2,
        )
    if profile_to is not None:
        out["profile"] = summarize_profile(profile_to)
    log(
        f"filing {kind} n={n}: visible at {out['visible_s']} s, 'batch filed' at "
        f"{out['filed_log_s']} s, transaction {out['transaction_s']} s, peak RSS "
        f"{out['peak_rss_mib']} MiB (filing {out['peak_rss_filing_mib']}), partial counts "
        f"{out['partial_counts_seen'] or 'none'}"
    )
    return out


def detach_run(kind: str, n: int, tag: str) -> dict[str, Any]:
    with backend(kind, tag) as b:
        wall0 = time.time()
        proc = spawn_cli(b.env, ["batch", str(n), "--detach"], tag)
        done = proc.wait(timeout=600)
        tx_start = _batch_started(b)
        enqueued = int(
            b.scalar(
                f"SELECT count(*) FROM {b.table} WHERE status = 'ENQUEUED' AND queue_name IN (:a, :r)",
                a=BATCH_QUEUE,
                r=REQUEST_QUEUE,
            )
            or 0
        )
    filed = find_event(tag, FILED)
    filed_at = event_epoch(filed) if filed else None
    out = {
        "backend": kind,
        "n": n,
        "exit_code": done.returncode,
        "wall_s": round(done.wall, 2),
        "filed_log_s": round(filed_at - wall0, 2) if filed_at else None,
        "transaction_s": round(filed_at - tx_start, 2) if filed_at and tx_start else None,
        "peak_rss_mib": round(done.maxrss_kib / 1024, 1),
        "cpu_s": round(done.cpu, 2),
        "workflow_rows_enqueued": enqueued,
    }
    log(f"detach {kind} n={n}: {out}")
    return out


def _tx_open_probe(b: Backend) -> tuple[Callable[[], bool], Callable[[], None]]:
    """(is another session's write transaction open right now?, close)."""
    if b.kind == "postgres":
        engine = b.engine()
        stmt = sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_xid IS NOT NULL AND pid <> pg_backend_pid()"
        )

        def pg_open() -> bool:
            with engine.connect() as conn:
                return int(conn.execute(stmt).scalar() or 0) > 0

        return pg_open, engine.dispose

    path = sa.make_url(b.url).database
    assert path is not None

    def sqlite_open() -> bool:
        conn = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                return True
            raise
        else:
            conn.execute("ROLLBACK")
            return False
        finally:
            conn.close()

    return sqlite_open, lambda: None


def _kill_mid_filing(
    b: Backend, n: int, key: str, name: str, fraction: float, expected_tx_s: float
) -> dict[str, Any]:
    """Start ``batch N --detach --key K``; once its filing transaction is open, wait
    ``fraction`` of its expected length, check it is still open, SIGKILL it."""
    from accessctl.workflows import batch_id_for_key

    is_open, close = _tx_open_probe(b)
    try:
        proc = spawn_cli(b.env, ["batch", str(n), "--detach", "--key", key], name)
        opened: float | None = None
        while time.monotonic() - proc.started < 120 and proc.poll() is None:
            if is_open():
                opened = time.monotonic()
                break
            time.sleep(0.005)
        if opened is not None:
            time.sleep(max(0.0, fraction * expected_tx_s - (time.monotonic() - opened)))
        open_at_kill = opened is not None and is_open()
        killed = time.monotonic()
        result = proc.kill(signal.SIGKILL)
        # The server (Postgres) rolls the transaction back once it sees the client gone.
        aborted: float | None = None
        while time.monotonic() - killed < 60:
            if not is_open():
                aborted = time.monotonic() - killed
                break
            time.sleep(0.02)
    finally:
        close()
    state = batch_state(b, batch_id_for_key(key))
    out = {
        "fraction_target": fraction,
        "transaction_open_at_kill": open_at_kill,
        "killed_after_open_s": round(killed - opened, 3) if opened is not None else None,
        "rolled_back_after_s": round(aborted, 3) if aborted is not None else None,
        "exit_code": result.returncode,
        "logged_filed": find_event(name, FILED) is not None,
        "state": state,
        "none": state["batches_rows"] == 0
        and state["workflow_rows"] == 0
        and state["input_rows"] == 0
        and state["errors_rows"] == 0,
    }
    log(f"atomicity kill at {fraction:.0%}: {out}")
    return out


def atomicity_run(kind: str, n: int, tag: str, expected_tx_s: float) -> dict[str, Any]:
    from accessctl.workflows import batch_id_for_key

    key = f"bench-atomic-{uuid.uuid4().hex[:8]}"
    bid = batch_id_for_key(key)
    with backend(kind, tag) as b:
        kills = [
            _kill_mid_filing(b, n, key, f"{tag}-kill{i}", fraction, expected_tx_s)
            for i, fraction in enumerate((0.3, 0.85))
        ]
        # The same command again: it must file the whole batch.
        rerun = spawn_cli(b.env, ["batch", str(n), "--detach", "--key", key], f"{tag}-rerun")
        rerun_done = rerun.wait(timeout=600)
        rerun_state = batch_state(b, bid)
        # An attached run killed the moment it says the batch is filed.
        key2 = f"{key}-after"
        name = f"{tag}-after"
        attached = spawn_cli(b.env, ["batch", str(n), "--key", key2], name)
        filed = wait_for_event(name, FILED, attached, timeout=600, interval=0.005)
        attached.kill(signal.SIGKILL)
        after_state = batch_state(b, batch_id_for_key(key2))
        # ... and the same command once more (detached): it attaches, files nothing.
        again_name = f"{tag}-again"
        again = spawn_cli(b.env, ["batch", str(n), "--detach", "--key", key2], again_name)
        again.wait(timeout=300)
        again_state = batch_state(b, batch_id_for_key(key2))
    whole = n + 1  # the requests and the batch's own workflow
    out = {
        "backend": kind,
        "n": n,
        "kills": kills,
        "rerun": {
            "exit_code": rerun_done.returncode,
            "wall_s": round(rerun_done.wall, 2),
            "state": rerun_state,
            "whole": rerun_state["batches_rows"] == 1
            and rerun_state["by_status"].get("ENQUEUED", 0) == whole
            and rerun_state["input_rows"] == whole,
        },
        "kill_after_filed": {
            "saw_filed_line": filed is not None,
            "state": after_state,
            "whole": after_state["batches_rows"] == 1
            and after_state["workflow_rows"] == whole
            and after_state["input_rows"] == whole,
        },
        "same_key_again": {
            "logged": next(
                (e["event"] for e in log_events(again_name) if e.get("event") in FILED + ALREADY),
                None,
            ),
            "workflow_rows": again_state["workflow_rows"],
            "batches_rows": again_state["batches_rows"],
        },
    }
    out["all_or_none"] = (
        all(k["none"] and k["transaction_open_at_kill"] for k in kills)
        and out["rerun"]["whole"]
        and out["kill_after_filed"]["whole"]
    )
    log(
        f"atomicity {kind}: all_or_none={out['all_or_none']}; {out['rerun']}; {out['kill_after_filed']}"
    )
    return out


def insert_probe(kind: str, n: int, tag: str, rounds: int = 2) -> dict[str, Any]:
    """The same N request rows written three ways, alternately, on one fresh database:
    DBOS's public ``enqueue_in_transaction`` (one call per workflow, what filing uses up to
    ``filing.BULK_THRESHOLD``), DBOS 3.4's own bulk enqueue (``SystemDatabase.init_workflows``:
    multi-row ``INSERT ... VALUES`` in chunks of 500, in its own transaction) and
    ``dbos_compat.bulk_enqueue`` (one statement, ``executemany``, inside a transaction of
    ours; statuses built by ``dbos_compat.build_enqueue_status``)."""
    from dbos import DBOSClient

    from accessctl.db import make_engine
    from accessctl.dbos_compat import build_enqueue_status, bulk_enqueue
    from accessctl.settings import APP_NAME
    from accessctl.workflows import QUEUE_NAME, WORKFLOW_VERSION, request_workflow_id

    retry = {"max_attempts": 1.0, "deadline": 0.0}
    times: dict[str, list[float]] = {
        "dbos_enqueue_in_transaction": [],
        "dbos_init_workflows": [],
        "accessctl_executemany": [],
    }
    build: list[float] = []
    with backend(kind, tag) as b:
        engine = make_engine(b.url)
        client = DBOSClient(
            system_database_engine=engine,
            dbos_system_schema=None if kind == "sqlite" else "dbos",
            application_name=APP_NAME,
            lazy=True,
        )
        try:
            for _ in range(rounds):
                for way in times:
                    bid = str(uuid.uuid4())
                    t0 = time.perf_counter()
                    statuses = [
                        build_enqueue_status(
                            client,
                            QUEUE_NAME,
                            "accessctl.file_request",
                            request_workflow_id(bid, i),
                            WORKFLOW_VERSION,
                            bid,
                            SEED_USERS[i % len(SEED_USERS)],
                            None,
                            1,
                            retry,
                        )
                        for i in range(n)
                    ]
                    t1 = time.perf_counter()
                    if way == "dbos_enqueue_in_transaction":
                        with engine.begin() as conn:
                            for i in range(n):
                                client.enqueue_in_transaction(
                                    conn,
                                    {
                                        "queue_name": QUEUE_NAME,
                                        "workflow_name": "accessctl.file_request",
                                        "workflow_id": request_workflow_id(bid, i) + "e",
                                        "app_version": WORKFLOW_VERSION,
                                    },
                                    bid,
                                    SEED_USERS[i % len(SEED_USERS)],
                                    None,
                                    1,
                                    retry,
                                )
                    elif way == "dbos_init_workflows":
                        client._sys_db.init_workflows(statuses)
                    else:
                        with engine.begin() as conn:
                            bulk_enqueue(client, conn, statuses, int(time.time() * 1000))
                    times[way].append(time.perf_counter() - t1)
                    build.append(t1 - t0)
        finally:
            client.destroy()
            engine.dispose()
    public_s = min(times["dbos_enqueue_in_transaction"])
    dbos_s = min(times["dbos_init_workflows"])
    ours_s = min(times["accessctl_executemany"])
    out = {
        "backend": kind,
        "n": n,
        "rounds": rounds,
        "build_statuses_s": round(min(build), 3),
        "dbos_enqueue_in_transaction_s": round(public_s, 3),
        "dbos_init_workflows_s": round(dbos_s, 3),
        "accessctl_executemany_s": round(ours_s, 3),
        "ratio": round(dbos_s / ours_s, 1) if ours_s else None,
        "public_ratio": round(public_s / ours_s, 1) if ours_s else None,
    }
    log(f"insert probe {kind} n={n}: {out}")
    return out


def run(quick: bool = False) -> dict[str, Any]:
    kinds = [*(["postgres"] if postgres_available() else []), "sqlite"]
    small, big = (2_000, 20_000) if quick else (10_000, 100_000)
    filing: list[dict[str, Any]] = []
    detach: list[dict[str, Any]] = []
    atomic: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []
    inserts: list[dict[str, Any]] = []
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        for n in (small, big):
            filing.append(filing_run(kind, n, f"file{kind[:2]}{n}"))
        for n in (small, big):
            detach.append(detach_run(kind, n, f"det{kind[:2]}{n}"))
        # Kill points are set from this backend's measured filing transaction at this size.
        measured = [d["transaction_s"] for d in detach if d["backend"] == kind and d["n"] == big]
        measured += [f["transaction_s"] for f in filing if f["backend"] == kind and f["n"] == big]
        known = [m for m in measured if m]
        atomic.append(atomicity_run(kind, big, f"atom{kind[:2]}", min(known) if known else 1.0))
        inserts.append(insert_probe(kind, small, f"ins{kind[:2]}"))
        if kind == "postgres":
            prof = LOG_DIR / f"filing-{kind}.pyspy.txt"
            row = filing_run(kind, big, f"prof{kind[:2]}{big}", profile_to=prof)
            profiles.append(
                {k: row[k] for k in ("backend", "n", "visible_s", "transaction_s", "profile")}
            )
    from accessctl.filing import CHUNK

    return {
        "sizes": [small, big],
        "chunk": CHUNK,
        "follow_s": FOLLOW_S,
        "filing": filing,
        "detach": detach,
        "atomicity": atomic,
        "profiles": profiles,
        "insert_probe": inserts,
    }
