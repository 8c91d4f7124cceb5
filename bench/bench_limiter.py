"""Target 1 -- limiter fidelity.

A backlog of N = 3L requests at L per P (10/2 three times and the default 50/30 once;
``--quick``: 10/2 once) through the real ``accessctl batch N`` on each backend, interleaved,
the limit stored with ``accessctl limit set``. From DBOS's own start times
(``workflow_status.started_at_epoch_ms`` of the request queue): the most starts in any real,
half-open P-second window ``[t, t+P)``, and the span from the first to the last start against
the target's bound ``(N/L - 1)·P`` (L start at once, then L more every P).

    uv run --group bench python bench/run_all.py --only limiter [--quick]
"""

from __future__ import annotations

import bisect
import time
from typing import Any

from common import QUEUE_NAME, backend, backends, log, median, run_cli, set_shared_limit


def one_run(kind: str, limit: int, period: int, run: int) -> dict[str, Any]:
    n = 3 * limit
    bound = (n / limit - 1) * period
    tag = f"lim{limit}x{period}{kind[:2]}{run}"
    with backend(kind, tag) as b:
        env = {**b.env, "ACCESSCTL_RATE_LIMIT": f"{limit}/{period}"}
        set_shared_limit(env, tag)
        t0 = time.monotonic()
        run_cli(env, ["batch", str(n), "--json"], tag, timeout=bound + 180)
        wall = time.monotonic() - t0
        starts = [
            int(s)
            for (s,) in b.rows(
                f"SELECT started_at_epoch_ms FROM {b.table} WHERE queue_name = :q "
                "AND started_at_epoch_ms IS NOT NULL ORDER BY started_at_epoch_ms",
                q=QUEUE_NAME,
            )
        ]
        recorded = int(b.scalar("SELECT count(*) FROM accesses"))
    rel = [(s - starts[0]) / 1000 for s in starts]
    span = rel[-1]
    most = max(bisect.bisect_left(starts, t + period * 1000) - i for i, t in enumerate(starts))
    out = {
        "backend": kind,
        "limit": limit,
        "period": period,
        "n": n,
        "recorded": recorded,
        "max_in_window": most,
        "start_span_s": round(span, 3),
        "bound_s": bound,
        "overshoot_pct": round(100 * (span - bound) / bound, 2),
        "cli_wall_s": round(wall, 2),
        "starts_rel_s": [round(x, 3) for x in rel],
    }
    log(
        f"limiter {kind} {limit}/{period} run {run}: max in a window {most}, span {span:.2f}s "
        f"vs bound {bound:.0f}s ({out['overshoot_pct']:+.2f}%), wall {wall:.1f}s"
    )
    return out


def run(quick: bool = False) -> dict[str, Any]:
    kinds = backends(sqlite_first=True)
    plans = [(10, 2, 1)] if quick else [(10, 2, 3), (50, 30, 1)]
    # Backends interleaved, so both see the same machine load.
    runs = [
        one_run(kind, limit, period, r)
        for limit, period, repeats in plans
        for r in range(repeats)
        for kind in kinds
    ]
    summary = []
    for limit, period, _ in plans:
        for kind in kinds:
            mine = [x for x in runs if x["backend"] == kind and x["limit"] == limit]
            over = [x["overshoot_pct"] for x in mine]
            summary.append(
                {
                    "backend": kind,
                    "limit": limit,
                    "period": period,
                    "runs": len(mine),
                    "max_in_window_worst": max(x["max_in_window"] for x in mine),
                    "overshoot_pct_median": median(over),
                    "overshoot_pct_worst": max(over),
                    "start_span_s_median": median([x["start_span_s"] for x in mine]),
                    "bound_s": mine[0]["bound_s"],
                    "all_recorded": all(x["recorded"] == x["n"] for x in mine),
                    "n": mine[0]["n"],
                    "cli_wall_s_median": median([x["cli_wall_s"] for x in mine]),
                }
            )
    return {"runs": runs, "summary": summary}
