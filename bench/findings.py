# ruff: noqa: RUF001
"""The closing section of BENCHMARKS.md: what 0.2.0 changed, with the figures of this run
that show each change at work, and for every target this run still missed, why and what
would close it -- all derived from results.json."""

from __future__ import annotations

import math
import statistics
from typing import Any

# The 0.1.0 figures the changes were made against: the full run committed with the
# benchmarks (commit c6f2a91, BENCHMARKS.md), quoted for comparison only.
BEFORE = {
    "source": "0.1.0, full run of commit c6f2a91",
    "children_per_s_postgres": 166,
    "children_per_s_sqlite": 651,
    "throughput_postgres_2w": 40.8,
    "throughput_sqlite_2w": 74.1,
    "commits_per_request_postgres_1w": 28.3,
    "fresh_queue_wait_s": 1.09,
    "errors_postgres_s": 0.60,
}


def _get(d: Any, *path: Any, default: Any = None) -> Any:
    for key in path:
        if (isinstance(d, dict) and key in d) or (
            isinstance(d, list) and isinstance(key, int) and -len(d) <= key < len(d)
        ):
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
        if isinstance(value, float) and math.isnan(value):
            return "?"
        return fmt.format(value)
    except (TypeError, ValueError):
        return "?"


def _median(values: list[float]) -> float:
    clean = [v for v in values if v is not None and v == v]
    return float(statistics.median(clean)) if clean else float("nan")


def _role(prof: dict[str, Any] | None, prefix: str) -> float:
    for name, pct in (prof or {}).get("roles", []):
        if name.startswith(prefix):
            return float(pct)
    return 0.0


