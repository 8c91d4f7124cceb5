# ruff: noqa: RUF001
"""Render the measured numbers of bench/results.json as the tables of BENCHMARKS.md.

BENCHMARKS.md is written by people: its prose (what was measured, why, what it means) is
edited by hand. Only the blocks between ``<!-- table NAME -->`` and ``<!-- /table -->`` are
generated, each by ``TABLES[NAME]``, from results.json alone: nothing here interprets a
figure or restates a formula of ``src/``; the targets table compares figures with the
issue's targets.

    uv run --group bench python bench/tables.py   # rewrite the tables (and limiter.png)
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
DOC = ROOT / "BENCHMARKS.md"
BLOCK = re.compile(r"(<!-- table (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
Column = str | Callable[[dict[str, Any]], Any]


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


def grid(items: Sequence[dict[str, Any]], columns: Mapping[str, Column]) -> str:
    """One row per item; ``columns`` maps each header to a key of the item or a function."""
    cells = [[c(x) if callable(c) else x[c] for c in columns.values()] for x in items]
    return table(list(columns), cells)


def cols(spec: str) -> list[str]:
    """Column headers, written as one "a | b | c" string."""
    return spec.split(" | ")


def pct(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.0f}%"


def timings(first: str, times: dict[str, dict[str, Any]], unit: str = "ms") -> str:
    """Commands timed side by side: median, min and runs (in whole ms, or s to 2 decimals)."""
    scale, show = (1000, round) if unit == "ms" else (1, lambda t: f"{t:.2f}")
    rows = [
        [k, show(v["median_s"] * scale), show(v["min_s"] * scale), v["runs"]]
        for k, v in times.items()
    ]
    return table([first, f"median {unit}", f"min {unit}", "runs"], rows)


def archived(name: str) -> Callable[[dict[str, Any]], str]:
    """A table whose measurement was removed: its last figures, kept in results.json."""
    return lambda r: table(r["archive"][name]["columns"], r["archive"][name]["rows"])


# --- the tables -------------------------------------------------------------------------


def run(r: dict[str, Any]) -> str:
    m, v = r["machine"], r["versions"]
    timings = ", ".join(f"{k} {s / 60:.1f} min" for k, s in r.get("timings", {}).items())
    rows = [
        ["date", m["date"]],
        ["machine", f"{m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}"],
        [
            "load average",
            f"{m['load_average_at_start']} at start, {m.get('load_average_at_end')} at end",
        ],
        ["versions", ", ".join(f"{k} {val}" for k, val in v.items())],
        ["duration", f"{r.get('total_s', 0) / 60:.1f} min ({timings})"],
        ["mode", "quick" if r.get("quick") else "full"],
    ]
    return table(["", ""], rows)


def targets(r: dict[str, Any]) -> str:
    """Each target of the issue against what was measured: (target, measured, met)."""
    s, rows = r["sections"], []
    for x in s.get("limiter", {}).get("summary", []):
        on, worst, over = (
            f"{x['limit']}/{x['period']}, {x['backend']}",
            x["max_in_window_worst"],
            x["overshoot_pct_median"],
        )
        rows.append([f"1. limiter {on}: no P-window over L", f"max {worst}", worst <= x["limit"]])
        rows.append(
            [
                f"1. limiter {on}: span within 3% of the bound",
                f"{over:+.2f}% median",
                abs(over) <= 3,
            ]
        )
    st = s.get("startup", {})
    if "help" in st:
        ratio = st["help"]["ratio"]
        rows.append(["5. `--help` ≤ 1.5× `import typer, rich`", f"{ratio}×", ratio <= 1.5])
    for e in st.get("errors", []):
        t, on = e["times"]["errors --limit 50"]["median_s"], f"{e['rows']:,} rows ({e['backend']})"
        rows.append([f"5. `errors --limit 50` on {on} ≤ 0.5 s", f"{t:.2f} s", t <= 0.5])
    if "submit" in st:
        t = st["submit"]["times"]["submit 4 IDs, fresh embedded database"]["median_s"]
        rows.append(["5. `submit` of 4 IDs, fresh embedded database ≤ 2 s", f"{t:.2f} s", t <= 2])
    rows += throughput_targets(r)
    for f in s.get("fanout", {}).get("filing", []):
        if f["n"] >= 100_000:
            on, visible, rss = f"{f['n']:,} ({f['backend']})", f["visible_s"], f["peak_rss_mib"]
            ok = f["complete"] and visible <= 60
            rows.append([f"3. filing {on}: all ENQUEUED ≤ 60 s", f"{visible:.1f} s", ok])
            on = f"`batch {f['n']}` ({f['backend']})"
            rows.append([f"4. peak RSS of {on} ≤ 300 MiB", f"{rss:.0f} MiB", rss <= 300])
    return table(["target", "measured", "met"], rows + r["archive"]["targets"]["rows"])


def limiter(r: dict[str, Any]) -> str:
    return grid(
        r["sections"]["limiter"]["summary"],
        {
            "backend": "backend",
            "limit": lambda x: f"{x['limit']}/{x['period']}",
            "N": "n",
            "runs": "runs",
            "max in a P-window (worst)": "max_in_window_worst",
            "span (median)": lambda x: f"{x['start_span_s_median']:.2f} s",
            "bound": lambda x: f"{x['bound_s']:g} s",
            "over the bound (median)": lambda x: (
                f"{x['overshoot_pct_median']:+.2f}% (worst {x['overshoot_pct_worst']:+.2f}%)"
            ),
            "command wall (median)": lambda x: f"{x['cli_wall_s_median']:.1f} s",
            "all rows written": "all_recorded",
        },
    )


def filing(r: dict[str, Any]) -> str:
    return grid(
        r["sections"]["fanout"]["filing"],
        {
            "backend": "backend",
            "N": "n",
            "start-up s": "before_filing_s",
            "transaction s": "transaction_s",
            "last round written s": "last_round_s",
            '"batch filed" s': "filed_log_s",
            "all visible s": "visible_s",
            "partial counts seen": lambda f: (
                ", ".join(map(str, f["partial_counts_seen"])) or "none"
            ),
            "requests / s in the transaction": lambda f: (
                f["transaction_s"] and round(f["n"] / f["transaction_s"])
            ),
            "Postgres row writes / request": lambda f: f.get("pg_rows_written_per_child"),
            "peak RSS to commit MiB": "peak_rss_filing_mib",
            "peak RSS MiB": "peak_rss_mib",
        },
    )


def errors_times(backend: str) -> Callable[[dict[str, Any]], str]:
    def render(r: dict[str, Any]) -> str:
        [e] = [e for e in r["sections"]["startup"]["errors"] if e["backend"] == backend]
        return timings("command", e["times"])

    return render


def render(doc: str, results: dict[str, Any]) -> str:
    """``doc`` with every table block regenerated; a table whose section was not measured
    this time is left as it was."""

    def one(match: re.Match[str]) -> str:
        if match["name"] not in TABLES:
            raise KeyError(f"BENCHMARKS.md names an unknown table {match['name']!r}")
        try:
            body = TABLES[match["name"]](results)
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
            mine = [x for x in runs if x["backend"] == kind and x["limit"] == limit]
            mine.sort(key=lambda x: x["overshoot_pct"])
            starts: list[float] = mine[(len(mine) - 1) // 2]["starts_rel_s"]
            horizon = max(starts) + period + 1
            bins = [float(s) for s in range(math.ceil(horizon) + 1)]
            ax.hist(starts, bins=bins, alpha=0.75, label="starts in each second")
            ts = [k * 0.02 for k in range(int(horizon / 0.02) + 1)]
            trailing = [sum(1 for s in starts if t - period < s <= t) for t in ts]
            ax.step(ts, trailing, where="post", label=f"starts in the trailing {period:g} s")
            ax.axhline(limit, color="red", ls="--", lw=1, label=f"L = {limit}")
            ax.set_title(f"{kind}: {limit}/{period:g}")
            ax.set_xlabel("seconds since the first start")
            ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def write(results: dict[str, Any]) -> None:
    """Regenerate BENCHMARKS.md's tables and bench/limiter.png from ``results``."""
    if "limiter" in results["sections"]:
        plot_limiter(results["sections"]["limiter"], ROOT / "bench" / "limiter.png")
    DOC.write_text(render(DOC.read_text(encoding="utf-8"), results), encoding="utf-8")


