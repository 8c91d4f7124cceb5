"""Crash campaign: kill -9 a real `accessctl batch` again and again, then count.

Each round files one 500-request batch under an idempotency key on a fresh database,
kills the run with SIGKILL at a random moment several times (during fan-out, mid-batch,
near the end), then lets one run finish. It then counts, per round, requests lost (no
`accesses` or `errors` row), duplicated (more than one row), and left unfinished (workflows
still PENDING or ENQUEUED). Usage:

    uv run python bench/crash_campaign.py [--backend sqlite|postgres] [--rounds 3]
        [--kills 5] [--requests 500] [--rate 100/1] [--seed 1]

Postgres: ACCESSCTL_BENCH_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/postgres);
the campaign creates and drops its own databases (accessctl_bench_campaign_*).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from common import (
    QUEUE_NAME,
    Backend,
    backend,
    create_database,
    drop_database,
    run_cli,
    set_shared_limit,
    spawn_cli,
)

__all__ = ["drop_database", "fresh_database"]  # compare_releases.py uses them


def fresh_database(kind: str, workdir: Path) -> tuple[str, str | None]:
    """A new database: (its URL, its Postgres name or None for a SQLite file in ``workdir``)."""
    if kind == "sqlite":
        return f"sqlite:///{workdir / f'campaign-{uuid.uuid4().hex[:8]}.sqlite'}", None
    return create_database("campaign")


def outcomes(b: Backend) -> int:
    return int(b.scalar("SELECT (SELECT count(*) FROM accesses) + (SELECT count(*) FROM errors)"))


def tally(b: Backend, requests: int) -> dict[str, int]:
    rows = b.rows(
        "SELECT request_id, count(*) FROM (SELECT request_id FROM accesses "
        "UNION ALL SELECT request_id FROM errors) AS t GROUP BY request_id"
    )
    unfinished = b.scalar(f"SELECT count(*) FROM {b.table} WHERE status IN ('PENDING', 'ENQUEUED')")
    again = b.scalar(
        f"SELECT count(*) FROM {b.table} WHERE queue_name = :q AND recovery_attempts > 1",
        q=QUEUE_NAME,
    )
    return {
        "requests": requests,
        "terminal": len(rows),
        "lost": requests - len(rows),
        "duplicated": sum(n - 1 for _, n in rows if n > 1),
        "unfinished_workflows": int(unfinished),
        "requests_started_more_than_once": int(again),
    }


def run_round(
    kind: str, requests: int, kills: int, rate: str, rng: random.Random
) -> dict[str, Any]:
    with backend(kind, "campaign", users=False) as b:
        env = {**b.env, "ACCESSCTL_RATE_LIMIT": rate, "ACCESSCTL_SHUTDOWN_GRACE": "2"}
        set_shared_limit(env, "campaign")
        known = [str(uuid.uuid4()) for _ in range(3)]
        lines = ["name,email,id"] + [f"U{i},u{i}@example.com,{u}" for i, u in enumerate(known)]
        run_cli(env, ["users", "import", "-"], "campaign-users", stdin="\n".join(lines))
        unknown = str(uuid.uuid4())  # a quarter of the requests fail: errors rows count too
        args = ["batch", str(requests), "--key", f"campaign-{uuid.uuid4().hex[:6]}", "--json"]
        for user in [*known, unknown]:
            args += ["--user", user]
        kill_points = []
        for k in range(kills):
            proc = spawn_cli(env, args, f"campaign-run{k}")
            # Kill at a random share of the remaining work (0 = during fan-out).
            target = min(requests, outcomes(b) + rng.randint(0, max(1, requests // kills)))
            deadline = proc.started + 120
            while outcomes(b) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(rng.uniform(0.01, 0.2))
            proc.kill()
            kill_points.append(outcomes(b))
        final = run_cli(env, args, "campaign-final", check=False)
        summary = json.loads(final.stdout) if final.stdout.strip() else {}
        result: dict[str, Any] = tally(b, requests)
    matches = summary.get("recorded", -1) + summary.get("failed", -1) == requests
    result.update(kills=kills, kill_points=kill_points, final_exit=final.returncode)
    return {**result, "summary_matches": matches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rate", default="100/1", help="ACCESSCTL_RATE_LIMIT for the runs")
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args()
    rng = random.Random(options.seed)
    results = []
    for number in range(1, options.rounds + 1):
        started = time.monotonic()
        result = run_round(options.backend, options.requests, options.kills, options.rate, rng)
        results.append({**result, "round": number, "seconds": round(time.monotonic() - started, 1)})
        print(json.dumps(results[-1]), flush=True)
    keys = "kills requests lost duplicated unfinished_workflows requests_started_more_than_once"
    totals = {"backend": options.backend, "rounds": len(results)}
    totals |= {k: sum(r[k] for r in results) for k in keys.split()}
    print(json.dumps({"totals": totals}), flush=True)
    sys.exit(1 if totals["lost"] or totals["duplicated"] or totals["unfinished_workflows"] else 0)


if __name__ == "__main__":
    main()