def _changes(results: dict[str, Any]) -> list[str]:
    sec = results.get("sections", {})
    tp, fo, st = sec.get("throughput", {}), sec.get("fanout", {}), sec.get("startup", {})
    big = fo.get("sizes", [10_000, 100_000])[1]
    fil = {(f["backend"], f["n"]): f for f in fo.get("filing", [])}
    ins = {p["backend"]: p for p in fo.get("insert_probe", [])}
    atom = {a["backend"]: a for a in fo.get("atomicity", [])}
    by = {(s["backend"], s["workers"]): s for s in tp.get("summary", [])}
    items: list[str] = []

    # 1. filing
    pg_big, sq_big = fil.get(("postgres", big), {}), fil.get(("sqlite", big), {})

    def _filed(f: dict[str, Any]) -> str:
        if not f:
            return "not measured"
        rate = f["n"] / f["transaction_s"] if f.get("transaction_s") else float("nan")
        return (
            f"{_num(f.get('visible_s'), '{:.1f}')} s end to end, the transaction "
            f"{_num(f.get('transaction_s'), '{:.2f}')} s (~{_num(rate)} requests/s)"
        )

    ratio_text = "; ".join(
        f"{k}: {_num(p['dbos_init_workflows_s'], '{:.2f}')} s against {_num(p['accessctl_executemany_s'], '{:.2f}')} s "
        f"for {p['n']:,} rows, {_num(p['ratio'], '{:.0f}')}×"
        for k, p in ins.items()
    )
    all_or_none = ", ".join(
        f"{k}: {'all-or-none held' if a.get('all_or_none') else 'all-or-none did NOT hold'}"
        for k, a in atom.items()
    )
    items.append(
        f"""**A batch is filed in one transaction** — `filing.py` (`file_batch`), called by
   `batches.run_attached` and `batches.enqueue_detached`. The `batches` row, refused input
   lines, the `run_batch` workflow and all N `file_request` workflows are written in one
   transaction, the workflow rows built by `DBOSClient`'s own status builder and inserted
   with one compiled `INSERT` run by `executemany` per table and round of
   {_num(fo.get("chunk"))} requests.
   Filing {big:,} attached: Postgres {_filed(pg_big)}; SQLite {_filed(sq_big)} (section 3).
   DBOS's own bulk enqueue (`SystemDatabase.init_workflows`) writes the same rows as
   multi-row `VALUES` statements of 500 rows, compiled anew for every chunk; measured on the
   same rows: {ratio_text or "not measured"}. A kill while filing leaves nothing, a kill after
   the commit leaves the whole batch ({all_or_none or "not measured"}), and since every
   request exists at the commit the limiter can admit a full window at once. For comparison,
   {BEFORE["source"]}: the parent workflow enqueued children one transaction each,
   {BEFORE["children_per_s_postgres"]}/s on Postgres and {BEFORE["children_per_s_sqlite"]}/s on SQLite (100,000 in
   ~{100_000 // BEFORE["children_per_s_postgres"]} s), and a kill left a runnable prefix of the batch."""
    )

    # 2. plain keyed transactions
    pg1, pg2 = by.get(("postgres", 1), {}), by.get(("postgres", 2), {})
    sq1, sq2 = by.get(("sqlite", 1), {}), by.get(("sqlite", 2), {})
    items.append(
        f"""**Request transactions are plain keyed transactions** — `workflows._record_access`,
   `_record_error`, `_check_request`, run by `_run_tx`. Each is one transaction of our own
   that looks the request up by its unique `request_id` (outcome and user in one round
   trip) before writing, so a replay finds its row and writes nothing. It replaced a DBOS
   datasource transaction (about four statements per request of its own, plus ownership
   and checkpoint bookkeeping) and then a DBOS step around it (two round trips and a fifth
   of a worker's time per request); only the provider call remains a DBOS step. Measured with one worker on Postgres:
   {_num(pg1.get("pg_commits_per_request"), "{:.1f}")} commits per request (DBOS's claim, status and output
   writes included; {BEFORE["source"]}: {BEFORE["commits_per_request_postgres_1w"]}, which also counted the
   parent's enqueue of each child and its recorded `get_result`), and
   {_num(pg1.get("rate_median"), "{:.0f}")} / {_num(pg2.get("rate_median"), "{:.0f}")} requests/s with 1 / 2 workers on
   Postgres, {_num(sq1.get("rate_median"), "{:.0f}")} / {_num(sq2.get("rate_median"), "{:.0f}")} on SQLite (section 2;
   {BEFORE["source"]}: {BEFORE["throughput_postgres_2w"]} and {BEFORE["throughput_sqlite_2w"]} with 2 workers, at N = 2,000)."""
    )

    # 3. pool, isolation, polling
    peak4 = by.get(("postgres", 4), {}).get("pg_connections_peak")
    items.append(
        f"""**One shared pool; READ COMMITTED; 0.02-s polling when unlimited** —
   `runtime.executing_runtime`, `_dbos_config`, `queue_polling_interval`; `db.make_engine`.
   DBOS and accessctl's transactions share one engine per process (its pool sized from
   the concurrency in `executing_runtime`, so connections are kept instead of opened per
   request; the liveness ping before each checkout stays: ~10% of the rate with the limit
   lifted, for a pool that survives a database restart); the request transactions run at the engine's default isolation (READ
   COMMITTED on Postgres); with `ACCESSCTL_RATE_LIMIT=none` the request queue polls every
   0.02 s so a finished request's slot is refilled quickly. Measured: workers reached their
   first request {_num(pg1.get("launch_s_median"), "{:.2f}")} s after starting (Postgres, 1 worker, median);
   4 workers held at most {_num(peak4)} connections to the benchmark's database (the server's
   `max_connections`: {_num(tp.get("pg_max_connections"))}, shared by every worker and client)."""
    )

    # 4. queues before launch
    phases = {p["database"]: p for p in _get(st, "submit", "phases", default=[]) or []}
    items.append(
        f"""**Queues registered before launch** — `runtime.register_queues` (through the
   `DBOSClient`, before `DBOS.launch()`). DBOS starts a queue's thread at launch for every
   queue it already knows, instead of finding new ones on its next once-a-second scan. The
   batch workflow of a `submit` on a fresh embedded database waited
   {_num(_get(phases, "fresh", "queue_wait_s"), "{:.2f}")} s in its queue ({_num(_get(phases, "existing", "queue_wait_s"), "{:.2f}")} s on an existing one;
   {BEFORE["source"]}: {BEFORE["fresh_queue_wait_s"]} s fresh)."""
    )

    # 5. schema check
    imports = st.get("imports", {})
    imp = {k: _get(v, "median_s", default=float("nan")) for k, v in imports.items()}
    with_schema = next((v for k, v in imp.items() if k.startswith("+ schema check")), float("nan"))
    with_alembic = next((v for k, v in imp.items() if k.startswith("+ alembic")), float("nan"))
    with_psycopg = next((v for k, v in imp.items() if k.startswith("+ psycopg")), float("nan"))
    err_pg = _pick(st.get("errors", []), backend="postgres")
    alembic_loaded = _get(err_pg, "modules", "alembic")
    items.append(
        f"""**The schema check without Alembic** — `schema.check_schema`. It reads
   `SELECT version_num FROM alembic_version` and compares it with `SCHEMA_HEAD`; Alembic is
   imported only when they differ, and by `migrate`. `accessctl errors` loaded Alembic:
   {"yes" if alembic_loaded else "no" if alembic_loaded is not None else "?"} (section 5). Importing up to the schema check takes
   {_num(with_schema * 1000)} ms, with psycopg {_num(with_psycopg * 1000)} ms; Alembic would add
   {_num((with_alembic - with_psycopg) * 1000)} ms. `errors --limit 50` on Postgres:
   {_num(_get(err_pg, "times", "errors --limit 50", "median_s"), "{:.2f}")} s median ({BEFORE["source"]}: {BEFORE["errors_postgres_s"]} s)."""
    )
    return items


