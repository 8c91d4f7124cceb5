# ruff: noqa: RUF001
"""The closing section of BENCHMARKS.md: concrete code changes that would close the missed
targets, each tied to the figures (from results.json) that call for it."""

from __future__ import annotations

import statistics
from typing import Any


def _get(d: dict[str, Any], *path: Any, default: Any = None) -> Any:
    for key in path:
        if (isinstance(d, dict) and key in d) or (isinstance(d, list) and isinstance(key, int) and -len(d) <= key < len(d)):
            d = d[key]
        else:
            return default
    return d


def _pick(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return {}


def _num(value: Any, fmt: str = "{:,.0f}") -> str:
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return "?"


def _group(pairs: list[tuple[Any, dict[str, Any]]]) -> dict[Any, list[float]]:
    """First-window spread (first to L-th start, seconds) per key."""
    out: dict[Any, list[float]] = {}
    for key, run in pairs:
        rel, limit = run["starts_rel_s"], run["limit"]
        out.setdefault(key, []).append(rel[limit - 1] - rel[0])
    return out


def _role(prof: dict[str, Any] | None, prefix: str) -> float:
    for name, pct in (prof or {}).get("roles", []):
        if name.startswith(prefix):
            return float(pct)
    return 0.0


def findings(results: dict[str, Any], facts: dict[str, Any]) -> str:
    sec = results.get("sections", {})
    tp = sec.get("throughput", {})
    fo = sec.get("fanout", {})
    st = sec.get("startup", {})
    lim = sec.get("limiter", {})

    pg1 = _pick(tp.get("summary", []), backend="postgres", workers=1)
    pg2 = _pick(tp.get("summary", []), backend="postgres", workers=2)
    pg4 = _pick(tp.get("summary", []), backend="postgres", workers=4)
    sq1 = _pick(tp.get("summary", []), backend="sqlite", workers=1)
    tuned = _pick(tp.get("probes", []), probe="tuned", backend="postgres")
    prof_pg = _pick(tp.get("probes", []), probe="profile", backend="postgres").get("profile")
    fan_pg = _pick(fo.get("filing", []), backend="postgres", complete=True)
    fan_sq = _pick(fo.get("filing", []), backend="sqlite", complete=True)
    bulk_pg = _pick(fo.get("bulk", []), backend="postgres")
    bulk_sq = _pick(fo.get("bulk", []), backend="sqlite")
    submit = _get(st, "submit", "times", default={})
    fresh = _get(submit, "submit 4 IDs, fresh embedded database", "median_s")
    warm = _get(submit, "submit 4 IDs, existing embedded database", "median_s")
    err_pg = _pick(st.get("errors", []), backend="postgres")
    err_time = _get(err_pg, "times", "errors --limit 50", "median_s")
    imports = st.get("imports", {})
    imp = {k: _get(v, "median_s", default=float("nan")) for k, v in imports.items()}
    spreads = ", ".join(
        f"{statistics.median(v) * 1000:.0f} ms at {lim_}/{period:g} on {b}"
        for (b, lim_, period), v in sorted(
            _group([((r["backend"], r["limit"], r["period"]), r) for r in lim.get("runs", [])]).items()
        )
    ) or "see section 1"
    phases = {p["database"]: p for p in _get(st, "submit", "phases", default=[]) or []}
    profiled = bool(prof_pg and prof_pg.get("available"))

    saved = max(
        0.0,
        (imp.get("+ alembic (schema check)", 0.0) or 0.0) - (imp.get("+ sqlalchemy", 0.0) or 0.0),
    )
    items: list[str] = []

    items.append(
        f"""**File every child in one transaction** — `batches.py` (`run_attached`,
   `enqueue_detached`) and `workflows.py` (`run_batch`). Today `run_batch` calls
   `queue.enqueue(file_request, ...)` once per request inside the workflow: one
   system-database transaction per child (Postgres: {_num(fan_pg.get('pg_commits_per_child'), '{:.1f}')}
   commits and {_num(fan_pg.get('pg_rows_written_per_child'), '{:.1f}')} row writes per child), measured
   {_num(fan_pg.get('enqueue_rate'))} children/s on Postgres and {_num(fan_sq.get('enqueue_rate'))}/s on SQLite, so
   100,000 take ~{_num(100_000 / fan_pg['enqueue_rate'] if fan_pg.get('enqueue_rate') else None)} s and a kill leaves a runnable prefix of the batch.
   DBOS 3.4 has a public `DBOSClient.enqueue_in_transaction(conn, options, *args)`: insert
   the `batches` row and all N `file_request` workflows (same IDs `req-<batch>-<index>`, same
   inputs) in ONE transaction on the system database (accessctl uses one URL for both), and
   let `run_batch` only wait. The prototype in `bench/bench_fanout.py` (`bulk_enqueue_probe`)
   measured {_num(bulk_pg.get('rate'))} children/s on Postgres and {_num(bulk_sq.get('rate'))}/s on SQLite
   → 100,000 in ~{_num(bulk_pg.get('projected_100k_s'))} s / ~{_num(bulk_sq.get('projected_100k_s'))} s, and all-or-nothing by
   construction (closes the atomicity target). It also closes most of target 1's overshoot:
   the limiter can only admit children that exist, and today the first window's L starts are
   spread over the time the first L enqueues take (median first-window spread: {spreads}),
   a spread every later window inherits.
   Keep the idempotency: enqueue under the deterministic IDs and treat an existing
   `batches` row (same key) as "already filed". To get 100,000 under 60 s on Postgres as well,
   cut the per-child round trips (the probe still sends each child's rows one by one): build the
   rows with DBOS's own `build_enqueue_status` and insert them with one multi-row
   `executemany` per table (or psycopg pipeline mode) — that leans on DBOS internals — or
   **file lazily**: write the N requests to an application table (`batch_requests`, one
   `COPY`/`executemany`, atomic, seconds for 100,000) and have `run_batch` enqueue the next
   chunk (one transaction per chunk) whenever fewer than ~2L are ENQUEUED. Lazy filing also
   keeps `workflow_status` small and the batch workflow's memory flat (next item)."""
    )

    # As in section 4: the slope of the Postgres run that enqueued more children.
    pg_runs = sorted(
        (f for f in fo.get("filing", []) if f["backend"] == "postgres"),
        key=lambda f: f["enqueued"],
        reverse=True,
    )
    slope = pg_runs[0].get("rss_slope_kib_per_1k_children") if pg_runs else None
    slope_run = f"the {pg_runs[0]['enqueued']:,}-child run" if pg_runs else "?"
    items.append(
        f"""**Do not hold one handle and one checkpointed `get_result` per child** —
   `workflows.py`, `run_batch`. The batch workflow keeps a `deque` of N handles and then
   calls `handle.get_result()` on each in turn: memory grows with N (RSS slope
   {_num(slope)} KiB per 1,000 children in {slope_run} on Postgres, on top of the
   user-ID list in the CLI, in the pickled workflow input and in its unpickled copy), and
   every `get_result` is a recorded step (one more system-database write per request, and a
   poll every `poll_interval` while the child runs).{f" In the throughput profile the batch workflow's thread took {_role(prof_pg, 'batch workflow'):.0f}% of the worker's samples." if profiled else ""} Wait for the batch
   in bulk instead: poll `count(*)` of `accesses`/`errors` by `batch_id` (indexed) or
   `DBOS.list_workflows(workflow_id_prefix=f"req-{{batch}}-", status=...)` once per poll
   interval, and fetch individual results only for provider outcomes that need a retry
   decision (`transient`). With the children's IDs derivable from the index, the workflow
   needs neither the handles nor, with lazy filing, the N IDs in its input."""
    )

    items.append(
        f"""**Fewer statements per request** — `workflows.py`, `_record_access` (and
   `_check_request`). Each request's transaction does three look-ups (accesses by
   request_id, errors by request_id, the user) before its insert; DBOS adds its own
   checkpoint and status writes (Postgres: {_num(pg1.get('pg_commits_per_request'), '{:.1f}')} commits per request in the
   1-worker run, polling included). The look-ups guard against a replay writing twice, which
   the datasource checkpoint (same transaction) and the unique `request_id` already rule out:
   `INSERT ... ON CONFLICT (request_id) DO NOTHING` (both dialects) plus the foreign key on
   `user_id` (an FK violation → the `UnknownUser` error row) does it in one round trip. The
   plain loop in this benchmark does the same four statements and ran
   {_num(pg1.get('loop_rate_median'))} requests/s on Postgres, {_num(sq1.get('loop_rate_median'))}/s on SQLite."""
    )

    items.append(
        f"""**When the limit is lifted, poll faster and admit more** — `runtime.py`,
   `executing_runtime` / `queue_polling_interval`. With `ACCESSCTL_RATE_LIMIT=none` the
   request queue polls every `poll_interval` (0.1 s) with 10 in flight, and a finished
   request's slot is refilled only at the next poll. Measured: 1 worker
   {_num(pg1.get('rate_median'), '{:.1f}')} req/s, 2 workers {_num(pg2.get('rate_median'), '{:.1f}')}, 4 workers
   {_num(pg4.get('rate_median'), '{:.1f}')} on Postgres (medians){f"; the probe with `ACCESSCTL_CONCURRENCY=50` and `ACCESSCTL_POLL_INTERVAL=0.02` gave {tuned['rate']:.1f} req/s" if tuned else ""}.
   With one worker this 2-core machine was {_num((pg1.get('machine_busy_median') or 0) * 100)}% busy (the worker {_num((pg1.get('worker_cpu_util_median') or 0) * 100)}% of a core, the Postgres processes
   serving it {_num((pg1.get('pg_backend_cpu_util_median') or 0) * 100)}%), and Postgres's sessions mostly
   wait on the client (`idle in transaction:Client`), not on locks. So the per-request work
   (DBOS's checkpoints, status updates and dequeue transactions, each a round trip with
   SQLAlchemy/psycopg Python around it) is the bottleneck, and the changes above
   (fewer statements per request and per child) are what move it; a higher default
   concurrency and a 0.01–0.02 s poll when no limiter is configured remove the polling
   ceiling (10 per 0.1 s per process). Beyond that, ≥150 requests/s on 2 cores needs fewer
   workflows than requests: e.g. one `file_request` per chunk of k requests when no limit
   (and no provider) is configured, each chunk one transaction."""
    )

    shutdown = max((p.get("shutdown_s", 0) for p in phases.values()), default=0)
    if shutdown >= 0.8:
        items.append(
            f"""**Shutdown always sleeps ≥ 1 s** — `runtime.py`, `executing_runtime` (finally
   block). `DBOS.destroy(workflow_completion_timeout_sec=N)` with N > 0 runs
   `time.sleep(1)` before it first checks for active workflows (`dbos/_dbos.py`,
   `_destroy`), so every `submit`, `batch` and `worker --burst` exits ≥ 1 s after its work is
   done (measured: {shutdown:.2f} s from the batch's end to the process's exit). Wait for this
   process's in-flight requests with accessctl's own short poll (e.g. 0.05 s, up to
   `shutdown_grace`), then call `DBOS.destroy(workflow_completion_timeout_sec=0)`."""
        )

    items.append(
        f"""**A fresh database waits out DBOS's 1-s queue discovery** — `runtime.py`,
   `executing_runtime` (or `schema.migrate`). `DBOS.register_queue` runs after launch; DBOS's
   queue manager looks for new queues only once a second (`dbos/_queue.py`,
   `check_interval = 1.0`), so on a database whose queues are not registered yet (a fresh
   embedded database, or after `batch --detach` on a fresh Postgres) the batch workflow sits
   ENQUEUED {_num(_get(phases, 'fresh', 'queue_wait_s'), '{:.2f}')} s before it starts on a fresh database, against
   {_num(_get(phases, 'existing', 'queue_wait_s'), '{:.2f}')} s on an existing one (section 5). Register both queues in
   the system database before launch — `DBOSClient.register_queue(...)` exists for that —
   e.g. at the end of `schema.migrate`, so their threads start at launch. That takes the
   difference off a fresh `submit` ({_num(fresh, '{:.2f}')} s median measured; an existing database:
   {_num(warm, '{:.2f}')} s); the rest is start-up (imports and DBOS launch,
   {_num(_get(phases, 'fresh', 'startup_s'), '{:.2f}')} s before the batch workflow existed)."""
    )

    items.append(
        f"""**Read-only commands import what they do not need** — `schema.py`
   (`check_schema`, `current_revision`, `head_revision`), `queries.py`, `logs.py`.
   `accessctl errors --limit 50` took {_num(err_time, '{:.2f}')} s on Postgres while its query takes < 1 ms:
   it is all start-up. Side by side (section 5): `import accessctl.cli`
   {_num(imp.get('import accessctl.cli (what --help loads)', 0) * 1000)} ms, + structlog
   {_num(imp.get('+ structlog (logs)', 0) * 1000)} ms, + SQLAlchemy {_num(imp.get('+ sqlalchemy', 0) * 1000)} ms, + the ORM models
   {_num(imp.get('+ ORM models (accessctl.queries)', 0) * 1000)} ms, + Alembic {_num(imp.get('+ alembic (schema check)', 0) * 1000)} ms,
   + psycopg {_num(imp.get('+ psycopg', 0) * 1000)} ms (cumulative). Check the schema version with one
   `SELECT version_num FROM alembic_version` against a `SCHEMA_HEAD` constant (a unit test
   pins it to Alembic's head), so Alembic is imported only by `migrate`; define the tables
   the read commands query as Core `sa.Table`s in a module that does not import
   `sqlalchemy.orm`; and configure structlog lazily. The ORM models and Alembic account for
   up to {_num(saved * 1000)} ms of the {_num((err_time or 0) * 1000)} ms here, which would bring `errors` to
   ~{_num(((err_time or 0) - saved) * 1000)} ms on this machine (SQLAlchemy core and psycopg stay)."""
    )

    body = "\n\n".join(f"{i}. {text}" for i, text in enumerate(items, 1))
    return f"""## Findings for the code owners

Concrete changes that would close the missed targets, most effective first. None of them
was made here (the benchmarks only measure); each names the figures above that call for it.

{body}
"""
