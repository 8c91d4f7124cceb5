"""Issue #17 -- idle workers, pickup, scaling out -- per tree, side by side in one run.

Each tree runs its own ``.venv/bin/accessctl`` on fresh databases: the base release
(``--base``, default /work/wt-base: 0.2.0; skipped if absent) and the tree under test
(``--tree``, default: this checkout). Section ``workers`` of results.json:

* idle: one ``worker`` per tree and configuration (Postgres and SQLite, limit 50/30 and
  none), all at once; after a warm-up, over one window: its CPU (``/proc/PID/stat``) and its
  database's transactions/s (``pg_stat_database`` commits + rollbacks);
* pickup: then each worker in turn, idle for ``rest`` s, gets ``batch 1 --detach``: the
  request's ``created_at`` (in the filing transaction) to its start (DBOS's ``started_at``);
* scaling (Postgres, limit none): ``batch N --detach``, then 1, 2 and 4 ``worker --burst``,
  trees interleaved, and the tree under test again with the concurrency raised to
  ``RAISED``; in the same rounds the plain loop and DBOS as it comes: the request as
  a DBOS workflow (a step calling an in-process fake provider that approves at once, then
  the loop's statements in a DBOS datasource transaction, or a plain one) on a queue with
  DBOS's defaults, N enqueued by a DBOSClient, then one process launched to run them.

    uv run --group bench python bench/compare_releases.py [--quick] [--base PATH] [--tree PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common
import sqlalchemy as sa
import tables
from bench_throughput import (
    loop_baseline,
    proc_cpu_s,
    record,
    request_span,
    workers_run,
    xacts_per_request,
)

RAISED = 50  # the concurrency of the scaling run that raises it
IDLE = [("postgres", "50/30"), ("postgres", "none"), ("sqlite", "50/30"), ("sqlite", "none")]


def trees(base: str, tree: str) -> dict[str, str]:
    """label ("0.2.0 (e721c24)") -> the tree's accessctl."""
    def out(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()

    found = {}
    for path in [p for p in (base, tree) if Path(p, ".venv/bin/accessctl").exists()]:
        exe, commit = str(Path(path, ".venv/bin/accessctl")), out("git", "-C", path, "rev-parse", "--short", "HEAD")
        changed = "+changes" if out("git", "-C", path, "status", "--porcelain", "src") else ""
        found[f"{out(exe, '--version').split()[-1]} ({commit}{changed})"] = exe
    return found


@contextlib.contextmanager
def tree_cli(exe: str) -> Iterator[None]:
    """common's helpers (backend, run_cli, spawn_cli) run this tree's accessctl meanwhile."""
    saved, common.ACCESSCTL = common.ACCESSCTL, exe
    try:
        yield
    finally:
        common.ACCESSCTL = saved


def xacts(b: common.Backend) -> int:
    return sum(v for k, v in common.pg_counters(b).items() if k.startswith("xact_"))


def idle_and_pickup(trees: dict[str, str], quick: bool) -> dict[str, Any]:
    warm, window, rest, samples = (10, 20, 15, 3) if quick else (10, 60, 30, 5)
    with contextlib.ExitStack() as stack:
        live: list[dict[str, Any]] = []
        for (kind, limit), (label, exe) in [(c, t) for c in IDLE for t in trees.items()]:
            tag = f"idle{kind[:2]}{limit[:2]}{len(live)}"
            with tree_cli(exe):
                b = stack.enter_context(common.backend(kind, tag, users=False))
                env = {**b.env, "ACCESSCTL_RATE_LIMIT": limit}
                common.run_cli(env, ["limit", "set", limit], f"{tag}-limit", check=False)  # 0.2.0: no such command
                proc = common.spawn_cli(env, ["worker"], f"{tag}-worker")
            stack.callback(proc.kill, signal.SIGTERM)
            live.append({"tree": label, "backend": kind, "limit": limit, "b": b, "env": env, "exe": exe, "proc": proc, "tag": tag})
        for x in live:  # all up (imports, schema check, DBOS launch) before the warm-up
            while not common.find_event(x["proc"].name, ["worker started"]):
                assert x["proc"].poll() is None, f"{x['proc'].name} exited"
                time.sleep(0.1)
        time.sleep(warm)
        before = [(proc_cpu_s(x["proc"].pid), xacts(x["b"])) for x in live]
        t0 = time.monotonic()
        time.sleep(window)
        dt = time.monotonic() - t0
        idle = []
        for x, (cpu0, xa0) in zip(live, before, strict=True):
            cpu, pg = proc_cpu_s(x["proc"].pid) - cpu0, xacts(x["b"]) - xa0
            assert x["proc"].poll() is None, f"{x['proc'].name} exited"
            idle.append({k: x[k] for k in ("tree", "backend", "limit")} | {
                "cpu_pct": round(100 * cpu / dt, 2), "pg_xacts_per_s": round(pg / dt, 2) if x["backend"] == "postgres" else None})  # fmt: skip
            x["idle_since"], x["pickup_s"] = time.monotonic() - dt - warm, []
            common.log(f"idle {x['tree']} {x['backend']} {x['limit']}: {idle[-1]}")
        for _ in range(samples):
            for x in live:
                time.sleep(max(0.0, x["idle_since"] + rest - time.monotonic()))
                x["pickup_s"].append(pickup(x))
                x["idle_since"] = time.monotonic() + 2  # the batch of one ends soon after
        pickups = [{k: x[k] for k in ("tree", "backend", "limit", "pickup_s")} for x in live]
    return {"window_s": round(dt, 1), "warm_up_s": warm, "rest_s": rest, "idle": idle, "pickup": pickups}


def pickup(x: dict[str, Any]) -> float | None:
    """File one request; seconds from its created_at to its start (None: not in 60 s)."""
    with tree_cli(x["exe"]):
        batch_id = common.run_cli(x["env"], ["batch", "1", "--detach"], f"{x['tag']}-pickup").stdout.split()[-1]
    sql = f"SELECT started_at_epoch_ms - created_at FROM {x['b'].table} WHERE workflow_uuid LIKE :p AND started_at_epoch_ms IS NOT NULL"  # fmt: skip
    deadline, took = time.monotonic() + 60, None
    with contextlib.closing(x["b"].engine().connect()) as conn:
        while took is None and time.monotonic() < deadline:
            took = conn.execute(sa.text(sql), {"p": f"req-{batch_id}-%"}).scalar()
            conn.rollback()  # a fresh snapshot each time
            time.sleep(0.01)
    common.log(f"pickup {x['tree']} {x['backend']} {x['limit']}: {took} ms")
    return None if took is None else round(took / 1000, 3)


def dbos_plain(n: int, mode: str, tag: str) -> dict[str, Any]:
    with common.backend("postgres", tag) as b:
        cmd = [sys.executable, __file__, "dbos-plain", b.url, str(n), mode]
        with open(common.stderr_path(f"{tag}-dbos"), "ab") as err:
            out = subprocess.run(cmd, env=common.base_env(), stdout=subprocess.PIPE, stderr=err, text=True, timeout=900)
        assert out.returncode == 0, f"{cmd} exited {out.returncode}; see {common.LOG_DIR}"
        res = json.loads(out.stdout.splitlines()[-1])
        common.log(f"DBOS as it comes ({mode}), n={n}: {res['rate']} req/s, {res.get('pg_xacts_per_request')} xacts/request")
        return res


def _dbos_plain_main(url: str, n: int, mode: str) -> None:
    """DBOS as it comes, in this process (a subprocess of the bench): see the docstring."""
    from dbos import DBOS, DBOSClient, SQLAlchemyDatasource

    b, batch_id = common.Backend("postgres", url, {}), uuid.uuid4()
    client = DBOSClient(system_database_url=url)
    client.register_queue("plain")
    options: Any = {"queue_name": "plain", "workflow_name": "plain.request", "app_version": "plain"}
    for i in range(n):
        client.enqueue(options, f"plain-{batch_id}-{i}", common.SEED_USER_IDS[i % 4], str(batch_id))
    client.destroy()
    DBOS(config={"name": "plain", "system_database_url": url, "application_version": "plain"})
    datasource = SQLAlchemyDatasource.create(url)
    engine = sa.create_engine(url)

    @DBOS.step()
    def call_provider(request_id: str, user_id: str) -> dict[str, str]:
        return {"outcome": "approved"}  # the fake provider: approves at once

    @datasource.transaction()
    def record_tx(request_id: str, user_id: str, batch: str) -> None:
        record(datasource.sql_session(), request_id, uuid.UUID(user_id), uuid.UUID(batch))

    @DBOS.workflow(name="plain.request")
    def request(request_id: str, user_id: str, batch: str) -> None:
        call_provider(request_id, user_id)
        if mode == "datasource":
            return record_tx(request_id, user_id, batch)
        with engine.begin() as conn:
            record(conn, request_id, uuid.UUID(user_id), uuid.UUID(batch))

    poller = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.StaticPool)
    before, polls = common.pg_counters(b), 0
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    DBOS.launch()
    DBOS.register_queue("plain")
    with poller.connect() as conn:
        while conn.scalar(sa.text("SELECT count(*) FROM accesses WHERE batch_id = :b"), {"b": batch_id}) < n:
            polls += 1
            time.sleep(0.1)
    wall, cpu1 = time.time() - t0, resource.getrusage(resource.RUSAGE_SELF)
    DBOS.destroy()
    poller.dispose()
    before["xact_commit"] += polls  # the bench's own polls: one transaction each
    first, last = b.rows(f"SELECT min(started_at_epoch_ms), max(updated_at) FROM {b.table} WHERE queue_name = 'plain'")[0]
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    print(json.dumps({"mode": mode, "n": n, "wall_s": round(wall, 2), "rate": round(n / wall, 1),
                      "steady_rate": round(n * 1000 / (last - first), 1), "cpu_util": round(cpu / wall, 2),
                      **xacts_per_request(b, before, n, settle=1.2)}))  # fmt: skip


