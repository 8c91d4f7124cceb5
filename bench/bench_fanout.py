"""Targets 3 and 4 -- fan-out (filing) time, atomicity, and memory.

* ``filing``: ``accessctl batch N`` (attached, the default 50/30 limit) on a fresh database;
  the time until all N child workflows are ENQUEUED (DBOS timestamps: from the parent
  workflow's start to the last child's ``created_at``, and from the command's start), with
  the process's RSS sampled all along. 10,000 runs to the end; 100,000 is cut short after
  a fixed time (its rate and RSS slope are then extrapolated; the report says so).
* ``detach``: ``accessctl batch N --detach`` for 10,000 and 100,000: wall time and peak RSS.
* ``atomicity``: ``batch N`` is killed with SIGKILL mid-filing; the state left behind is
  counted, then a ``worker --burst`` recovers it and the outcome is counted again.
* ``bulk``: a prototype of the fix, not accessctl code: the same N child workflows
  (``accessctl.file_request`` on ``access-requests``, the same IDs and inputs) enqueued with
  DBOS 3.4's ``DBOSClient.enqueue_in_transaction`` in ONE system-database transaction,
  together with the ``batches`` row -- all or nothing by construction.

    uv run --group bench python bench/bench_fanout.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from common import (
    LOG_DIR,
    REQUEST_QUEUE,
    Backend,
    Sampler,
    backend,
    log,
    pg_counters,
    postgres_available,
    rss_kib,
    spawn_cli,
    start_profile,
    summarize_profile,
)


def _child_counter(b: Backend) -> tuple[sa.Engine, Any]:
    engine = b.engine()
    stmt = sa.text(f"SELECT count(*) FROM {b.table} WHERE queue_name = :q")

    def count() -> int:
        with engine.connect() as conn:
            return int(conn.execute(stmt, {"q": REQUEST_QUEUE}).scalar() or 0)

    return engine, count


def filing_run(
    kind: str, n: int, cap_s: float, tag: str, *, profile_to: Path | None = None
) -> dict[str, Any]:
    with backend(kind, tag) as b:
        engine, count = _child_counter(b)
        before = pg_counters(b)
        wall_start = time.time()
        proc = spawn_cli(b.env, ["batch", str(n)], tag)
        profiler = start_profile(proc.pid, profile_to, duration=cap_s) if profile_to else None

        def probe() -> tuple[int, int, int]:
            rss, hwm = rss_kib(proc.pid)
            return count(), rss, hwm

        complete = False
        with Sampler(probe, 0.5) as sampler:
            while time.monotonic() - proc.started < cap_s:
                if sampler.samples and sampler.samples[-1][1][0] >= n:
                    complete = True
                    break
                if proc.poll() is not None:
                    break
                time.sleep(0.2)
        peak_kib = max((s[1][2] for s in sampler.samples), default=0)
        proc.kill()
        time.sleep(1.2 if kind == "postgres" else 0)
        after = pg_counters(b)
        if profiler is not None:
            profiler.wait(timeout=60)
        engine.dispose()
        row = b.rows(
            f"SELECT count(*), min(created_at), max(created_at) FROM {b.table} "
            "WHERE queue_name = :q",
            q=REQUEST_QUEUE,
        )[0]
        parent = b.rows(
            f"SELECT created_at, started_at_epoch_ms FROM {b.table} "
            "WHERE queue_name = 'access-batches'"
        )
    enqueued = int(row[0])
    parent_start = int(parent[0][1]) if parent and parent[0][1] else None
    fanout = (int(row[2]) - parent_start) / 1000 if parent_start and enqueued else float("nan")
    samples = [(round(t, 1), c, rss) for t, (c, rss, _) in sampler.samples if rss]
    # RSS against children enqueued, over the fan-out: its slope, for the extrapolation.
    during = [(c, rss) for _, c, rss in samples if 0 < c < n]
    slope = float("nan")
    if len(during) >= 4:
        xs = [c for c, _ in during]
        ys = [r for _, r in during]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    out: dict[str, Any] = {
        "backend": kind,
        "n": n,
        "cap_s": cap_s,
        "complete": complete or enqueued >= n,
        "enqueued": enqueued,
        "fanout_s": round(fanout, 2),
        "from_command_start_s": round(int(row[2]) / 1000 - wall_start, 2) if enqueued else None,
        "enqueue_rate": round(enqueued / fanout, 1) if fanout and fanout > 0 else float("nan"),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "rss_slope_kib_per_1k_children": round(slope * 1000, 1),
        "rss_samples": samples[:: max(1, len(samples) // 60)],
    }
    if before and after and enqueued:
        out["pg_commits_per_child"] = round(
            (after["xact_commit"] - before["xact_commit"]) / enqueued, 2
        )
        out["pg_rows_written_per_child"] = round(
            sum(after[k] - before[k] for k in ("tup_inserted", "tup_updated", "tup_deleted"))
            / enqueued,
            2,
        )
    if profile_to is not None:
        out["profile"] = summarize_profile(profile_to)
    log(
        f"filing {kind} n={n}: {enqueued} enqueued in {out['fanout_s']}s "
        f"({out['enqueue_rate']}/s), complete={out['complete']}, peak RSS {out['peak_rss_mib']} MiB"
    )
    return out


def detach_run(kind: str, n: int, tag: str) -> dict[str, Any]:
    with backend(kind, tag) as b:
        proc = spawn_cli(b.env, ["batch", str(n), "--detach"], tag)
        done = proc.wait(timeout=300)
        size = b.scalar(
            f"SELECT length(i.inputs) FROM {b.sys('workflow_input')} i "
            f"JOIN {b.table} s ON s.workflow_uuid = i.workflow_uuid "
            "WHERE s.queue_name = 'access-batches'"
        )
    out = {
        "backend": kind,
        "n": n,
        "exit_code": done.returncode,
        "wall_s": round(done.wall, 2),
        "peak_rss_mib": round(done.maxrss_kib / 1024, 1),
        "inputs_bytes": int(size or 0),
    }
    log(f"detach {kind} n={n}: {out}")
    return out


def atomicity_run(kind: str, n: int, kill_at: int, tag: str) -> dict[str, Any]:
    with backend(kind, tag) as b:
        engine, count = _child_counter(b)
        proc = spawn_cli(b.env, ["batch", str(n)], f"{tag}-batch")
        killed_at = 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            killed_at = count()
            if killed_at >= kill_at:
                break
            time.sleep(0.05)
        proc.kill()
        engine.dispose()
        after_kill = {
            "children_enqueued": count_children(b),
            "batch_rows": int(b.scalar("SELECT count(*) FROM batches") or 0),
            "parent_status": b.scalar(
                f"SELECT status FROM {b.table} WHERE queue_name = 'access-batches'"
            ),
        }
        env = {**b.env, "ACCESSCTL_RATE_LIMIT": "none"}
        t0 = time.monotonic()
        worker = spawn_cli(env, ["worker", "--burst"], f"{tag}-worker")
        finished = worker.wait(timeout=600)
        recovery = time.monotonic() - t0
        accesses = int(b.scalar("SELECT count(*) FROM accesses") or 0)
        distinct = int(b.scalar("SELECT count(DISTINCT request_id) FROM accesses") or 0)
        errors = int(b.scalar("SELECT count(*) FROM errors") or 0)
        after = {
            "children": count_children(b),
            "accesses": accesses,
            "distinct_requests": distinct,
            "errors": errors,
            "parent_status": b.scalar(
                f"SELECT status FROM {b.table} WHERE queue_name = 'access-batches'"
            ),
            "worker_exit": finished.returncode,
            "recovery_s": round(recovery, 1),
        }
    out = {"backend": kind, "n": n, "after_kill": after_kill, "after_recovery": after}
    log(f"atomicity {kind}: {out}")
    return out


def bulk_enqueue_probe(kind: str, n: int, tag: str) -> dict[str, Any]:
    """How long filing N children takes when they go in one transaction (the proposed fix)."""
    from dbos import DBOSClient

    from accessctl.db import make_engine
    from accessctl.models import Batch
    from accessctl.settings import APP_NAME
    from accessctl.workflows import QUEUE_NAME, WORKFLOW_VERSION, request_workflow_id

    with backend(kind, tag) as b:
        engine = make_engine(b.url)
        client = DBOSClient(
            system_database_engine=engine if kind == "sqlite" else None,
            system_database_url=None if kind == "sqlite" else b.url,
            application_name=APP_NAME,
        )
        import uuid

        batch_id = str(uuid.uuid4())
        users = ["00000000-0000-0000-0000-00000000000" + str(i) for i in range(4)]
        try:
            t0 = time.perf_counter()
            with engine.begin() as conn:
                if kind == "sqlite":
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                conn.execute(sa.insert(Batch).values(id=uuid.UUID(batch_id), key=None, total=n))
                for i in range(n):
                    client.enqueue_in_transaction(
                        conn,
                        {
                            "queue_name": QUEUE_NAME,
                            "workflow_name": "accessctl.file_request",
                            "workflow_id": request_workflow_id(batch_id, i),
                            "app_version": WORKFLOW_VERSION,
                        },
                        batch_id,
                        users[i % 4],
                    )
            elapsed = time.perf_counter() - t0
        finally:
            client.destroy()
            engine.dispose()
        enqueued = count_children(b)
    out = {
        "backend": kind,
        "n": n,
        "enqueued": enqueued,
        "seconds": round(elapsed, 2),
        "rate": round(n / elapsed, 1),
        "projected_100k_s": round(100_000 * elapsed / n, 1),
    }
    log(f"bulk enqueue prototype {kind} n={n}: {out}")
    return out


def count_children(b: Backend) -> int:
    return int(
        b.scalar(f"SELECT count(*) FROM {b.table} WHERE queue_name = :q", q=REQUEST_QUEUE) or 0
    )


def run(quick: bool = False) -> dict[str, Any]:
    kinds = [*(["postgres"] if postgres_available() else []), "sqlite"]
    small = 1000 if quick else 10_000
    cap_big = 15.0 if quick else 45.0
    filing: list[dict[str, Any]] = []
    detach: list[dict[str, Any]] = []
    atomic: list[dict[str, Any]] = []
    bulk: list[dict[str, Any]] = []
    for kind in kinds:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        prof = LOG_DIR / f"fanout-{kind}.pyspy.txt" if kind == "postgres" else None
        filing.append(filing_run(kind, small, 400, f"fan{kind[:2]}{small}", profile_to=prof))
        filing.append(filing_run(kind, 100_000, cap_big, f"fan{kind[:2]}100k"))
        for n in (small, 100_000):
            detach.append(detach_run(kind, n, f"det{kind[:2]}{n}"))
        atomic.append(
            atomicity_run(kind, 300 if quick else 1000, 100 if quick else 300, f"atom{kind[:2]}")
        )
        bulk.append(bulk_enqueue_probe(kind, small, f"bulk{kind[:2]}"))
    return {"filing": filing, "detach": detach, "atomicity": atomic, "bulk": bulk}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = run(args.quick)
    for key in ("filing", "detach", "atomicity", "bulk"):
        for row in result[key]:
            print(key, {k: v for k, v in row.items() if k not in ("rss_samples", "profile")})
