"""Run every benchmark, write bench/results.json and bench/limiter.png, and regenerate
BENCHMARKS.md's tables (its prose is edited by hand: bench/tables.py).

    uv run --group bench python bench/run_all.py            # everything (~40 min)
    uv run --group bench python bench/run_all.py --quick    # smaller sizes (~12 min)
    uv run --group bench python bench/run_all.py --only limiter,startup
    uv run --group bench python bench/run_all.py --report-only   # tables and plot only

Postgres: ACCESSCTL_BENCH_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/
postgres); the benchmarks create and drop their own ``accessctl_bench_*`` databases. Without
a reachable Postgres only the SQLite figures are produced.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import bench_fanout
import bench_limiter
import bench_startup
import bench_throughput
import compare_releases
import tables
from common import BENCH, LOG_DIR, ROOT, load_average, log, machine_facts, save_json, versions

SECTIONS = {
    "limiter": bench_limiter.run,
    "throughput": bench_throughput.run,
    "fanout": bench_fanout.run,
    "startup": bench_startup.run,
    "workers": compare_releases.run,  # issue #17, beside the 0.2.0 tree when it is there
}
RESULTS = BENCH / "results.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer runs")
    parser.add_argument("--only", default="", help="comma-separated: " + ",".join(SECTIONS))
    parser.add_argument(
        "--report-only", action="store_true", help="regenerate tables and plot from results.json"
    )
    args = parser.parse_args(argv)

    if args.report_only:
        results: dict[str, Any] = json.loads(RESULTS.read_text())
    else:
        only = [s for s in args.only.split(",") if s] or list(SECTIONS)
        unknown = set(only) - set(SECTIONS)
        if unknown:
            parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
        previous: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results = {
            "machine": machine_facts(),
            "versions": versions(),
            "quick": args.quick,
            # bench_serve.py runs on its own: its figures are kept across full runs.
            "sections": dict(previous.get("sections", {}))
            if args.only
            else {k: v for k, v in previous.get("sections", {}).items() if k == "serve"},
            "timings": dict(previous.get("timings", {})) if args.only else {},
        }
        log(f"logs in {LOG_DIR}")
        started = time.monotonic()
        for name in only:
            log(f"--- {name} (load average {load_average():.2f})")
            t0 = time.monotonic()
            try:
                results["sections"][name] = SECTIONS[name](args.quick)
            except Exception as exc:  # keep the other sections' figures
                log(f"{name} failed: {exc!r}")
                results.setdefault("failures", {})[name] = repr(exc)
                continue
            finally:
                results["timings"][name] = round(time.monotonic() - t0, 1)
            save_json(RESULTS, results)
        results["machine"]["load_average_at_end"] = round(load_average(), 2)
        results["total_s"] = round(time.monotonic() - started, 1)
        save_json(RESULTS, results)

    plot = BENCH / "limiter.png"
    if "limiter" in results["sections"]:
        tables.plot_limiter(results["sections"]["limiter"], plot)
    doc = ROOT / "BENCHMARKS.md"
    doc.write_text(tables.render(doc.read_text(encoding="utf-8"), results), encoding="utf-8")
    log(f"wrote {RESULTS}, {plot} and the tables of {doc}: now edit its prose to match")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main())