def fleet_run(n: int, workers: int, tag: str) -> dict[str, Any]:
    """``workers`` workers already up and idle (as services run), then ``batch N --detach``:
    req/s from the filing command's start to the last request's end, with no interpreter
    starting meanwhile; CPU per worker and Postgres transactions over that span only."""
    with common.backend("postgres", tag) as b:
        env = {**b.env, "ACCESSCTL_RATE_LIMIT": "none"}
        with contextlib.suppress(RuntimeError):  # 0.2.0 has no `limit` command: env only
            common.set_shared_limit(env, tag)
        procs = [common.spawn_cli(env, ["worker"], f"{tag}-w{i}") for i in range(workers)]
        try:
            for proc in procs:
                while not common.find_event(proc.name, ["worker started"]):
                    assert proc.poll() is None, f"{proc.name} exited"
                    time.sleep(0.05)
            time.sleep(2.0)  # past start-up: every worker idle
            cpu0, xacts0, wall0 = [proc_cpu_s(p.pid) for p in procs], xacts(b), time.time()
            common.run_cli(env, ["batch", str(n), "--detach"], f"{tag}-detach")
            deadline = time.monotonic() + max(180.0, n / 10)
            while int(b.scalar("SELECT count(*) FROM accesses") or 0) < n:
                assert time.monotonic() < deadline, f"{tag}: not every request recorded"
                time.sleep(0.05)
            cpu = [proc_cpu_s(p.pid) - c for p, c in zip(procs, cpu0, strict=True)]
            pg = xacts(b) - xacts0
        finally:
            for proc in procs:
                proc.kill(signal.SIGTERM)
        first_start, last_end = request_span(b)
    wall = last_end - wall0
    out = {
        "workers": workers, "n": n, "rate": round(n / wall, 1), "steady_rate": round(n / (last_end - first_start), 1),
        "pg_xacts_per_request": round(pg / n, 2), "worker_cpu_util": [round(c / wall, 2) for c in cpu],
        "running_first": True,
    }  # fmt: skip
    common.log(f"fleet workers={workers} n={n}: {out}")
    return out