# --- throughput / workers and the release comparison ------------------------------------
# bench_throughput.py and compare_releases.py's tables, kept apart so they change on their own.


def throughput_targets(r: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for x in r["sections"].get("throughput", {}).get("summary", []):
        if x["workers"] <= 2 and x["n"] >= 10_000:
            where = f"{x['backend']}, {x['workers']} worker(s)"
            rows.append(
                [
                    f"2. throughput ({where}) ≥ 150 req/s",
                    f"{x['rate_median']:.1f} req/s",
                    x["rate_median"] >= 150,
                ]
            )
            rows.append(
                [
                    f"2. plain SQLAlchemy loop ÷ accessctl ({where}) ≤ 6",
                    f"{x['loop_ratio_median']:.2f}×",
                    x["loop_ratio_median"] <= 6,
                ]
            )
    return rows


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


def profiles(r: dict[str, Any]) -> str:
    """The hottest frames of every profile recorded (py-spy), by where it was taken."""
    found: list[tuple[str, dict[str, Any]]] = []
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
    def who_ran(x: dict[str, Any]) -> str:
        raised = x.get("env", {}).get("ACCESSCTL_CONCURRENCY")
        who = f"{x['tree']}, concurrency {raised}" if raised else str(x["tree"])
        return f"{who}, workers already running" if x.get("running_first") else who

    whos = dict.fromkeys(who_ran(x) for x in s["runs"])  # in the order they first ran
    groups = [(who, w, xs) for who in whos for w in (1, 2, 4)
              if (xs := [x for x in s["runs"] if who_ran(x) == who and x["workers"] == w])]  # fmt: skip
    groups += [(v, 0, [x for x in s["baselines"] if x["what"] == k]) for k, v in names.items()]
    for who, w, xs in groups:
        rate = _med([x["rate"] for x in xs])
        one.setdefault(who, rate)
        cpu = [sum(x["worker_cpu_util"]) / len(x["worker_cpu_util"]) for x in xs if x.get("worker_cpu_util")]
        rows.append([who, w or "1 process", xs[0]["n"], ", ".join(f"{x['rate']:.0f}" for x in xs), rate,
                     f"{rate / one[who]:.2f}" if w else "–",
                     _med([x.get("steady_rate") for x in xs]), _med([x.get("pg_xacts_per_request") for x in xs]),
                     f"{_med(cpu):.2f}" if cpu else "–"])  # fmt: skip
    return table(cols("what | workers | N | req/s, each round | req/s (median) | ÷ 1 worker | "
                      "steady req/s | Postgres transactions / request | CPU per worker (one core)"), rows)  # fmt: skip


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
    "filing": filing,
    "atomicity": archived("atomicity"),
    "insert-probe": archived("insert-probe"),
    "help": lambda r: timings("command", r["sections"]["startup"]["help"]["times"]),
    "imports": archived("imports"),
    "errors-postgres": errors_times("postgres"),
    "errors-sqlite": errors_times("sqlite"),
    "submit": lambda r: timings("command", r["sections"]["startup"]["submit"]["times"], "s"),
    "submit-phases": archived("submit-phases"),
    "serve": archived("serve"),
    "throughput": throughput,
    "throughput-probes": throughput_probes,
    "profiles": profiles,
    "release-compare": release_compare,
    "workers-run": workers_facts,
    "workers-idle": workers_idle,
    "workers-scaling": workers_scaling,
}

if __name__ == "__main__":
    write(json.loads(RESULTS.read_text(encoding="utf-8")))
