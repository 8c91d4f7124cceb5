"""Target 2 -- throughput with the limit lifted (``ACCESSCTL_RATE_LIMIT=none``).

Per repetition and backend, side by side on fresh databases:

* ``loop``: a plain SQLAlchemy loop doing the same work as one request's transaction
  (look up the request's ``accesses``/``errors`` rows and the user, insert the ``accesses``
  row), one transaction per request, on the same engine settings accessctl uses;
* ``accessctl batch N --detach`` then 1, 2 and 4 ``accessctl worker --burst`` processes
  started together; the rate is N / (time from starting the workers until all exited).

It also records each worker's CPU time (``wait4``), the machine's CPU use, Postgres
commits per request (``pg_stat_database``), sampled Postgres wait events, and, once per
backend, a py-spy profile of a single worker.

    uv run --group bench python bench/bench_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from common import (
    LOG_DIR,
    REQUEST_QUEUE,
    SEED_USERS,
    Backend,
    MachineCpu,
    Sampler,
    backend,
    log,
    median,
    pg_counters,
    postgres_available,
    run_cli,
    spawn_cli,
    start_profile,
    summarize_profile,
)
from sqlalchemy.orm import Session


def loop_baseline(b: Backend, n: int) -> dict[str, Any]:
    """One SQLAlchemy transaction per request: the floor the durable path is compared to."""
    from accessctl.db import make_engine
    from accessctl.models import Access, AccessStatus, Error, User

    engine = make_engine(b.url)
    batch_id = uuid.uuid4()
    users = [uuid.UUID(u) for u in SEED_USERS]
    try:
        t0 = time.perf_counter()
        for i in range(n):
            request_id = f"loop-{batch_id}-{i:07d}"
            user_id = users[i % len(users)]
            with Session(engine) as session, session.begin():
                if session.scalar(sa.select(Access.id).where(Access.request_id == request_id)):
                    continue
                if session.scalar(sa.select(Error.id).where(Error.request_id == request_id)):
                    continue
                if session.get(User, user_id) is None:
                    continue
                session.add(
                    Access(
                        user_id=user_id,
                        status=AccessStatus.REQUESTED,
                        request_id=request_id,
                        batch_id=batch_id,
                    )
                )
        elapsed = time.perf_counter() - t0
    finally:
        engine.dispose()
    return {"n": n, "seconds": round(elapsed, 3), "rate": round(n / elapsed, 1)}


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (0 once it is gone)."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pg_waits(b: Backend) -> tuple[sa.Engine, Any, dict[int, float]]:
    """A probe for the sampler: what this database's sessions are doing right now; it also
    keeps the CPU time of every server process that served this database."""
    engine = b.engine()
    backend_cpu: dict[int, float] = {}

    def probe() -> dict[str, int]:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT pid, state, coalesce(wait_event_type, 'CPU') FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).all()
        counts: dict[str, int] = {}
        for pid, state, wait in rows:
            backend_cpu[pid] = max(backend_cpu.get(pid, 0.0), _proc_cpu_s(pid))
            if state not in ("active", "idle in transaction"):
                continue
            key = f"{state}:{wait}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    return engine, probe, backend_cpu


def workers_run(
    kind: str,
    n: int,
    workers: int,
    tag: str,
    *,
    extra_env: dict[str, str] | None = None,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    with backend(kind, tag) as b:
        env = {**b.env, "ACCESSCTL_RATE_LIMIT": "none", **(extra_env or {})}
        run_cli(env, ["batch", str(n), "--detach"], f"{tag}-detach")
        before = pg_counters(b)
        wait_engine, wait_probe, backend_cpu = (
            pg_waits(b) if kind == "postgres" else (None, None, {})
        )
        sampler = Sampler(wait_probe, 0.25) if wait_probe else None
        with MachineCpu() as machine:
            if sampler:
                sampler.__enter__()
            t0 = time.monotonic()
            procs = [spawn_cli(env, ["worker", "--burst"], f"{tag}-w{i}") for i in range(workers)]
            profiler = (
                start_profile(procs[0].pid, profile_to, duration=600) if profile_to else None
            )
            finished = [p.wait(timeout=900) for p in procs]
            wall = time.monotonic() - t0
            if sampler:
                sampler.__exit__()
        if profiler is not None:
            profiler.wait(timeout=60)
        if wait_engine is not None:
            wait_engine.dispose()
        time.sleep(1.2 if kind == "postgres" else 0)  # let backends flush their stats
        after = pg_counters(b)
        recorded = int(b.scalar("SELECT count(*) FROM accesses") or 0)
        spans = b.rows(
            f"SELECT min(started_at_epoch_ms), max(updated_at), min(created_at), "
            f"max(created_at) FROM {b.table} WHERE queue_name = :q",
            q=REQUEST_QUEUE,
        )[0]
        parent_start = b.scalar(
            f"SELECT started_at_epoch_ms FROM {b.table} WHERE queue_name = 'access-batches'"
        )
    steady = (int(spans[1]) - int(spans[0])) / 1000
    fanout = (int(spans[3]) - int(parent_start)) / 1000 if parent_start else float("nan")
    out: dict[str, Any] = {
        "backend": kind,
        "workers": workers,
        "n": n,
        "env": extra_env or {},
        "recorded": recorded,
        "exit_codes": [f.returncode for f in finished],
        "wall_s": round(wall, 2),
        "rate": round(n / wall, 1),
        "steady_rate": round(n / steady, 1),
        "fanout_s": round(fanout, 2),
        "worker_cpu_s": [round(f.cpu, 1) for f in finished],
        "worker_cpu_util": [round(f.cpu / f.wall, 2) for f in finished],
        "worker_maxrss_mib": [round(f.maxrss_kib / 1024, 1) for f in finished],
        "machine_busy": round(machine.busy, 2),
    }
    if backend_cpu:
        # Server processes that served this database (sampled every 0.25 s).
        out["pg_backend_cpu_s"] = round(sum(backend_cpu.values()), 1)
        out["pg_backend_cpu_util"] = round(sum(backend_cpu.values()) / wall, 2)
    if before and after:
        out["pg_commits_per_request"] = round((after["xact_commit"] - before["xact_commit"]) / n, 1)
        out["pg_rows_written_per_request"] = round(
            sum(after[k] - before[k] for k in ("tup_inserted", "tup_updated", "tup_deleted")) / n,
            1,
        )
    if sampler and sampler.samples:
        totals: dict[str, int] = {}
        for _, counts in sampler.samples:
            for key, value in counts.items():
                totals[key] = totals.get(key, 0) + value
        out["pg_sessions_avg"] = {
            k: round(v / len(sampler.samples), 2) for k, v in sorted(totals.items())
        }
    if profile_to is not None:
        out["profile"] = summarize_profile(profile_to)
    log(
        f"throughput {kind} workers={workers} n={n} {extra_env or ''}: {out['rate']} req/s "
        f"(steady {out['steady_rate']}), wall {wall:.1f}s, worker cpu {out['worker_cpu_util']}, "
        f"machine busy {out['machine_busy']}, recorded {recorded}"
    )
    return out


def run(quick: bool = False) -> dict[str, Any]:
    kinds = [*(["postgres"] if postgres_available() else []), "sqlite"]
    n = 300 if quick else 2000
    repeats = 2 if quick else 3
    worker_counts = [1, 2] if quick else [1, 2, 4]
    runs: list[dict[str, Any]] = []
    loops: list[dict[str, Any]] = []
    for rep in range(repeats):
        for kind in kinds:
            with backend(kind, f"loop{kind[:2]}{rep}") as b:
                loop = {"backend": kind, "rep": rep, **loop_baseline(b, n)}
            loops.append(loop)
            log(f"loop {kind} rep {rep}: {loop['rate']} req/s")
            for w in worker_counts:
                if w > 2 and rep > 0:
                    continue  # 4 workers: once (the target is about <= 2; time box)
                r = workers_run(kind, n, w, f"tp{kind[:2]}w{w}r{rep}")
                r["rep"] = rep
                r["loop_rate_same_rep"] = loop["rate"]
                r["loop_ratio"] = round(loop["rate"] / r["rate"], 1)
                runs.append(r)
    # Probes, once each: what a single worker spends its time on, and whether the
    # existing knobs (more in flight, faster polling) lift the rate.
    probes: list[dict[str, Any]] = []
    for kind in kinds if not quick else []:
        prof = LOG_DIR / f"throughput-{kind}.pyspy.txt"
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        probes.append(
            {"probe": "profile", **workers_run(kind, n, 1, f"prof{kind[:2]}", profile_to=prof)}
        )
        if kind == "postgres":
            tuned = {"ACCESSCTL_CONCURRENCY": "50", "ACCESSCTL_POLL_INTERVAL": "0.02"}
            probes.append(
                {"probe": "tuned", **workers_run(kind, n, 2, f"tun{kind[:2]}", extra_env=tuned)}
            )
    summary: list[dict[str, Any]] = []
    for kind in kinds:
        loop_rates = [x["rate"] for x in loops if x["backend"] == kind]
        for w in worker_counts:
            mine = [x for x in runs if x["backend"] == kind and x["workers"] == w]
            summary.append(
                {
                    "backend": kind,
                    "workers": w,
                    "n": n,
                    "runs": len(mine),
                    "rate_median": median([x["rate"] for x in mine]),
                    "steady_rate_median": median([x["steady_rate"] for x in mine]),
                    "loop_rate_median": median(loop_rates),
                    "loop_ratio_median": median([x["loop_ratio"] for x in mine]),
                    "worker_cpu_util_median": median(
                        [sum(x["worker_cpu_util"]) / len(x["worker_cpu_util"]) for x in mine]
                    ),
                    "machine_busy_median": median([x["machine_busy"] for x in mine]),
                    "pg_backend_cpu_util_median": median(
                        [x["pg_backend_cpu_util"] for x in mine if "pg_backend_cpu_util" in x]
                    ),
                    "fanout_s_median": median([x["fanout_s"] for x in mine]),
                    "pg_commits_per_request": median(
                        [x.get("pg_commits_per_request", float("nan")) for x in mine]
                    ),
                    "all_recorded": all(x["recorded"] == n for x in mine),
                }
            )
    return {"n": n, "repeats": repeats, "runs": runs, "loops": loops, "probes": probes,
            "summary": summary}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = run(args.quick)
    for row in result["summary"]:
        print(row)