def _misses(results: dict[str, Any]) -> list[str]:
    """Why each target this run missed was missed, and what would close it."""
    sec = results.get("sections", {})
    lim, tp, fo, st = (sec.get(k, {}) for k in ("limiter", "throughput", "fanout", "startup"))
    out: list[str] = []

    # 1. limiter
    for s in lim.get("summary", []):
        mine = [
            r
            for r in lim.get("runs", [])
            if r["backend"] == s["backend"] and r["limit"] == s["limit"]
        ]
        if not mine:
            continue
        if not s["window_met"]:
            out.append(
                f"**Limiter {s['limit']}/{s['period']:g} on {s['backend']}: a window held "
                f"{s['max_in_window_worst']} starts (L = {s['limit']}).** The claim admitted more than L "
                "in one P: a correctness bug in the claim's serialization; reproduce with "
                "`tests/test_rate_limit.py` at this L/P."
            )
        if not s["finish_met"]:
            rel = [r["starts_rel_s"] for r in mine]
            limit, period = s["limit"], s["period"]
            windows = mine[0]["n"] // limit
            opening = _median(
                [
                    sum(x[k * limit] - x[(k - 1) * limit] - period for k in range(1, windows))
                    for x in rel
                ]
            )
            spread = _median([x[limit - 1] - x[0] for x in rel])
            excess = s["start_span_s_median"] - s["bound_s"]
            concurrency = 10
            polls = math.ceil(limit / concurrency)
            poll = min(0.1, max(0.02, period / 50))
            if spread >= opening:
                fix = (
                    f"the first window's spread ({spread * 1000:.0f} ms) dominates: with the default "
                    f"concurrency of {concurrency} the queue can start at most {concurrency} at a time, so L = "
                    f"{limit} starts take at least {polls} claims; each claim waits for the previous "
                    f"requests to finish and for the next poll ({poll:.2f} s). Letting the first window "
                    f"start at once (concurrency ≥ L for the window's first claim, or polling again right "
                    "after a claim that filled every free slot) removes it"
                )
            else:
                fix = (
                    f"windows opening late ({opening * 1000:.0f} ms summed over {windows - 1} window(s)) "
                    f"dominate: each opens at the first poll after its slot frees (every {poll:.2f} s). "
                    "Scheduling the next poll at the oldest start + P (the moment a slot frees) instead "
                    "of on a fixed interval removes it"
                )
            out.append(
                f"**Limiter {limit}/{period:g} on {s['backend']}: finished {s['overshoot_pct_median']:+.2f}% "
                f"over the bound** ({excess * 1000:.0f} ms; 3% is {30 * s['bound_s']:.0f} ms): {fix}."
            )

    # 2. throughput
    for kind in ("postgres", "sqlite"):
        mine = [s for s in tp.get("summary", []) if s["backend"] == kind and s["workers"] <= 2]
        if not mine:
            continue
        best = max(mine, key=lambda s: s["rate_median"])
        rate_miss = best["rate_median"] < 150
        ratio_miss = best["loop_ratio_median"] > 6
        if not (rate_miss or ratio_miss):
            continue
        prof = best.get("profile")
        busy = best["machine_busy_median"]
        what = []
        if rate_miss:
            what.append(f"{best['rate_median']:.0f} req/s (target 150)")
        if ratio_miss:
            what.append(
                f"the loop ran {best['loop_ratio_median']:.1f}× as fast (target ≤ 6×; "
                f"loop {best['loop_rate_median']:.0f} req/s)"
            )
        run = _pick(tp.get("runs", []), backend=kind, workers=best["workers"])
        cost = (
            f" Each request cost {_num(run.get('pg_commits_per_request'), '{:.1f}')} commits and "
            f"{_num(run.get('pg_rows_written_per_request'), '{:.1f}')} row writes on Postgres, against the "
            "loop's 1 commit and 1 row: DBOS's claim and its status and output writes are "
            "the difference, not the request's own transaction."
            if kind == "postgres" and run.get("pg_commits_per_request")
            else ""
        )
        conc = _pick(tp.get("probes", []), probe="concurrency", backend=kind)
        one = _pick(tp.get("summary", []), backend=kind, workers=1)
        gain = (
            conc["steady_rate"] / one["steady_rate_median"] - 1
            if conc and one.get("steady_rate_median")
            else None
        )
        pg_cpu = best.get("pg_backend_cpu_util_median")
        pg_cpu = pg_cpu if isinstance(pg_cpu, float) and pg_cpu == pg_cpu else 0.0
        own = best.get("worker_cpu_util_total_median", 0.0) + pg_cpu
        if gain is not None and gain > 0.1:
            why = (
                f"its own processes used {own:.2f} of the 2 cores (the machine was {busy:.0%} "
                f"busy) and a worker admitting 20 instead of 10 ran {gain:+.0%} faster (steady): "
                "with the limit lifted the request queue's concurrency, not CPU, bounds a worker; "
                "a higher default concurrency when no limiter is configured (pool sized to match) "
                "would close part of it"
            )
        elif own >= 1.6:
            why = (
                f"its own processes used {own:.2f} of the 2 cores, so CPU per request (worker "
                "Python and the database serving it) is the limit; fewer DBOS writes per request "
                "is what moves it"
            )
        else:
            why = (
                f"its own processes used {own:.2f} of the 2 cores and more in flight did not "
                f"help ({'not measured' if gain is None else f'{gain:+.0%} with 20'}), so the "
                "per-request work is the limit: "
                + (
                    "DBOS's sequential round trips per request (claim, status, output)"
                    if kind == "postgres"
                    else "DBOS's claim, status and output writes, each a SQLite write "
                    "transaction under the one write lock, with the worker's Python around them"
                )
            )
        roles = ", ".join(f"{n} {p:.0f}%" for n, p in (prof or {}).get("roles", [])[:3])
        out.append(
            f"**Throughput on {kind}"
            + ("" if kind == "postgres" else " (reported against the Postgres targets)")
            + f": {'; '.join(what)}** with {best['workers']} worker(s): {why}"
            + (f" (profile of worker 0: {roles})" if roles else "")
            + "."
            + cost
        )

    # 3. filing
    big = fo.get("sizes", [10_000, 100_000])[1]
    for f in fo.get("filing", []):
        if f["n"] != big:
            continue
        total = max(v for v in (f.get("visible_s"), f.get("filed_log_s"), 0) if v is not None)
        if f.get("complete") and total <= 60:
            continue
        out.append(
            f"**Filing {f['n']:,} on {f['backend']}: {total:.1f} s** (start-up "
            f"{_num(f.get('before_filing_s'), '{:.1f}')} s, transaction {_num(f.get('transaction_s'), '{:.1f}')} s): "
            + (
                "the transaction dominates; `COPY` into `workflow_status`/`workflow_input` (psycopg's "
                "`cursor.copy`) instead of `executemany` would cut it further."
                if (f.get("transaction_s") or 0) > (f.get("before_filing_s") or 0)
                else "start-up dominates (see section 5)."
            )
        )
    for a in fo.get("atomicity", []):
        if a.get("all_or_none"):
            continue
        bad = [k for k in a["kills"] if not k["none"] or not k["transaction_open_at_kill"]]
        out.append(
            f"**Atomicity on {a['backend']} not shown**: "
            + (
                f"{len(bad)} kill(s) either came after the commit or left rows "
                f"({', '.join(str(k['state']) for k in bad)}); "
                if bad
                else ""
            )
            + f're-run whole: {a["rerun"]["whole"]}; kill after "batch filed" whole: '
            f"{a['kill_after_filed']['whole']}. Read the per-process logs named in the bench output."
        )

    # 4. memory
    small_n, big_n = fo.get("sizes", [10_000, 100_000])
    for kind in ("postgres", "sqlite"):
        small = _pick(fo.get("filing", []), backend=kind, n=small_n)
        large = _pick(fo.get("filing", []), backend=kind, n=big_n)
        if not small or not large:
            continue
        ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
        if large["peak_rss_mib"] <= 300 and ratio <= 1.3:
            continue
        per_k = (large["peak_rss_mib"] - small["peak_rss_mib"]) * 1024 / ((big_n - small_n) / 1000)
        allowed = 0.3 * small["peak_rss_mib"] * 1024 / ((big_n - small_n) / 1000)
        out.append(
            f"**Memory on {kind}: {large['peak_rss_mib']:.0f} MiB, ratio {ratio:.2f}**: the peak grows "
            f"{per_k:.0f} KiB per 1,000 requests (the ratio allows {allowed:.0f}); the to-the-commit peak "
            f"was {large['peak_rss_filing_mib']:.0f} MiB, so "
            + (
                "filing itself holds it: stream the user IDs into the insert rounds instead of "
                "building the list of N first."
                if large["peak_rss_filing_mib"] >= large["peak_rss_mib"] - 1
                else "it comes after the commit, while following the batch."
            )
        )

    # 5. start-up
    h = st.get("help", {})
    if h and not h.get("met"):
        out.append(
            f"**`--help` at {h['ratio']:.2f}× `import typer, rich`**: see the import table in "
            "section 5 for what `accessctl.cli` loads beyond Typer and Rich."
        )
    imports = {
        k: _get(v, "median_s", default=float("nan")) for k, v in st.get("imports", {}).items()
    }
    for e in st.get("errors", []):
        if e.get("met"):
            continue
        t = _get(e, "times", "errors --limit 50", "median_s", default=float("nan"))
        steps = list(imports.items())
        deltas = [
            (steps[i][0], steps[i][1] - steps[i - 1][1])
            for i in range(1, len(steps))
            if not steps[i][0].startswith(("+ alembic", "import dbos"))
        ]
        worst = sorted(deltas, key=lambda x: x[1], reverse=True)[:2]
        out.append(
            f"**`errors --limit 50` on {e['backend']}: {t:.2f} s** while its query takes under a "
            "millisecond (plan in section 5): it is start-up. The largest import steps: "
            + ", ".join(f"{name} +{d * 1000:.0f} ms" for name, d in worst)
            + ". Querying through SQLAlchemy Core tables in a module that does not import "
            "`sqlalchemy.orm`, and configuring structlog lazily, are what is left."
        )
    submit = st.get("submit", {})
    if submit and not submit.get("met"):
        fresh = _get(submit, "times", "submit 4 IDs, fresh embedded database", "median_s")
        ph = {p["database"]: p for p in submit.get("phases", [])}.get("fresh", {})
        biggest = max(
            (
                ("start-up (incl. creating the schema)", ph.get("startup_s", 0)),
                ("queue wait", ph.get("queue_wait_s", 0)),
                ("batch", ph.get("batch_s", 0)),
                ("shutdown", ph.get("shutdown_s", 0)),
            ),
            key=lambda x: x[1],
        )
        out.append(
            f"**`submit` on a fresh embedded database: {_num(fresh, '{:.2f}')} s**; its largest phase is "
            f"{biggest[0]}, {biggest[1]:.2f} s (section 5)."
        )
    return out


def findings(results: dict[str, Any], facts: dict[str, Any]) -> str:
    changes = "\n\n".join(f"{i}. {text}" for i, text in enumerate(_changes(results), 1))
    misses = _misses(results)
    missed = (
        "\n".join(f"* {m}" for m in misses)
        if misses
        else "None: every target measured in this run was met."
    )
    quick = (
        "\n\nThis was a `--quick` run: the sizes are smaller than the targets name (marked in "
        "the table at the top), so read the misses below with that in mind."
        if results.get("quick")
        else ""
    )
    return f"""## Findings for the code owners

### What 0.2.0 changed, and what this run measured of it

{changes}

### Targets (and SQLite's reported figures) this run missed: why, and what would close them{quick}

{missed}
"""
