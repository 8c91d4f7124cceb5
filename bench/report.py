# ruff: noqa: RUF001
"""Turn bench/results.json into BENCHMARKS.md and the limiter plot.

Every number in the report comes from results.json; the prose around it names the
bottlenecks that the profiles and counters in the same file point at.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _met(flag: bool | None) -> str:
    if flag is None:
        return "n/a"
    return "**met**" if flag else "**not met**"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += [
        "| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows
    ]
    return "\n".join(lines)


# --- the plot ---------------------------------------------------------------------------


def plot_limiter(section: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = section["runs"]
    configs = sorted({(r["limit"], r["period"]) for r in runs})
    kinds = [k for k in ("sqlite", "postgres") if any(r["backend"] == k for r in runs)]
    fig, axes = plt.subplots(
        len(configs), len(kinds), figsize=(6.4 * len(kinds), 3.9 * len(configs)), squeeze=False
    )
    for i, (limit, period) in enumerate(configs):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            # The median run by overshoot, so the picture matches the table.
            mine = sorted(
                (r for r in runs if r["backend"] == kind and r["limit"] == limit),
                key=lambda r: r["overshoot_pct"],
            )
            run = mine[(len(mine) - 1) // 2]
            starts: list[float] = run["starts_rel_s"]
            horizon = max(starts) + period + 1
            edges = [float(s) for s in range(math.ceil(horizon) + 1)]
            ax.hist(starts, bins=edges, color="#4C72B0", alpha=0.75, label="starts in each second")
            step = 0.02
            ts = [k * step for k in range(int(horizon / step) + 1)]
            window = [sum(1 for s in starts if t - period < s <= t) for t in ts]
            ax.step(
                ts,
                window,
                where="post",
                color="#DD8452",
                lw=1.6,
                label=f"starts in the trailing {period:g} s window",
            )
            ax.axhline(
                limit, color="#C44E52", ls="--", lw=1.4, label=f"limit: {limit} per {period:g} s"
            )
            ax.axhline(
                limit / period,
                color="#55A868",
                ls=":",
                lw=1.4,
                label=f"limit as a rate: {limit / period:.3g} starts/s",
            )
            ax.set_ylim(0, limit * 1.25)
            ax.set_xlim(-0.5, horizon)
            ax.set_title(
                f"{kind}, {limit}/{period:g}, N={run['n']}: max in any {period:g}-s window "
                f"{run['max_in_window']}\nfirst→last start {run['start_span_s']:.2f} s vs bound "
                f"{run['bound_s']:g} s ({run['overshoot_pct']:+.1f}%)",
                fontsize=9,
            )
            ax.set_xlabel("seconds since the first start")
            ax.set_ylabel("starts")
            ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(
        "accessctl rate limiter at work: a backlog of 3L requests (DBOS start times; median run)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --- the report -------------------------------------------------------------------------


def _header(results: dict[str, Any]) -> str:
    m, v = results["machine"], results["versions"]
    timings = ", ".join(f"{k} {t / 60:.1f} min" for k, t in results.get("timings", {}).items())
    return f"""# Benchmarks

Produced by `uv run --group bench python bench/run_all.py{" --quick" if results.get("quick") else ""}`
(the scripts are in `bench/`; raw figures in `bench/results.json`; per-process logs were
written under `/tmp/accessctl-bench-*`). `--quick` runs smaller sizes (the duration row below
says how long this run took); `--only SECTION` reruns one section; `--report-only` re-renders
this file.

| | |
|---|---|
| date | {m["date"]} |
| machine | {m["nproc"]} cores ({m["cpu"]}), {m["memory_gib"]} GiB memory, Linux {m["kernel"]} |
| load average | {m["load_average_at_start"]} at start, {m.get("load_average_at_end", "–")} at end (a shared machine: other test suites ran alongside) |
| versions | Python {v["python"]}, dbos {v["dbos"]}, SQLAlchemy {v["sqlalchemy"]}, psycopg {v["psycopg"]}, SQLite {v["sqlite"]}, PostgreSQL {v["postgres"]}, accessctl {v["accessctl"]}{", " + v["hyperfine"] if "hyperfine" in v else ""} |
| duration | {_fmt(results.get("total_s", 0) / 60)} min ({timings}) |
| mode | {"quick (smaller sizes, fewer runs)" if results.get("quick") else "full"} |

How it measures: every figure drives the installed `accessctl` command on a database of its
own (a temporary `XDG_DATA_HOME`, so the *default* embedded SQLite file, or a fresh Postgres
database `accessctl_bench_*`), with `ACCESSCTL_LOG_FORMAT=json` and stderr sent to a file.
Absolute times on this shared 2-core machine move with the load; wherever a target is a
ratio, both sides were measured in the same run, interleaved. Python caches bytecode as on
an operator's machine (`PYTHONPYCACHEPREFIX` in a temporary folder; this sandbox's shell sets
`PYTHONDONTWRITEBYTECODE=1`, which makes every start compile ~500 modules — start-up is also
shown that way). Medians are over the runs named in each table.
"""


def median_of(values: list[float]) -> float:
    import statistics

    clean = [v for v in values if v is not None and v == v]
    return float(statistics.median(clean)) if clean else float("nan")


def _sized(flag: bool | None, measured: int, target: int) -> str:
    """met / not met, flagged when the size measured is not the target's (``--quick``)."""
    status = _met(flag)
    if measured != target:
        status += f" at N={measured:,} (`--quick`; the target is at {target:,})"
    return status


def _pct(value: Any) -> str:
    return f"{value:.0%}" if isinstance(value, (int, float)) and value == value else "–"


# --- 1. limiter -------------------------------------------------------------------------


def _decompose(run: dict[str, Any]) -> tuple[float, float]:
    """(summed window-opening lateness, first-window spread) in seconds, from start times."""
    rel, limit, period = run["starts_rel_s"], run["limit"], run["period"]
    windows = run["n"] // limit
    opening = sum(rel[k * limit] - rel[(k - 1) * limit] - period for k in range(1, windows))
    return opening, rel[limit - 1] - rel[0]