def scaling(trees: dict[str, str], quick: bool) -> dict[str, Any]:
    n, reps = (1000, 1) if quick else (3000, 2)
    n_dbos = min(n // 2, 1000)
    runs, baselines = [], []
    for rep in range(reps):
        with common.backend("postgres", f"wkloop{rep}") as b:
            baselines.append({"what": "loop", "rep": rep, **loop_baseline(b, n)})
        for mode in ("datasource", "plain"):
            baselines.append({"what": f"dbos-{mode}", "rep": rep, **dbos_plain(n_dbos, mode, f"wkdbos{rep}")})
        for w in (1, 2, 4):
            for label, exe in list(trees.items())[:: -1 if rep % 2 else 1]:
                with tree_cli(exe):
                    r = workers_run("postgres", n, w, f"wk{w}r{rep}")
                runs.append({"tree": label, "rep": rep, **r})
        # Workers already running when the batch is filed, as services are: no
        # interpreter starts during the measured span.
        for w in (1, 2, 4):
            for label, exe in list(trees.items())[:: -1 if rep % 2 else 1]:
                with tree_cli(exe):
                    runs.append({"tree": label, "rep": rep, **fleet_run(n, w, f"wf{w}r{rep}")})
        # The tree under test with the concurrency raised too (10 in flight bound the rest).
        label, exe = list(trees.items())[-1]
        for w in (1, 2, 4):
            with tree_cli(exe):
                r = workers_run("postgres", n, w, f"wkc{w}r{rep}", extra_env={"ACCESSCTL_CONCURRENCY": str(RAISED)})
            runs.append({"tree": label, "rep": rep, **r})
    return {"n": n, "n_dbos": n_dbos, "repeats": reps, "runs": runs, "baselines": baselines}


def run(quick: bool = False, base: str = "/work/wt-base", tree: str = str(common.ROOT)) -> dict[str, Any]:
    t0, found = time.monotonic(), trees(base, tree)
    out = {"date": common.machine_facts()["date"], "quick": quick, "trees": found, "load_start": common.load_average()}
    out |= idle_and_pickup(found, quick) | scaling(found, quick)
    return out | {"load_end": common.load_average(), "duration_s": round(time.monotonic() - t0)}


def main() -> int:
    if sys.argv[1:2] == ["dbos-plain"]:
        _dbos_plain_main(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter windows, fewer samples, smaller N")
    parser.add_argument("--base", default="/work/wt-base", help="the release to compare with")
    parser.add_argument("--tree", default=str(common.ROOT), help="the tree under test")
    args = parser.parse_args()
    results = json.loads(tables.RESULTS.read_text())
    results["sections"]["workers"] = run(args.quick, args.base, args.tree)
    common.save_json(tables.RESULTS, results)
    tables.write(results)  # BENCHMARKS.md's tables
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
