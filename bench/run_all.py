"""Run the benchmarks, write bench/results.json and bench/limiter.png, and regenerate
BENCHMARKS.md's tables (its prose is edited by hand: bench/tables.py).

    uv run --group bench python bench/run_all.py            # everything (~25 min)
    uv run --group bench python bench/run_all.py --quick    # smaller sizes (~7 min)
    uv run --group bench python bench/run_all.py --only limiter,startup
    uv run --group bench python bench/run_all.py --report-only   # tables and plot only

Postgres: ACCESSCTL_BENCH_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/
postgres); the benchmarks create and drop their own ``accessctl_bench_*`` databases. Without
a reachable Postgres only the SQLite figures are produced. Sections measured elsewhere
(compare_releases.py) and the archived tables are kept as they are.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import bench_fanout
import bench_limiter
import bench_startup
import bench_throughput
import tables
from common import LOG_DIR, load_average, load_json, log, machine_facts, save_json, versions

SECTIONS = {
    "limiter": bench_limiter.run,
    "throughput": bench_throughput.run,
    "fanout": bench_fanout.run,
    "startup": bench_startup.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer runs")
    parser.add_argument("--only", default="", help="comma-separated: " + ",".join(SECTIONS))
    parser.add_argument(
        "--report-only", action="store_true", help="regenerate tables and plot from results.json"
    )
    args = parser.parse_args(argv)
    results: dict[str, Any] = load_json(tables.RESULTS)
    if not args.report_only:
        only = [s for s in args.only.split(",") if s] or list(SECTIONS)
        if unknown := set(only) - set(SECTIONS):
            parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
        # A partial run keeps the other sections' figures and timings; a full run, only the
        # sections it does not measure.
        results.update(machine=machine_facts(), versions=versions(), quick=args.quick)
        results.pop("failures", None)
        results.setdefault("sections", {})
        if not args.only:
            results["sections"] = {k: v for k, v in results["sections"].items() if k not in only}
            results["timings"] = {}
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
            results.setdefault("timings", {})[name] = round(time.monotonic() - t0, 1)
            save_json(tables.RESULTS, results)
        results["machine"]["load_average_at_end"] = load_average()
        results["total_s"] = round(time.monotonic() - started, 1)
        save_json(tables.RESULTS, results)
    tables.write(results)
    log("BENCHMARKS.md's tables and bench/limiter.png regenerated: now edit its prose")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
