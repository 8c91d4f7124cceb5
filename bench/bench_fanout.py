"""Targets 3 and 4 -- filing a batch: its time and its memory.

A batch is filed in ONE transaction (``accessctl/filing.py``): its ``batches`` row, its
``run_batch`` workflow row and all N request workflow rows become visible when it commits.

``accessctl batch N`` (attached, the default limit) on a fresh database, N = 10,000 and
100,000 (``--quick``: 2,000 and 20,000): process start -> all N request workflows visible
(counted every 0.05 s; any partial count seen is recorded), -> the ``"batch filed"`` log
line, and the transaction itself (the ``batches`` row's ``created_at``, stamped at its
start, -> that line, written right after the commit). RSS is sampled every 0.05 s; after
``FOLLOW_S`` s of following the batch the process is stopped (SIGTERM) and its peak RSS
read from ``wait4``.

Whether a filing is all or none is a test, not a measurement:
``tests/test_faults.py::test_kill_9_while_filing_leaves_the_whole_batch_or_none``.

    uv run --group bench python bench/run_all.py --only fanout [--quick]
"""

from __future__ import annotations

import signal
import time
from typing import Any

import sqlalchemy as sa
from common import (
    QUEUE_NAME,
    Backend,
    Sampler,
    backend,
    backends,
    event_epoch,
    find_event,
    log,
    pg_counters,
    rss_kib,
    spawn_cli,
)

FILED = ("batch filed", "batch filed for workers")
FOLLOW_S = 5.0  # how long the attached process is followed once its batch is visible


def _batch_started(b: Backend) -> float | None:
    """When the filing transaction wrote the (first) ``batches`` row, in epoch seconds."""
    from accessctl.models import Batch

    engine = b.engine()
    try:
        with engine.connect() as conn:
            value = conn.scalar(sa.select(sa.func.min(Batch.created_at)))
    finally:
        engine.dispose()
    return value.timestamp() if value else None  # UTCDateTime: aware on both backends


def filing_run(kind: str, n: int, tag: str) -> dict[str, Any]:
    with backend(kind, tag) as b:
        engine, count = b.engine(), sa.text(f"SELECT count(*) FROM {b.table} WHERE queue_name = :q")
        before = pg_counters(b)
        wall0 = time.time()
        proc = spawn_cli(b.env, ["batch", str(n)], tag)
        seen_at: float | None = None
        partial: set[int] = set()
        with Sampler(lambda: rss_kib(proc.pid), 0.05) as rss:
            while seen_at is None and proc.poll() is None and time.monotonic() < proc.started + 600:
                with engine.connect() as conn:
                    seen = int(conn.scalar(count, {"q": QUEUE_NAME}) or 0)
                if seen >= n:
                    seen_at = time.monotonic()
                else:
                    partial |= {seen} - {0}
                    time.sleep(0.05)
            engine.dispose()
            time.sleep(FOLLOW_S)
            finished = proc.kill(signal.SIGTERM)
        time.sleep(1.2 if kind == "postgres" else 0)  # let the server flush its statistics
        after = pg_counters(b)
        enqueued, last_round = b.rows(
            f"SELECT count(*), max(created_at) FROM {b.table} WHERE queue_name = :q",
            q=QUEUE_NAME,
        )[0]
        tx_start = _batch_started(b)
    filed = find_event(tag, FILED)
    filed_at = event_epoch(filed) if filed else None
    # Peak RSS up to the commit (when the requests became visible), and over the whole run.
    hwm = [(rss._t0 + t, h) for t, (_, h) in rss.samples if h]
    to_commit = max((h for t, h in hwm if seen_at and t <= seen_at + 0.05), default=0)
    out: dict[str, Any] = {
        "backend": kind,
        "n": n,
        "enqueued": int(enqueued),
        "complete": int(enqueued) == n,
        "partial_counts_seen": sorted(partial),
        "visible_s": round(seen_at - proc.started, 2) if seen_at else None,
        "filed_log_s": round(filed_at - wall0, 2) if filed_at else None,
        "before_filing_s": round(tx_start - wall0, 2) if tx_start else None,
        "transaction_s": round(filed_at - tx_start, 2) if filed_at and tx_start else None,
        # Request rows are stamped per insert round: when the last round was written.
        "last_round_s": round(int(last_round) / 1000 - tx_start, 2)
        if last_round and tx_start
        else None,
        "peak_rss_mib": round(max([finished.maxrss_kib, *(h for _, h in hwm)]) / 1024, 1),
        "peak_rss_filing_mib": round(to_commit / 1024, 1),
    }
    if before and after:
        writes = sum(after[k] - before[k] for k in ("tup_inserted", "tup_updated", "tup_deleted"))
        out["pg_rows_written_per_child"] = round(writes / max(1, int(enqueued)), 2)
    log(f"filing {kind} n={n}: {out}")
    return out


def run(quick: bool = False) -> dict[str, Any]:
    small, big = (2_000, 20_000) if quick else (10_000, 100_000)
    filing = [
        filing_run(kind, n, f"file{kind[:2]}{n}") for kind in backends() for n in (small, big)
    ]
    return {"sizes": [small, big], "filing": filing}