def _limiter(sec: dict[str, Any]) -> tuple[str, list[list[str]]]:
    rows = []
    summary_rows: list[list[str]] = []
    readings: list[str] = []
    for s in sec["summary"]:
        mine = [r for r in sec["runs"] if r["backend"] == s["backend"] and r["limit"] == s["limit"]]
        parts = [_decompose(r) for r in mine]
        over = [r["overshoot_pct"] for r in mine]
        over_median = median_of(over)
        runs_over = sum(1 for x in over if abs(x) > 3)
        opening_ms = median_of([p[0] for p in parts]) * 1000
        spread_ms = median_of([p[1] for p in parts]) * 1000
        excess_ms = (s["start_span_s_median"] - s["bound_s"]) * 1000
        rows.append(
            [
                s["backend"],
                f"{s['limit']}/{s['period']:g}",
                str(mine[0]["n"]),
                str(s["runs"]),
                f"{s['max_in_window_worst']} (limit {s['limit']})",
                f"{s['start_span_s_median']:.2f} s",
                f"{s['bound_s']:g} s",
                f"{over_median:+.2f}% (worst {max(over):+.2f}%)",
                f"{opening_ms:.0f} ms",
                f"{spread_ms:.0f} ms",
                f"{median_of([r['cli_wall_s'] for r in mine]):.1f} s",
                "yes" if s["all_recorded"] else "NO",
            ]
        )
        summary_rows.append(
            [
                f"1. limiter {s['limit']}/{s['period']:g}, {s['backend']}: no P-window over L",
                f"max {s['max_in_window_worst']} starts in a {s['period']:g}-s window (L={s['limit']}), {s['runs']} run(s)",
                _met(s["window_met"]),
            ]
        )
        summary_rows.append(
            [
                f"1. limiter {s['limit']}/{s['period']:g}, {s['backend']}: finish within 3% of (N/L−1)·P",
                f"{s['start_span_s_median']:.2f} s vs {s['bound_s']:g} s: {over_median:+.2f}% median, worst {max(over):+.2f}%"
                + (f" ({runs_over} of {len(over)} runs over 3%)" if runs_over else ""),
                _met(abs(over_median) <= 3)
                + (
                    " on the median, not in every run"
                    if runs_over and abs(over_median) <= 3
                    else ""
                ),
            ]
        )
        if abs(over_median) > 3 or runs_over:
            bigger = "(a) window opening" if opening_ms >= spread_ms else "(b) first-window spread"
            readings.append(
                f"{s['backend']} {s['limit']}/{s['period']:g}: the span exceeds the bound by "
                f"{excess_ms:.0f} ms (median; 3% is {30 * s['bound_s']:.0f} ms): (a) {opening_ms:.0f} ms, "
                f"(b) {spread_ms:.0f} ms — mostly {bigger}"
            )
    probe_rows = []
    for r in sec.get("probes", []):
        opening, spread = _decompose(r)
        probe_rows.append(
            [
                r["backend"],
                f"{r['limit']}/{r['period']:g}",
                " ".join(f"{k}={v}" for k, v in r.get("env", {}).items()),
                str(r["max_in_window"]),
                f"{r['overshoot_pct']:+.2f}%",
                f"{opening * 1000:.0f} ms",
                f"{spread * 1000:.0f} ms",
            ]
        )
    probes = ""
    if probe_rows:
        probes = (
            "Probe, not part of the medians — the same 10/2 backlog with the request queue polling "
            "every 0.01 s instead of P/50 = 0.04 s (`ACCESSCTL_POLL_INTERVAL=0.01` caps the queue's "
            "interval):\n\n"
            + _table(
                [
                    "backend",
                    "limit",
                    "settings",
                    "max in a window",
                    "over the bound",
                    "windows opened late by (sum)",
                    "first-window spread",
                ],
                probe_rows,
            )
            + "\n"
        )
    windows_ok = all(s["window_met"] for s in sec["summary"])
    spreads = ", ".join(
        f"{s['backend']} {s['limit']}/{s['period']:g} "
        f"{median_of([_decompose(r)[1] for r in sec['runs'] if r['backend'] == s['backend'] and r['limit'] == s['limit']]) * 1000:.0f} ms"
        for s in sec["summary"]
    )
    reading = (
        (
            "No window ever held more than L starts, on either backend (DBOS claims under "
            "REPEATABLE READ on Postgres; on SQLite `runtime.serialize_sqlite_claims` makes the "
            "claim `BEGIN IMMEDIATE`, and `db.py`'s clock functions give DBOS millisecond start "
            "times). "
            if windows_ok
            else "**Some window held more than L starts** (see the table). "
        )
        + "Since 0.2.0 every request exists the moment its batch commits, so part (b) is no longer "
        "set by how fast a parent workflow enqueues children: it is how long the queue takes to "
        f"claim and start the first L (measured: {spreads}). "
        + (
            "Where the finish misses 3%: " + "; ".join(readings) + ". Part (a) is bounded by one "
            "polling interval per window (P/50, at least 0.02 s) plus the claim's own time; (b) by "
            "how many polls it takes DBOS to start L requests."
            if readings
            else "Every configuration finished within 3% of the bound in every run."
        )
    )
    text = f"""## 1. Limiter fidelity

A backlog of N = 3L requests filed with `accessctl batch N` under `ACCESSCTL_RATE_LIMIT=L/P`
(default concurrency 10) on a fresh database. The start times are DBOS's own
(`workflow_status.started_at_epoch_ms`, queue `access-requests`). "Max in a window" is the
most starts in any real half-open window `[t, t+P)`; "span" is first start → last start,
compared with the bound `(N/L − 1)·P` (L start at once, L more after each P). 10/2 ran
{max(s["runs"] for s in sec["summary"])} time(s) per backend, 50/30 (the default, ~60 s a run) once, backends interleaved
(`--quick`: 10/2 once). The target is judged on the median run; the worst run is shown beside it.

The overshoot has two parts, both read off the start times. A slot frees exactly P after
its start, so every window replays the first one's pattern: (a) **window opening lateness**
— how much later than P after the previous window's first start each window's first start
came (polling interval, claim latency), summed; (b) **first-window spread** — first to L-th
start of the first window, which carries into every later window and so adds once to the
span.

{_table(["backend", "limit", "N", "runs", "max in a P-window (worst)", "span (median)", "bound", "over the bound (median)", "(a) windows opened late by", "(b) first-window spread", "command wall (median)", "all rows written"], rows)}

{probes}
![limiter at work](bench/limiter.png)

{reading} The command's wall time adds start-up (imports, schema check, DBOS launch,
filing) and shutdown (section 5 splits a `submit` into these phases).
"""
    return text, summary_rows


