"""Crash campaign: kill -9 a real `accessctl batch` again and again, then count.

Each round files one 500-request batch under an idempotency key on a fresh database,
kills the run with SIGKILL at a random moment several times (during fan-out, mid-batch,
near the end), then lets one run finish. It then counts, per round, requests lost (no
`accesses` or `errors` row), duplicated (more than one row), and left unfinished (workflows
still PENDING or ENQUEUED). Usage:

    uv run python bench/crash_campaign.py [--backend sqlite|postgres] [--rounds 3]
        [--kills 5] [--requests 500] [--rate 100/1] [--seed 1]

Postgres: ACCESSCTL_BENCH_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/postgres);
the campaign creates and drops its own databases (accessctl_campaign_*).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ACCESSCTL = str(Path(sys.executable).parent / "accessctl")
ADMIN_URL = os.environ.get(
    "ACCESSCTL_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def fresh_database(backend: str, workdir: Path) -> tuple[str, str | None]:
    if backend == "sqlite":
        return f"sqlite:///{workdir / f'campaign-{uuid.uuid4().hex[:8]}.sqlite'}", None
    name = f"accessctl_campaign_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return sa.make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False), name


def drop_database(name: str | None) -> None:
    if name is None:
        return
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def accessctl(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ACCESSCTL, *args], env=env, input=stdin, capture_output=True, text=True, check=False
    )


def count_outcomes(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            accesses = conn.execute(sa.text("SELECT count(*) FROM accesses")).scalar() or 0
            errors = conn.execute(sa.text("SELECT count(*) FROM errors")).scalar() or 0
    finally:
        engine.dispose()
    return int(accesses) + int(errors)


def tally(url: str, requests: int) -> dict[str, int]:
    table = "workflow_status" if url.startswith("sqlite") else "dbos.workflow_status"
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT request_id, count(*) FROM (SELECT request_id FROM accesses "
                    "UNION ALL SELECT request_id FROM errors) AS t GROUP BY request_id"
                )
            ).all()
            unfinished = conn.execute(
                sa.text(f"SELECT count(*) FROM {table} WHERE status IN ('PENDING', 'ENQUEUED')")
            ).scalar()
            reexecuted = conn.execute(
                sa.text(
                    f"SELECT count(*) FROM {table} WHERE queue_name = 'access-requests' "
                    "AND recovery_attempts > 1"
                )
            ).scalar()
    finally:
        engine.dispose()
    distinct = len(rows)
    return {
        "requests": requests,
        "terminal": distinct,
        "lost": requests - distinct,
        "duplicated": sum(n - 1 for _, n in rows if n > 1),
        "unfinished_workflows": int(unfinished or 0),
        "requests_started_more_than_once": int(reexecuted or 0),
    }


def run_round(
    backend: str, requests: int, kills: int, rate: str, rng: random.Random, workdir: Path
) -> dict[str, Any]:
    url, dbname = fresh_database(backend, workdir)
    env = {
        **os.environ,
        "ACCESSCTL_DATABASE_URL": url,
        "ACCESSCTL_RATE_LIMIT": rate,
        "ACCESSCTL_LOG_FORMAT": "json",
        "ACCESSCTL_SHUTDOWN_GRACE": "2",
    }
    try:
        assert accessctl(env, "migrate").returncode == 0
        known = [str(uuid.uuid4()) for _ in range(3)]
        lines = ["name,email,id"] + [f"U{i},u{i}@example.com,{u}" for i, u in enumerate(known)]
        assert accessctl(env, "users", "import", "-", stdin="\n".join(lines)).returncode == 0
        unknown = str(uuid.uuid4())  # a quarter of the requests fail: errors rows count too
        args = ["batch", str(requests), "--key", f"campaign-{uuid.uuid4().hex[:6]}", "--json"]
        for user in [*known, unknown]:
            args += ["--user", user]
        kill_points = []
        for _ in range(kills):
            proc = subprocess.Popen(
                [ACCESSCTL, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            # Kill at a random share of the remaining work (0 = during fan-out).
            target = count_outcomes(url) + rng.randint(0, max(1, requests // kills))
            deadline = time.monotonic() + 120
            while count_outcomes(url) < min(target, requests) and time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                time.sleep(rng.uniform(0.01, 0.2))
            proc.kill()
            proc.wait()
            kill_points.append(count_outcomes(url))
        final = accessctl(env, *args)
        summary = json.loads(final.stdout) if final.stdout.strip() else {}
        result = tally(url, requests)
        result.update(
            {
                "kills": kills,
                "kill_points": kill_points,
                "final_exit": final.returncode,
                "summary_matches": summary.get("recorded", -1) + summary.get("failed", -1)
                == requests,
            }
        )
        return result
    finally:
        drop_database(dbname)


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
    with tempfile.TemporaryDirectory() as tmp:
        for number in range(1, options.rounds + 1):
            started = time.monotonic()
            result = run_round(
                options.backend, options.requests, options.kills, options.rate, rng, Path(tmp)
            )
            result["round"] = number
            result["seconds"] = round(time.monotonic() - started, 1)
            results.append(result)
            print(json.dumps(result), flush=True)
    totals = {
        "backend": options.backend,
        "rounds": len(results),
        "kills": sum(r["kills"] for r in results),
        "requests": sum(r["requests"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "duplicated": sum(r["duplicated"] for r in results),
        "unfinished_workflows": sum(r["unfinished_workflows"] for r in results),
        "requests_started_more_than_once": sum(
            r["requests_started_more_than_once"] for r in results
        ),
    }
    print(json.dumps({"totals": totals}), flush=True)
    sys.exit(0 if totals["lost"] == totals["duplicated"] == totals["unfinished_workflows"] == 0 else 1)


if __name__ == "__main__":
    main()
