# ruff: noqa: RUF001
"""Render the measured numbers of bench/results.json as the tables of BENCHMARKS.md.

BENCHMARKS.md is written by people: its prose (what was measured, why, what it means) is
edited by hand. Only the blocks between ``<!-- table NAME -->`` and ``<!-- /table -->`` are
generated, each by the function of that name below, from results.json alone: nothing here
interprets a figure or restates a formula of ``src/``.

    uv run --group bench python bench/tables.py           # rewrite the tables in place
    uv run --group bench python bench/tables.py --check   # exit 1 if any table is stale
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
DOC = ROOT / "BENCHMARKS.md"
BLOCK = re.compile(r"(<!-- table (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    # Markdown: a pipe would end the cell, and "<locals>" would be read as an HTML tag.
    return str(value).replace("|", "\\|").replace("<", "&lt;")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def cols(spec: str) -> list[str]:
    """Column headers, written as one "a | b | c" string."""
    return spec.split(" | ")


def pct(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.0f}%"


def _ms(entry: dict[str, Any]) -> list[Any]:
    return [round(entry["median_s"] * 1000), round(entry["min_s"] * 1000), entry["runs"]]


# --- one function per table -------------------------------------------------------------


def run(r: dict[str, Any]) -> str:
    m, v = r["machine"], r["versions"]
    timings = ", ".join(f"{k} {s / 60:.1f} min" for k, s in r.get("timings", {}).items())
    return table(
        ["", ""],
        [
            ["date", m["date"]],
            [
                "machine",
                f"{m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}",
            ],
            [
                "load average",
                f"{m['load_average_at_start']} at start, {m.get('load_average_at_end')} at end",
            ],
            ["versions", ", ".join(f"{k} {val}" for k, val in v.items())],
            ["duration", f"{r.get('total_s', 0) / 60:.1f} min ({timings})"],
            ["mode", "quick" if r.get("quick") else "full"],
        ],
    )


def targets(r: dict[str, Any]) -> str:
    """Each target of the issue against what was measured."""
    s = r["sections"]
    rows: list[list[Any]] = []

    def add(target: str, measured: str, met: bool) -> None:
        rows.append([target, measured, met])

    for x in s.get("limiter", {}).get("summary", []):
        rate = f"{x['limit']}/{x['period']}, {x['backend']}"
        add(f"1. limiter {rate}: no P-window over L", f"max {x['max_in_window_worst']}",
            x["window_met"])  # fmt: skip
        add(f"1. limiter {rate}: span within 3% of the bound",
            f"{x['overshoot_pct_median']:+.2f}% median", x["finish_met"])  # fmt: skip
    st = s.get("startup", {})
    if "help" in st:
        add("5. `--help` ≤ 1.5× `import typer, rich`", f"{st['help']['ratio']}×",
            st["help"]["met"])  # fmt: skip
    for e in st.get("errors", []):
        add(f"5. `errors --limit 50` on {e['rows']:,} rows ({e['backend']}) ≤ 0.5 s",
            f"{e['times']['errors --limit 50']['median_s']:.2f} s", e["met"])  # fmt: skip
    if "submit" in st:
        fresh = st["submit"]["times"]["submit 4 IDs, fresh embedded database"]
        add("5. `submit` of 4 IDs, fresh embedded database ≤ 2 s", f"{fresh['median_s']:.2f} s",
            st["submit"]["met"])  # fmt: skip
    for x in s.get("throughput", {}).get("summary", []):
        if x["workers"] <= 2 and x["n"] >= 10_000:
            where = f"{x['backend']}, {x['workers']} worker(s)"
            add(f"2. throughput ({where}) ≥ 150 req/s", f"{x['rate_median']:.1f} req/s",
                x["rate_median"] >= 150)  # fmt: skip
            add(f"2. plain SQLAlchemy loop ÷ accessctl ({where}) ≤ 6",
                f"{x['loop_ratio_median']:.2f}×", x["loop_ratio_median"] <= 6)  # fmt: skip
    for f in s.get("fanout", {}).get("filing", []):
        if f["n"] >= 100_000:
            add(f"3. filing {f['n']:,} ({f['backend']}): all ENQUEUED ≤ 60 s",
                f"{f['visible_s']:.1f} s", f["complete"] and f["visible_s"] <= 60)  # fmt: skip
            add(f"4. peak RSS of `batch {f['n']}` ({f['backend']}) ≤ 300 MiB",
                f"{f['peak_rss_mib']:.0f} MiB", f["peak_rss_mib"] <= 300)  # fmt: skip
    for a in s.get("fanout", {}).get("atomicity", []):
        add(f"3. filing {a['n']:,} ({a['backend']}) is all or none", f"{len(a['kills'])} kill(s)",
            a["all_or_none"])  # fmt: skip
    return table(["target", "measured", "met"], rows)


def _limiter_row(x: dict[str, Any]) -> list[Any]:
    late = sum(x["opening_lateness_s"])
    return [
        x["backend"],
        f"{x['limit']}/{x['period']}",
        x["max_in_window"],
        f"{x['overshoot_pct']:+.2f}%",
        f"{late * 1000:.0f} ms",
        f"{x['window_spread_s'][0] * 1000:.0f} ms",
    ]


def limiter(r: dict[str, Any]) -> str:
    sec = r["sections"]["limiter"]
    rows = []
    for x in sec["summary"]:
        mine = [y for y in sec["runs"] if y["backend"] == x["backend"] and y["limit"] == x["limit"]]
        rows.append(
            [
                x["backend"],
                f"{x['limit']}/{x['period']}",
                mine[0]["n"],
                x["runs"],
                x["max_in_window_worst"],
                f"{x['start_span_s_median']:.2f} s",
                f"{x['bound_s']:g} s",
                f"{x['overshoot_pct_median']:+.2f}% (worst {x['overshoot_pct_worst']:+.2f}%)",
                f"{statistics.median(sum(y['opening_lateness_s']) for y in mine) * 1000:.0f} ms",
                f"{statistics.median(y['window_spread_s'][0] for y in mine) * 1000:.0f} ms",
                f"{statistics.median(y['cli_wall_s'] for y in mine):.1f} s",
                x["all_recorded"],
            ]
        )
    headers = cols(
        "backend | limit | N | runs | max in a P-window (worst) | span (median) | bound | "
        "over the bound (median) | (a) windows opened late by | (b) first-window spread | "
        "command wall (median) | all rows written"
    )
    return table(headers, rows)


def limiter_probes(r: dict[str, Any]) -> str:
    probes = r["sections"]["limiter"].get("probes", [])
    headers = cols(
        "backend | limit | max in a window | over the bound | "
        "windows opened late by (sum) | first-window spread"
    )
    return table(headers, [_limiter_row(x) for x in probes])


def _cpu(shares: Sequence[float]) -> str:
    return ", ".join(pct(c) for c in shares)


def throughput(r: dict[str, Any]) -> str:
    sec = r["sections"]["throughput"]
    rows = []
    for x in sec["summary"]:
        rows.append(
            [
                x["backend"],
                x["workers"],
                x["n"],
                x["runs"],
                f"{x['rate_median']:.1f} ({', '.join(f'{v:.0f}' for v in x['rates'])})",
                x["steady_rate_median"],
                x["loop_rate_median"],
                f"{x['loop_ratio_median']:.2f}×",
                f"{x['orm_loop_rate_median']:.1f} ({x['orm_loop_ratio_median']:.2f}×)",
                pct(x["worker_cpu_util_median"]),
                pct(x.get("pg_backend_cpu_util_median")),
                pct(x["machine_busy_median"]),
                x.get("pg_commits_per_request"),
                x.get("pg_connections_peak"),
                x["launch_s_median"],
                x["tail_s_median"],
                x["all_recorded"],
            ]
        )
    headers = cols(
        "backend | workers | N | runs | req/s: median (each run) | steady req/s | "
        "loop req/s | loop ÷ accessctl | 0.1.0's ORM loop req/s (÷ accessctl) | "
        "worker CPU (median) | Postgres server CPU | machine CPU (2 cores) | "
        "Postgres commits / request | Postgres connections (peak) | launch s | tail s | "
        "all rows"
    )
    return table(headers, rows)


def throughput_probes(r: dict[str, Any]) -> str:
    rows = [
        [
            x["probe"],
            x["backend"],
            x["workers"],
            ", ".join(f"{k}={v}" for k, v in x["env"].items()) or "defaults",
            x["rate"],
            x["steady_rate"],
            _cpu(x["worker_cpu_util"]),
            pct(x.get("profiler_cpu_util")),
            pct(x["machine_busy"]),
        ]
        for x in r["sections"]["throughput"].get("probes", [])
    ]
    headers = cols(
        "probe | backend | workers | settings | req/s | steady req/s | worker CPU | "
        "py-spy CPU | machine CPU"
    )
    return table(headers, rows)


def filing(r: dict[str, Any]) -> str:
    rows = [
        [
            f["backend"],
            f["n"],
            f["before_filing_s"],
            f["transaction_s"],
            f["last_round_s"],
            f["filed_log_s"],
            f["visible_s"],
            ", ".join(map(str, f["partial_counts_seen"])) or "none",
            round(f["n"] / f["transaction_s"]) if f["transaction_s"] else None,
            f.get("pg_rows_written_per_child"),
            f["peak_rss_filing_mib"],
            f["peak_rss_mib"],
        ]
        for f in r["sections"]["fanout"]["filing"]
    ]
    headers = [
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
    ]
    return table(headers, rows)


def detach(r: dict[str, Any]) -> str:
    rows = [
        [
            d["backend"],
            d["n"],
            d["wall_s"],
            d["filed_log_s"],
            d["transaction_s"],
            d["workflow_rows_enqueued"],
            d["peak_rss_mib"],
            d["exit_code"],
        ]
        for d in r["sections"]["fanout"]["detach"]
    ]
    headers = [
        "backend",
        "N",
        "wall s",
        '"batch filed for workers" s',
        "transaction s",
        "workflow rows ENQUEUED",
        "peak RSS MiB",
        "exit",
    ]
    return table(headers, rows)


def _rows_of(state: dict[str, Any]) -> str:
    return f"{state['batches_rows']} / {state['workflow_rows']:,} / {state['input_rows']:,}"


def atomicity(r: dict[str, Any]) -> str:
    rows: list[list[Any]] = []
    for a in r["sections"]["fanout"]["atomicity"]:
        for i, k in enumerate(a["kills"], 1):
            what = f"{k['killed_after_open_s']:.2f} s after the transaction opened; open at the kill: {fmt(k['transaction_open_at_kill'])}"
            rows.append(
                [
                    a["backend"],
                    a["n"],
                    f"SIGKILL #{i} while filing",
                    what,
                    _rows_of(k["state"]),
                    "none" if k["none"] else "PARTIAL",
                ]
            )
        rerun = a["rerun"]
        rows.append(
            [
                a["backend"],
                a["n"],
                "the same command again",
                f"exit {rerun['exit_code']} in {rerun['wall_s']:.1f} s",
                _rows_of(rerun["state"]),
                "whole" if rerun["whole"] else "PARTIAL",
            ]
        )
    headers = cols(
        "backend | N | run | what happened | `batches` / workflow / input rows | verdict"
    )
    return table(headers, rows)


def insert_probe(r: dict[str, Any]) -> str:
    rows = [
        [
            p["backend"],
            p["n"],
            p["build_statuses_s"],
            p["dbos_init_workflows_s"],
            p["accessctl_executemany_s"],
            f"{p['ratio']:.1f}×",
        ]
        for p in r["sections"]["fanout"].get("insert_probe", [])
    ]
    headers = cols(
        "backend | requests | building the statuses s | DBOS init_workflows s | "
        "accessctl executemany s | DBOS ÷ accessctl"
    )
    return table(headers, rows)


def memory(r: dict[str, Any]) -> str:
    fo = r["sections"]["fanout"]
    small_n, big_n = fo["sizes"]
    rows = []
    for kind in sorted({f["backend"] for f in fo["filing"]}):
        f = {x["n"]: x for x in fo["filing"] if x["backend"] == kind}
        d = {x["n"]: x for x in fo["detach"] if x["backend"] == kind}
        small, big = f[small_n]["peak_rss_mib"], f[big_n]["peak_rss_mib"]
        rows.append(
            [
                kind,
                small,
                big,
                big / small,
                round((big - small) * 1024 / ((big_n - small_n) / 1000)),
                f"{f[small_n]['peak_rss_filing_mib']} / {f[big_n]['peak_rss_filing_mib']}",
                f"{d[small_n]['peak_rss_mib']} / {d[big_n]['peak_rss_mib']}" if d else "–",
            ]
        )
    headers = [
        "backend",
        f"peak RSS MiB, {small_n:,}",
        f"peak RSS MiB, {big_n:,}",
        "ratio",
        "KiB per 1,000 requests",
        "to the commit, MiB (small / big)",
        "`--detach` peak MiB (small / big)",
    ]
    return table(headers, rows)


def help_times(r: dict[str, Any]) -> str:
    times = r["sections"]["startup"]["help"]["times"]
    return table(
        ["command", "median ms", "min ms", "runs"], [[k, *_ms(v)] for k, v in times.items()]
    )


def imports(r: dict[str, Any]) -> str:
    times = r["sections"]["startup"]["imports"]
    return table(
        ["imports", "median ms", "min ms", "runs"], [[k, *_ms(v)] for k, v in times.items()]
    )


def errors_times(backend: str) -> Callable[[dict[str, Any]], str]:
    def render(r: dict[str, Any]) -> str:
        [e] = [e for e in r["sections"]["startup"]["errors"] if e["backend"] == backend]
        return table(
            ["command", "median ms", "min ms", "runs"],
            [[k, *_ms(v)] for k, v in e["times"].items()],
        )

    return render


def submit(r: dict[str, Any]) -> str:
    times = r["sections"]["startup"]["submit"]["times"]
    rows = [[k, f"{v['median_s']:.2f}", f"{v['min_s']:.2f}", v["runs"]] for k, v in times.items()]
    return table(["command", "median s", "min s", "runs"], rows)


def submit_phases(r: dict[str, Any]) -> str:
    keys = [
        "database",
        "total_s",
        "startup_s",
        "queue_wait_s",
        "first_request_wait_s",
        "requests_done_s",
        "batch_s",
        "shutdown_s",
    ]
    rows = [[p[k] for k in keys] for p in r["sections"]["startup"]["submit"]["phases"]]
    headers = cols(
        "database | total s | start-up s | queue wait s | first request s | "
        "requests done s | batch s | shutdown s"
    )
    return table(headers, rows)


def profiles(r: dict[str, Any]) -> str:
    """The hottest frames of every profile recorded (py-spy), by where it was taken."""
    found: list[tuple[str, dict[str, Any]]] = []
    for p in r["sections"]["fanout"].get("profiles", []):
        found.append((f"filing {p['n']:,} ({p['backend']})", p["profile"]))
    for x in r["sections"]["throughput"].get("probes", []):
        if x.get("profile"):
            found.append((f"{x['workers']} worker(s) ({x['backend']})", x["profile"]))
    rows = [
        [
            where,
            prof["samples"],
            ", ".join(f"{name} {share}%" for name, share in prof["roles"][:3]),
            ", ".join(f"{name} {share}%" for name, share in prof["self"][:3]),
        ]
        for where, prof in found
        if prof.get("available")
    ]
    return table(["profile", "samples", "top roles", "hottest frames (self time)"], rows)


def serve(r: dict[str, Any]) -> str:
    """bench/bench_serve.py: the HTTP face beside the CLI's own calls, per backend."""
    lines = [
        "| backend | what | HTTP req/s | p50 / p95 / p99 ms | CLI per call (median) | "
        "HTTP p50 vs CLI | HTTP req/s vs CLI calls/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["sections"]["serve"]["results"]:
        pairs = [
            (
                "POST /submit (1 ID)",
                x["http"]["submit"],
                x["cli"]["submit_detach"],
                "`submit ID --detach`",
            ),
            (
                f"GET /errors?limit=50 ({x['rows']:,} rows)",
                x["http"]["errors"],
                x["cli"]["errors"],
                "`errors --limit 50 --json`",
            ),
            (
                "GET /errors page 21 (cursor)",
                x["http"]["errors_page_21"],
                x["cli"]["errors"],
                "`errors --limit 50 --json`",
            ),
        ]
        for label, http, cli, cli_label in pairs:
            cli_s = cli["median_s"]
            lines.append(
                f"| {x['backend']} | {label} | {http['rps']} | "
                f"{http['p50_ms']} / {http['p95_ms']} / {http['p99_ms']} | "
                f"{cli_s * 1000:.0f} ms ({cli_label}) | "
                f"{cli_s * 1000 / http['p50_ms']:.0f}x faster | "
                f"{http['rps'] * cli_s:.0f}x |"
            )
    return "\n".join(lines) + "\n"


def release_compare(r: dict[str, Any]) -> str:
    """One release against the previous one, measured side by side in one run."""
    section = r["sections"]["release_compare"]
    return table(
        ["what", "backend", section["baseline"].split(" ")[0], "this release", "ratio"],
        section["rows"],
    )


TABLES: dict[str, Callable[[dict[str, Any]], str]] = {
    "run": run,
    "targets": targets,
    "limiter": limiter,
    "limiter-probes": limiter_probes,
    "throughput": throughput,
    "throughput-probes": throughput_probes,
    "profiles": profiles,
    "filing": filing,
    "detach": detach,
    "atomicity": atomicity,
    "insert-probe": insert_probe,
    "memory": memory,
    "help": help_times,
    "imports": imports,
    "errors-postgres": errors_times("postgres"),
    "errors-sqlite": errors_times("sqlite"),
    "submit": submit,
    "submit-phases": submit_phases,
    "serve": serve,
    "release-compare": release_compare,
}


def render(doc: str, results: dict[str, Any]) -> str:
    """``doc`` with every table block regenerated; a table whose section was not measured
    this time is left as it was."""

    def one(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in TABLES:
            raise KeyError(f"BENCHMARKS.md names an unknown table {name!r}")
        try:
            body = TABLES[name](results)
        except KeyError:
            body = match["body"]
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(one, doc)


def plot_limiter(section: dict[str, Any], out: Path) -> None:
    """The median run of each configuration: starts per second and in the trailing window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = section["runs"]
    configs = sorted({(x["limit"], x["period"]) for x in runs})
    kinds = [k for k in ("sqlite", "postgres") if any(x["backend"] == k for x in runs)]
    fig, axes = plt.subplots(
        len(configs), len(kinds), figsize=(6.4 * len(kinds), 3.9 * len(configs)), squeeze=False
    )
    for i, (limit, period) in enumerate(configs):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            mine = sorted(
                (x for x in runs if x["backend"] == kind and x["limit"] == limit),
                key=lambda x: x["overshoot_pct"],
            )
            starts: list[float] = mine[(len(mine) - 1) // 2]["starts_rel_s"]
            horizon = max(starts) + period + 1
            ax.hist(
                starts,
                bins=[float(s) for s in range(math.ceil(horizon) + 1)],
                alpha=0.75,
                label="starts in each second",
            )
            ts = [k * 0.02 for k in range(int(horizon / 0.02) + 1)]
            ax.step(
                ts,
                [sum(1 for s in starts if t - period < s <= t) for t in ts],
                where="post",
                label=f"starts in the trailing {period:g} s",
            )
            ax.axhline(limit, color="red", ls="--", lw=1, label=f"L = {limit}")
            ax.set_title(f"{kind}: {limit}/{period:g}")
            ax.set_xlabel("seconds since the first start")
            ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a table differs from results.json"
    )
    args = parser.parse_args(argv)
    doc = DOC.read_text(encoding="utf-8")
    new = render(doc, json.loads(RESULTS.read_text(encoding="utf-8")))
    if args.check:
        if new != doc:
            print(
                "BENCHMARKS.md's tables differ from bench/results.json: run bench/tables.py",
                file=sys.stderr,
            )
            return 1
        return 0
    DOC.write_text(new, encoding="utf-8")
    return 0


# --- issue #17: idle workers, pickup, scaling out (bench/compare_releases.py) ---------


def _med(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def workers_facts(r: dict[str, Any]) -> str:
    s = r["sections"]["workers"]
    return table(["", ""], [
        ["run", f"{s['date']}, {'quick' if s['quick'] else 'full'}, {s['duration_s'] / 60:.1f} min, load average "
                f"{s['load_start']:.1f} at start, {s['load_end']:.1f} at end; trees: {', '.join(s['trees'])}"],
        ["idle", f"{s['window_s']} s window after {s['warm_up_s']} s warm-up; pickup after ≥ {s['rest_s']} s idle"],
        ["scaling", f"N = {s['n']:,}, {s['repeats']} round(s); DBOS as it comes: N = {s['n_dbos']:,}"],
    ])  # fmt: skip


def workers_idle(r: dict[str, Any]) -> str:
    rows = []
    for x, p in zip(r["sections"]["workers"]["idle"], r["sections"]["workers"]["pickup"], strict=True):
        got = [v for v in p["pickup_s"] if v is not None]
        top = max(got) if got and len(got) == len(p["pickup_s"]) else None  # a miss has no max
        met = x["cpu_pct"] <= 1 and (x["pg_xacts_per_s"] or 0) <= 2 and top is not None and top <= 1
        rows.append([x["backend"], x["limit"], x["tree"], f"{x['cpu_pct']:.1f}%", x["pg_xacts_per_s"],
                     _med(got), top, len(p["pickup_s"]), met])  # fmt: skip
    return table(cols("backend | limit | tree | idle CPU (one core) | Postgres transactions/s | "
                      "pickup median s | pickup max s | samples | ≤ 1%, ≤ 2/s, ≤ 1 s"), rows)  # fmt: skip


def workers_scaling(r: dict[str, Any]) -> str:
    s, rows, one = r["sections"]["workers"], [], {}
    names = {"loop": "plain loop (`make_engine`)", "dbos-datasource": "DBOS as it comes",
             "dbos-plain": "DBOS, plain transaction"}  # fmt: skip
    groups = [(t, w, [x for x in s["runs"] if x["tree"] == t and x["workers"] == w])
              for t in s["trees"] for w in (1, 2, 4)]  # fmt: skip
    groups += [(v, 0, [x for x in s["baselines"] if x["what"] == k]) for k, v in names.items()]
    for who, w, xs in groups:
        rate = _med([x["rate"] for x in xs])
        one.setdefault(who, rate)
        rows.append([who, w or "1 process", xs[0]["n"], ", ".join(f"{x['rate']:.0f}" for x in xs), rate,
                     f"{rate / one[who]:.2f}" if w else "–", _med([x.get("steady_rate") for x in xs]),
                     _med([x.get("pg_xacts_per_request") for x in xs])])  # fmt: skip
    return table(cols("what | workers | N | req/s, each round | req/s (median) | ÷ 1 worker | "
                      "steady req/s | Postgres transactions / request"), rows)  # fmt: skip


TABLES.update({"workers-run": workers_facts, "workers-idle": workers_idle, "workers-scaling": workers_scaling})


if __name__ == "__main__":
    raise SystemExit(main())