# --- 2. throughput ----------------------------------------------------------------------


def _profile_block(title: str, prof: dict[str, Any] | None) -> str:
    if not prof or not prof.get("available"):
        return f"*{title}: no profile (py-spy unavailable).*\n"
    roles = "; ".join(f"{name} {pct}%" for name, pct in prof["roles"])
    incl = "; ".join(f"{name} {pct}%" for name, pct in prof["inclusive"])
    top = "\n".join(f"  | {name} | {pct}% |" for name, pct in prof["self"][:8])
    return f"""**{title}** — py-spy, {prof["samples"]} samples of non-idle threads at 50 Hz:

* by thread role: {roles}
* inclusive, by package: {incl}
* hottest frames (self time):

  | frame | share |
  |---|---|
{top}
"""


def _share(prof: dict[str, Any] | None, key: str, name: str) -> float:
    for label, pct in (prof or {}).get(key, []):
        if label.startswith(name):
            return float(pct)
    return 0.0


def _top_roles(prof: dict[str, Any] | None, k: int = 3) -> str:
    if not prof or not prof.get("available"):
        return "no profile"
    return ", ".join(f"{name} {pct:.0f}%" for name, pct in prof["roles"][:k])


def _throughput(sec: dict[str, Any]) -> tuple[str, list[list[str]], dict[str, Any]]:
    n = sec["n"]
    rows = []
    facts: dict[str, Any] = {}
    for s in sec["summary"]:
        mine = [
            r for r in sec["runs"] if r["backend"] == s["backend"] and r["workers"] == s["workers"]
        ]
        if not mine:
            continue
        mid = sorted(mine, key=lambda r: r["rate"])[(len(mine) - 1) // 2]
        waits = mid.get("pg_sessions_avg", {})
        lock = sum(v for k, v in waits.items() if k.endswith((":Lock", ":LWLock")))
        pg = s["backend"] == "postgres"
        rows.append(
            [
                s["backend"],
                str(s["workers"]),
                _fmt(s.get("n", n)),
                str(s["runs"]),
                f"{s['rate_median']:.1f} ({', '.join(f'{r:.0f}' for r in s.get('rates', []))})",
                _fmt(s["steady_rate_median"]),
                _fmt(s["loop_rate_median"]),
                f"{s['loop_ratio_median']:.2f}×",
                f"{_fmt(s.get('orm_loop_rate_median'))} ({_fmt(s.get('orm_loop_ratio_median'), 2)}×)",
                ", ".join(f"{u:.0%}" for u in mid["worker_cpu_util"]),
                _pct(s.get("pg_backend_cpu_util_median")) if pg else "–",
                _pct(s["machine_busy_median"]),
                _fmt(s.get("pg_commits_per_request")) if pg else "–",
                f"{lock:.2f}" if pg else "–",
                str(s.get("pg_connections_peak", "–")) if pg else "–",
                _fmt(s.get("launch_s_median"), 2),
                _fmt(s.get("tail_s_median"), 2),
                "yes" if s["all_recorded"] else "NO",
            ]
        )
    summary_rows: list[list[str]] = []
    for kind in ("postgres", "sqlite"):
        mine = [s for s in sec["summary"] if s["backend"] == kind and s["workers"] <= 2]
        if not mine:
            continue
        best = max(mine, key=lambda s: s["rate_median"])
        facts[kind] = best
        # The issue sets both throughput targets on Postgres and asks for "the same run on
        # SQLite": SQLite's figures are reported against the same bars, not judged by them.
        judged = kind == "postgres"
        label = "" if judged else " (reported; the target is set on Postgres)"
        summary_rows.append(
            [
                f"2. throughput, {kind}, ≤2 workers: ≥150 req/s ({10_000:,} requests){label}",
                f"{best['rate_median']:.1f} req/s with {best['workers']} worker(s), median of {best['runs']} "
                f"(N={n:,}; steady state {best['steady_rate_median']:.1f})",
                _sized(best["rate_median"] >= 150, n, 10_000)
                if judged
                else ("at or above the bar" if best["rate_median"] >= 150 else "below the bar"),
            ]
        )
        summary_rows.append(
            [
                f"2. throughput, {kind}: within 6× of a plain SQLAlchemy loop (same run){label}",
                f"loop {best['loop_rate_median']:.0f} req/s = {best['loop_ratio_median']:.2f}× accessctl "
                f"({best['workers']} worker(s); ratio per repetition, median; 0.1.0's ORM loop: "
                f"{_fmt(best.get('orm_loop_ratio_median'), 2)}×)",
                _sized(best["loop_ratio_median"] <= 6, n, 10_000)
                if judged
                else (
                    "within 6×"
                    if best["loop_ratio_median"] <= 6
                    else "beyond 6× (see Findings: SQLite's loop commits without a server)"
                ),
            ]
        )
    profiles = "\n".join(
        _profile_block(
            f"Worker 0 of {s['workers']}, {s['backend']}, N={sec.get('probe_n', n):,}",
            s.get("profile"),
        )
        for s in sec["summary"]
        if s.get("profile")
    )
    probe_rows = [
        [
            p.get("probe", "profile"),
            p["backend"],
            str(p["workers"]),
            " ".join(f"{k}={v}" for k, v in p.get("env", {}).items()) or "defaults",
            _fmt(p["rate"]),
            _fmt(p["steady_rate"]),
            ", ".join(f"{u:.0%}" for u in p["worker_cpu_util"]),
            _pct(p.get("profiler_cpu_util")),
            _pct(p["machine_busy"]),
        ]
        for p in sec.get("probes", [])
    ]
    waits = next(
        (
            r
            for r in sec["runs"]
            if r["backend"] == "postgres" and r["workers"] == 2 and r.get("pg_sessions_avg")
        ),
        None,
    )
    wait_text = ""
    if waits:
        wait_text = (
            "Postgres sessions of the benchmark's database, sampled every 0.25 s during a 2-worker run "
            "(average count per state:wait): "
            + ", ".join(f"`{k}` {v}" for k, v in waits["pg_sessions_avg"].items())
            + "."
        )
    n4 = sec.get("n_4_workers", n)
    n4_note = (
        f" **4 workers ran N = {n4:,}** (time box: at the rates seen, 10,000 would cost ~2 min "
        "per backend); their launch and tail weigh more, so compare them on the steady rate."
        if n4 != n
        else ""
    )
    n_note = (
        f"**N = {n:,} (`--quick`)**; the full run uses 10,000."
        if n != 10_000
        else "N = 10,000, as the target says."
    )
    text = f"""## 2. Throughput with the limit lifted

`ACCESSCTL_RATE_LIMIT=none`, default concurrency (10 in flight, globally); the request queue
then polls every 0.02 s. Per repetition and backend, in this order on fresh databases: a
**plain SQLAlchemy loop** doing the statements of one request's transaction
(`workflows._record_access`: one look-up of the request's `accesses`/`errors` rows and its
user, one `accesses` insert), one transaction per request, on an engine built as a worker
builds it — the target is judged against this loop. Beside it, for continuity with the
0.1.0 report, that report's loop (an ORM session per request, three look-ups and the
insert: the statements 0.1.0's request transaction made; N/4 requests), same database,
same run. Then `accessctl batch {n} --detach` (the whole batch filed in one transaction
before any worker starts) followed by **1, 2 or 4 `accessctl worker --burst` processes**
started together. Rate = N / (workers' start → last worker's exit): it includes launch
("launch" = workers' start → first request start) and the burst workers' idle checks and
shutdown ("tail" = last request end → last exit). "Steady" = N / (first request start → last
request end). The ratio is the loop's rate over accessctl's, per repetition, then the
median. {sec["repeats"]} repetitions for 1 and 2 workers (the target's configurations), 4 workers once.
{n_note}{n4_note}

{_table(["backend", "workers", "N", "runs", "req/s: median (each run)", "steady req/s", "loop req/s", "loop ÷ accessctl", "0.1.0's ORM loop req/s (÷ accessctl)", "worker CPU (of one core, each; median run)", "Postgres server CPU (of one core)", "machine CPU (2 cores, all processes)", "Postgres commits / request", "sessions waiting on Lock/LWLock (avg)", "Postgres connections (peak)", "launch s", "tail s", "all rows"], rows)}

{wait_text}

Probes, in runs of their own with N = {sec.get("probe_n", n):,} (not part of the medians): a py-spy
profile of worker 0 with 1, 2 and 4 workers, started at the first recorded request (py-spy at
50 Hz costs a noticeable share of one of the 2 cores, shown below, so it stays out of the
measured runs), and one worker admitting twice the default concurrency. At this N launch
and tail weigh more: compare steady rates.

{_table(["probe", "backend", "workers", "settings", "req/s", "steady req/s", "worker CPU", "py-spy CPU", "machine CPU"], probe_rows)}

{profiles}

Reading the figures (the bottleneck at each worker count):

{_reading(sec)}
"""
    return text, summary_rows, facts


def _verdict(s: dict[str, Any]) -> str:
    """What bounds one configuration, from its CPU figures: the cores this run's own
    processes used (workers, and the Postgres processes serving them) against the 2."""
    busy = s["machine_busy_median"]
    total = s.get("worker_cpu_util_total_median", s["worker_cpu_util_median"] * s["workers"])
    each = s["worker_cpu_util_median"]
    pg = s.get("pg_backend_cpu_util_median")
    pg = pg if isinstance(pg, float) and pg == pg else 0.0
    own = total + pg
    served = f" + Postgres {pg:.2f}" if pg else ""
    if own >= 1.6:
        return (
            f"**CPU** — workers {total:.2f}{served} of the 2 cores, so more "
            "processes only share the same cores"
        )
    if each >= 0.8:
        return (
            f"**CPU: the worker process** — {each:.0%} of a core each (one Python process, one GIL)"
        )
    others = max(0.0, busy * 2 - own)
    used = f"workers {total:.2f}{served} = {own:.2f}" if pg else f"workers {total:.2f}"
    waits = (
        "round trips to the server, the next poll"
        if s["backend"] == "postgres"
        else "SQLite's one write lock, the next poll"
    )
    return (
        f"**waiting, not CPU** — {used} of the 2 cores (the machine was {busy:.0%} busy, "
        f"~{others:.1f} cores of it other processes on this shared host): requests wait ({waits})"
    )


def _reading(sec: dict[str, Any]) -> str:
    """The bottleneck at each worker count, in words, from this run's figures."""
    out: list[str] = []
    for kind in ("postgres", "sqlite"):
        mine = sorted(
            (s for s in sec["summary"] if s["backend"] == kind), key=lambda s: s["workers"]
        )
        if not mine:
            continue
        base = mine[0]["rate_median"]
        for s in mine:
            prof = s.get("profile")
            wait = (
                _share(prof, "self", "Connection.wait")
                if kind == "postgres"
                else _share(prof, "self", "DefaultDialect.do_execute")
            )
            if not wait:
                wait_text = ""
            elif kind == "postgres":
                wait_text = f"; {wait:.0f}% of its samples sit in `Connection.wait` (psycopg waiting on the server)"
            else:
                wait_text = f"; {wait:.0f}% of its samples in `do_execute` (the sqlite3 call itself, including waiting for SQLite's write lock)"
            if s["workers"] == 1 or not base:
                scale = ""
            elif s.get("n") == mine[0].get("n"):
                scale = f" ({s['rate_median'] / base - 1:+.0%} against 1 worker)"
            else:
                first = mine[0]["steady_rate_median"]
                scale = (
                    f" at N = {s['n']:,}; steady {s['steady_rate_median']:.0f}, "
                    f"{s['steady_rate_median'] / first - 1:+.0%} against 1 worker's steady rate"
                )
            out.append(
                f"* **{kind}, {s['workers']} worker(s)** — {s['rate_median']:.0f} req/s{scale}: "
                f"{_verdict(s)}. Profile of worker 0: {_top_roles(prof)}{wait_text}."
            )
        conc = next(
            (
                p
                for p in sec.get("probes", [])
                if p.get("probe") == "concurrency" and p["backend"] == kind
            ),
            None,
        )
        if conc and mine:
            one = mine[0]
            change = conc["steady_rate"] / one["steady_rate_median"] - 1
            out.append(
                f"* **{kind}, more in flight**: one worker with `ACCESSCTL_CONCURRENCY=20` ran "
                f"{conc['steady_rate']:.0f} req/s steady against {one['steady_rate_median']:.0f} with the "
                f"default 10 ({change:+.0%}): "
                + (
                    "admitting more at once lifts it, so per-request latency (not CPU) bounds one "
                    "worker at the default concurrency."
                    if change > 0.1
                    else "no real gain, so the slots are not what bounds it; the per-request work is."
                )
            )
    by = {(s["backend"], s["workers"]): s for s in sec["summary"]}
    pg1 = by.get(("postgres", 1))
    if pg1 and pg1.get("pg_commits_per_request") == pg1.get("pg_commits_per_request"):
        out.append(
            f"* Per request, Postgres counted {pg1['pg_commits_per_request']:.1f} commits with one "
            "worker (DBOS's claim, status and output writes, the request's own transaction, and the "
            "queue's polling and `run_batch`'s counting spread over the requests)."
        )
    return "\n".join(out)


# --- 3. filing --------------------------------------------------------------------------


def _filing(sec: dict[str, Any]) -> tuple[str, list[list[str]], dict[str, Any]]:
    filing = sec["filing"]
    small, big = sec.get("sizes", [10_000, 100_000])
    rows = []
    for f in filing:
        rows.append(
            [
                f["backend"],
                _fmt(f["n"]),
                _fmt(f["before_filing_s"], 2),
                _fmt(f["transaction_s"], 2),
                _fmt(f["last_round_s"], 2),
                _fmt(f["filed_log_s"], 2),
                _fmt(f["visible_s"], 2),
                "none"
                if not f["partial_counts_seen"]
                else ", ".join(str(c) for c in f["partial_counts_seen"][:5]),
                _fmt(f["n"] / f["transaction_s"], 0) if f.get("transaction_s") else "–",
                _fmt(f.get("pg_rows_written_per_child"), 2) if f["backend"] == "postgres" else "–",
                _fmt(f["peak_rss_filing_mib"]),
                _fmt(f["peak_rss_mib"]),
            ]
        )
    detach_rows = [
        [
            d["backend"],
            _fmt(d["n"]),
            _fmt(d["wall_s"], 2),
            _fmt(d["filed_log_s"], 2),
            _fmt(d["transaction_s"], 2),
            _fmt(d["workflow_rows_enqueued"]),
            _fmt(d["peak_rss_mib"]),
            str(d["exit_code"]),
        ]
        for d in sec["detach"]
    ]
    atomic_rows = []
    for a in sec["atomicity"]:
        for i, k in enumerate(a["kills"], 1):
            st = k["state"]
            atomic_rows.append(
                [
                    a["backend"],
                    _fmt(a["n"]),
                    f"SIGKILL #{i} while filing",
                    f"{_fmt(k['killed_after_open_s'], 2)} s after the transaction opened (aimed at {k['fraction_target']:.0%} of it); open at the kill: {'yes' if k['transaction_open_at_kill'] else 'NO'}",
                    f"{st['batches_rows']} / {st['workflow_rows']} / {st['input_rows']}",
                    "**none**" if k["none"] else "PARTIAL",
                ]
            )
        r = a["rerun"]["state"]
        atomic_rows.append(
            [
                a["backend"],
                _fmt(a["n"]),
                "the same command again",
                f"exit {a['rerun']['exit_code']} after {a['rerun']['wall_s']:.1f} s; {r['by_status'].get('ENQUEUED', 0):,} ENQUEUED",
                f"{r['batches_rows']} / {r['workflow_rows']:,} / {r['input_rows']:,}",
                "**whole**" if a["rerun"]["whole"] else "NOT WHOLE",
            ]
        )
        k2 = a["kill_after_filed"]["state"]
        atomic_rows.append(
            [
                a["backend"],
                _fmt(a["n"]),
                'attached run, SIGKILL at its "batch filed" line',
                ", ".join(f"{v:,} {s}" for s, v in sorted(k2["by_status"].items())) or "no rows",
                f"{k2['batches_rows']} / {k2['workflow_rows']:,} / {k2['input_rows']:,}",
                "**whole**" if a["kill_after_filed"]["whole"] else "NOT WHOLE",
            ]
        )
        again = a.get("same_key_again", {})
        if again:
            atomic_rows.append(
                [
                    a["backend"],
                    _fmt(a["n"]),
                    "its key again (`--detach`)",
                    f'logged "{again.get("logged")}"',
                    f"{again.get('batches_rows')} / {again.get('workflow_rows', 0):,} / –",
                    "nothing filed twice"
                    if again.get("workflow_rows") == a["n"] + 1
                    else "FILED AGAIN",
                ]
            )
    insert_rows = [
        [
            p["backend"],
            _fmt(p["n"]),
            _fmt(p["build_statuses_s"], 3),
            _fmt(p["dbos_init_workflows_s"], 3),
            _fmt(p["accessctl_executemany_s"], 3),
            f"{p['ratio']:.1f}×" if p.get("ratio") else "–",
        ]
        for p in sec.get("insert_probe", [])
    ]
    summary_rows: list[list[str]] = []
    facts: dict[str, Any] = {}
    for kind in ("postgres", "sqlite"):
        f = next((x for x in filing if x["backend"] == kind and x["n"] == big), None)
        if not f:
            continue
        end_to_end = (
            max(v for v in (f["visible_s"], f["filed_log_s"]) if v is not None)
            if (f["visible_s"] or f["filed_log_s"])
            else float("nan")
        )
        facts[kind] = {"end_to_end": end_to_end, "filing": f}
        summary_rows.append(
            [
                f"3. filing 100,000 ({kind}): all requests ENQUEUED ≤ 60 s",
                f"{end_to_end:.1f} s from process start until all {f['n']:,} were visible "
                f"(the transaction itself {_fmt(f['transaction_s'], 2)} s)",
                _sized(f["complete"] and end_to_end <= 60, f["n"], 100_000),
            ]
        )
    for a in sec["atomicity"]:
        kills = a["kills"]
        measured = (
            f"{len(kills)} kill(s) mid-transaction left "
            + ", ".join(
                f"{k['state']['batches_rows']} batches / {k['state']['workflow_rows']} workflow rows"
                for k in kills
            )
            + f"; the re-run filed {a['rerun']['state']['by_status'].get('ENQUEUED', 0):,} ENQUEUED workflows and "
            f'{a["rerun"]["state"]["batches_rows"]} batch row; a kill right after "batch filed" left '
            f"{a['kill_after_filed']['state']['workflow_rows']:,} workflow rows"
        )
        summary_rows.append(
            [
                f"3. filing is atomic ({a['backend']}): a kill leaves the whole batch or none",
                measured,
                _sized(a["all_or_none"], a["n"], 100_000),
            ]
        )
    prof_blocks = "\n".join(
        _profile_block(
            f"Filing {p['n']:,} attached, {p['backend']} (a run of its own)", p.get("profile")
        )
        for p in sec.get("profiles", [])
    )
    follow = sec.get("follow_s", 5)
    filing_table = _table(
        [
            "backend",
            "N",
            "start-up s",
            "transaction s",
            "last round written s",
            '"batch filed" s',
            "all visible s",
            "partial counts seen",
            "requests / s in the transaction",
            "Postgres row writes / request",
            "peak RSS to commit MiB",
            "peak RSS MiB",
        ],
        rows,
    )
    detach_table = _table(
        [
            "backend",
            "N",
            "wall s",
            '"batch filed for workers" s',
            "transaction s",
            "workflow rows ENQUEUED",
            "peak RSS MiB",
            "exit",
        ],
        detach_rows,
    )
    text = f"""## 3. Filing a batch

Since 0.2.0 `accessctl batch N` files the batch in **one transaction** (`filing.py`): the
`batches` row, any refused input lines (`errors`), the `run_batch` workflow row (ENQUEUED on
`access-batches`) and all N `file_request` workflow rows and their inputs (ENQUEUED on
`access-requests`), the rows built by `DBOSClient`'s own status builder and written with one
`executemany` per table and round of {_fmt(sec.get("chunk"))} requests. Nothing is visible until it commits.

**Filing time**, `accessctl batch N` attached with the default limit (50/30), on a fresh
database: "start-up" = process start → the transaction's `batches` row (imports, schema check,
DBOS launch); "transaction" = that row → the `"batch filed"` log line (written right after the
commit); "last round written" = when the last round's rows were stamped (`created_at`),
from the transaction's start; "visible" = process start → the bench's count (every 0.05 s) saw
all N (any smaller count seen before is listed: there should be none). Peak RSS = `VmHWM`
sampled every 0.05 s up to the commit, and the process's peak (`wait4`) after {follow:g} s of
following the batch, after which it was stopped (SIGTERM).

{filing_table}

`accessctl batch N --detach` files the same way without launching DBOS (no executor, no
queues): wall time of the command, and its peak RSS (`wait4`):

{detach_table}

**Atomicity**, measured with N = {big:,}: `accessctl batch N --detach --key K` SIGKILLed while
its filing transaction was open (Postgres: a session of the database holds a transaction ID,
`pg_stat_activity.backend_xid`; SQLite: another connection's `BEGIN IMMEDIATE` fails with
"database is locked"), twice, at two points of the transaction (from the filing time measured
above); then the same command run again; then an attached `batch N --key K2` SIGKILLed the
moment its `"batch filed"` line appeared; then K2's command once more. Rows of that batch:

{_table(["backend", "N", "run", "what happened", "`batches` / workflow / input rows", "verdict"], atomic_rows)}

How the rows are written, same {small:,} request rows on one fresh database, alternately, best
of {max([p.get("rounds", 1) for p in sec.get("insert_probe", [])] or [1])}: DBOS 3.4's own bulk enqueue (`SystemDatabase.init_workflows`, multi-row
`INSERT … VALUES` in chunks of 500 with `ON CONFLICT DO NOTHING RETURNING`) against
`filing._insert_workflows` (one compiled `INSERT`, `executemany`):

{_table(["backend", "requests", "building the statuses s", "DBOS init_workflows s", "accessctl executemany s", "DBOS ÷ accessctl"], insert_rows)}

{prof_blocks}
"""
    return text, summary_rows, facts


# --- 4. memory --------------------------------------------------------------------------


def _memory(sec: dict[str, Any]) -> tuple[str, list[list[str]]]:
    small_n, big_n = sec.get("sizes", [10_000, 100_000])
    summary_rows: list[list[str]] = []
    rows = []
    for kind in ("postgres", "sqlite"):
        small = next((f for f in sec["filing"] if f["backend"] == kind and f["n"] == small_n), None)
        big = next((f for f in sec["filing"] if f["backend"] == kind and f["n"] == big_n), None)
        if not small or not big:
            continue
        ratio = big["peak_rss_mib"] / small["peak_rss_mib"]
        per_k = (big["peak_rss_mib"] - small["peak_rss_mib"]) * 1024 / ((big_n - small_n) / 1000)
        d_small = next((d for d in sec["detach"] if d["backend"] == kind and d["n"] == small_n), {})
        d_big = next((d for d in sec["detach"] if d["backend"] == kind and d["n"] == big_n), {})
        rows.append(
            [
                kind,
                f"{small['peak_rss_mib']:.1f}",
                f"{big['peak_rss_mib']:.1f}",
                f"{ratio:.2f}",
                f"{per_k:.0f}",
                f"{small['peak_rss_filing_mib']:.1f} / {big['peak_rss_filing_mib']:.1f}",
                f"{_fmt(d_small.get('peak_rss_mib'))} / {_fmt(d_big.get('peak_rss_mib'))}",
            ]
        )
        summary_rows.append(
            [
                f"4. peak RSS of `batch 100000` ({kind}) ≤ 300 MiB",
                f"{big['peak_rss_mib']:.0f} MiB (`wait4`, filing and {sec.get('follow_s', 5):g} s of following)",
                _sized(big["peak_rss_mib"] <= 300, big_n, 100_000),
            ]
        )
        summary_rows.append(
            [
                f"4. RSS(100k) / RSS(10k) ({kind}) ≤ 1.3, measured side by side in one run",
                f"{ratio:.2f} ({big['peak_rss_mib']:.0f} / {small['peak_rss_mib']:.0f} MiB)"
                + (f" — {big_n:,} / {small_n:,}" if (small_n, big_n) != (10_000, 100_000) else ""),
                _sized(ratio <= 1.3, big_n, 100_000),
            ]
        )
    text = f"""## 4. Memory

Peak RSS of the attached `accessctl batch N` runs of section 3 (same run, same backend,
{small_n:,} and {big_n:,} back to back): the process's peak from `wait4` (filing, then
{sec.get("follow_s", 5):g} s of following the batch with 50 requests running), and `VmHWM` sampled up to
the commit. The filing process holds the CLI's list of N user IDs (N references to the 4
default ID strings for `batch`) and one round of built rows ({_fmt(sec.get("chunk"))} requests) at a time;
`run_batch` and the CLI then only count rows. "Per 1,000 requests" is the growth of the peak
between the two sizes.

{_table(["backend", f"peak RSS MiB, {small_n:,}", f"peak RSS MiB, {big_n:,}", "ratio", "KiB per 1,000 requests", "to the commit, MiB (small / big)", "`--detach` peak MiB (small / big)"], rows)}
"""
    return text, summary_rows


# --- 5. start-up ------------------------------------------------------------------------


def _startup(sec: dict[str, Any]) -> tuple[str, list[list[str]]]:
    h = sec["help"]
    help_rows = [
        [name, _fmt(t["median_s"] * 1000, 0), _fmt(t["min_s"] * 1000, 0), str(t["runs"])]
        for name, t in h["times"].items()
    ]
    summary_rows = [
        [
            '5. `accessctl --help` ≤ 1.5× `python -c "import typer, rich"`',
            f"{h['ratio']:.2f}× (no bytecode cache: {h['ratio_no_bytecode_cache']:.2f}×)",
            _met(h["met"]),
        ]
    ]
    err_parts = []
    for e in sec["errors"]:
        t = e["times"]
        err_rows = [
            [name, _fmt(x["median_s"] * 1000, 0), _fmt(x["min_s"] * 1000, 0), str(x["runs"])]
            for name, x in t.items()
        ]
        plans = "\n".join(
            f"`{label}` — `{p['sql']}`\n\n```\n" + "\n".join(p["plan"]) + "\n```\n"
            for label, p in e["plans"].items()
        )
        modules = e.get("modules") or {}
        loaded = (
            "Modules `accessctl errors --limit 50` loaded (run in-process): "
            + ", ".join(f"`{m}` {'yes' if v else 'no'}" for m, v in modules.items())
            + ".\n"
            if modules
            else ""
        )
        newest_plan = " ".join(e["plans"].get("newest 50", {}).get("plan", []))
        uses_index = "Index Scan" in newest_plan or "USING INDEX" in newest_plan
        err_parts.append(
            f"""**{e["backend"]}**, {e["rows"]:,} rows in `errors` (filled in {e["fill_s"]:.0f} s):

{_table(["command", "median ms", "min ms", "runs"], err_rows)}

{loaded}
{plans}"""
        )
        summary_rows.append(
            [
                f"5. `errors --limit 50` on 1,000,000 rows ({e['backend']}) ≤ 0.5 s, using an index",
                f"{t['errors --limit 50']['median_s']:.2f} s median on {e['rows']:,} rows; plan: "
                + ("index scan (below)" if uses_index else "NO index in the plan (below)"),
                _sized(e["met"] and uses_index, e["rows"], 1_000_000),
            ]
        )
    s = sec["submit"]
    submit_rows = [
        [name, _fmt(t["median_s"], 2), _fmt(t["min_s"], 2), str(t["runs"])]
        for name, t in s["times"].items()
    ]
    fresh = s["times"]["submit 4 IDs, fresh embedded database"]
    summary_rows.append(
        [
            "5. `accessctl submit` of 4 IDs, fresh embedded database ≤ 2 s",
            f"{fresh['median_s']:.2f} s median",
            _met(s["met"]),
        ]
    )
    imports = sec.get("imports", {})
    import_rows = [
        [name, _fmt(t["median_s"] * 1000, 0), _fmt(t["min_s"] * 1000, 0), str(t["runs"])]
        for name, t in imports.items()
    ]
    import_text = (
        "What a read-only command loads, cumulatively, timed side by side "
        "(`python -c 'import ...'`, bytecode cached). The schema check reads "
        "`SELECT version_num FROM alembic_version` and compares it with "
        "`accessctl.schema.SCHEMA_HEAD`; Alembic is imported only by `migrate` or when the two "
        "differ (its row is last, for context):\n\n"
        + _table(["imports", "median ms", "min ms", "runs"], import_rows)
        + "\n"
        if import_rows
        else ""
    )
    phases = s.get("phases", [])
    phase_rows = [
        [
            p["database"],
            _fmt(p["total_s"], 2),
            _fmt(p["startup_s"], 2),
            _fmt(p["queue_wait_s"], 2),
            _fmt(p.get("first_request_wait_s"), 2),
            _fmt(p.get("requests_done_s"), 2),
            _fmt(p["batch_s"], 2),
            _fmt(p["shutdown_s"], 2),
        ]
        for p in phases
    ]
    phase_reading = ""
    by_db = {p["database"]: p for p in phases}
    if "fresh" in by_db and "existing" in by_db:
        fr, ex = by_db["fresh"], by_db["existing"]
        biggest = max(
            ("start-up", fr["startup_s"]),
            ("queue wait", fr["queue_wait_s"]),
            ("batch", fr["batch_s"]),
            ("shutdown", fr["shutdown_s"]),
            key=lambda x: x[1],
        )
        phase_reading = (
            f"On a fresh database the largest phase is {biggest[0]} ({biggest[1]:.2f} s of "
            f"{fr['total_s']:.2f} s); start-up there includes creating the schema (Alembic and DBOS "
            f"migrations): {fr['startup_s']:.2f} s fresh against {ex['startup_s']:.2f} s on an existing "
            f"database. The batch workflow waited {fr['queue_wait_s']:.2f} s (fresh) and "
            f"{ex['queue_wait_s']:.2f} s (existing) in its queue: both queues are registered before "
            "DBOS launches, so their threads poll from the start."
        )
    rows_note = ""
    if any(e["rows"] != 1_000_000 for e in sec["errors"]):
        rows_note = " (`--quick` fills 200,000)"
    text = f"""## 5. Start-up

Timed with hyperfine (`-N`, warm-up runs, interleaved commands in one session).

{_table(["command", "median ms", "min ms", "runs"], help_rows)}

{import_text}

### `accessctl errors --limit 50` on 1,000,000 error rows{rows_note}

The rows were inserted with one `INSERT … SELECT generate_series` (Postgres) or one bulk
`executemany` in SQLAlchemy's storage format (SQLite), spread over 100 batches and one row
per second of age, then `ANALYZE`d. The plans are of the exact statements
`accessctl.queries.list_errors` sends (captured from the engine), `EXPLAIN (ANALYZE, BUFFERS)`
on Postgres and `EXPLAIN QUERY PLAN` on SQLite:

{chr(10).join(err_parts)}

The query itself is an index scan that stops after 51 rows; the command's time is process
start-up (the import table above).

### `accessctl submit` (4 IDs)

End to end, exit code ignored (the four IDs are the seed's, not users of a fresh database,
so they are recorded as 4 `errors` rows and the command exits 1). "Fresh" removes the
embedded database before each run, so the time includes creating the schema.

{_table(["command", "median s", "min s", "runs"], submit_rows)}

Where one `submit` spends its time, from DBOS's own timestamps (one run each: start-up =
process start → the filing transaction stamps the batch workflow's `created_at`; queue wait =
created → the batch workflow started; first request = created → the first request started;
requests done = created → the last request finished; batch = batch workflow started →
finished; shutdown = finished → process exit):

{_table(["database", "total s", "start-up s", "queue wait s", "first request s", "requests done s", "batch s", "shutdown s"], phase_rows)}

{phase_reading}
"""
    return text, summary_rows


def render(results: dict[str, Any], plot: Path) -> str:
    sections = results["sections"]
    parts = [_header(results)]
    summary: list[list[str]] = []
    body: list[str] = []
    facts: dict[str, Any] = {}
    if "limiter" in sections:
        text, rows = _limiter(sections["limiter"])
        body.append(text.replace("bench/limiter.png", str(plot)))
        summary += rows
    if "throughput" in sections:
        text, rows, facts["throughput"] = _throughput(sections["throughput"])
        body.append(text)
        summary += rows
    if "fanout" in sections:
        text, rows, facts["fanout"] = _filing(sections["fanout"])
        body.append(text)
        summary += rows
        text, rows = _memory(sections["fanout"])
        body.append(text)
        summary += rows
    if "startup" in sections:
        text, rows = _startup(sections["startup"])
        body.append(text)
        summary += rows
    failures = results.get("failures", {})
    if failures:
        summary += [
            [f"section `{name}`", f"failed: {why}", "**not measured**"]
            for name, why in failures.items()
        ]
    parts.append(
        "## Targets at a glance\n\n" + _table(["target", "measured", "status"], summary) + "\n"
    )
    parts += body
    from findings import findings

    parts.append(findings(results, facts))
    # The HTTP figures come from bench/bench_serve.py's own run: kept on a re-render.
    serve = Path(__file__).resolve().parent / "serve_results.json"
    if serve.exists():
        import json

        from bench_serve import section

        parts.append(section(json.loads(serve.read_text())))
    return "\n".join(parts)
