"""Two releases side by side, interleaved in one run: limiter, filing 100,000, throughput.

    git worktree add /work/wt-base e721c24 && (cd /work/wt-base && uv sync)
    uv run python bench/compare_releases.py [limiter] [filing] [throughput]

Each tree's own installed ``accessctl`` runs on fresh databases (TREES below names the two
checkouts). The figures go by hand into results.json's ``release_compare`` section, which
bench/tables.py renders in BENCHMARKS.md.
"""

from __future__ import annotations

import bisect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
from crash_campaign import drop_database, fresh_database

TREES = {"0.2.0": "/work/wt-base", "new": str(Path(__file__).resolve().parents[1])}
SEED = [f"00000000-0000-0000-0000-00000000000{i}" for i in range(4)]


def fresh(kind: str) -> tuple[str, str | None]:
    return fresh_database(kind, Path(tempfile.mkdtemp()))


def run(
    tree: str, env: dict[str, str], *args: str, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    exe = f"{TREES[tree]}/.venv/bin/accessctl"
    full = {**os.environ, "ACCESSCTL_LOG_FORMAT": "json", **env}
    return subprocess.run([exe, *args], env=full, capture_output=True, text=True, timeout=timeout)


def setup(tree: str, kind: str, limit: str) -> tuple[dict[str, str], str | None]:
    url, name = fresh(kind)
    env = {"ACCESSCTL_DATABASE_URL": url, "ACCESSCTL_RATE_LIMIT": limit}
    assert run(tree, env, "migrate").returncode == 0
    if tree == "new":
        r = run(tree, env, "limit", "set", limit)
        assert r.returncode == 0, r.stderr
    for i, u in enumerate(SEED):
        run(tree, env, "users", "add", "--id", u, "--name", f"u{i}", "--email", f"u{i}@x.test")
    return env, name


def rows(url: str, sql: str) -> list[tuple]:
    e = sa.create_engine(url)
    with e.connect() as c:
        out = [tuple(r) for r in c.execute(sa.text(sql))]
    e.dispose()
    return out


def limiter(tree: str, kind: str, limit: int, period: float) -> dict:
    env, name = setup(tree, kind, f"{limit}/{period:g}")
    try:
        n = 3 * limit
        r = run(tree, env, "batch", str(n), "--json")
        assert r.returncode == 0, r.stderr[-500:]
        table = "workflow_status" if kind == "sqlite" else "dbos.workflow_status"
        starts = sorted(
            int(x[0])
            for x in rows(
                env["ACCESSCTL_DATABASE_URL"],
                f"SELECT started_at_epoch_ms FROM {table} WHERE queue_name='access-requests' AND started_at_epoch_ms IS NOT NULL",
            )
        )
        w = int(period * 1000)
        most = max(bisect.bisect_left(starts, s + w) - i for i, s in enumerate(starts))
        span = (starts[-1] - starts[0]) / 1000
        bound = (n / limit - 1) * period
        return {
            "max_in_window": most,
            "limit": limit,
            "over_bound_pct": round((span / bound - 1) * 100, 2),
        }
    finally:
        drop_database(name)


def filing(tree: str, kind: str, n: int) -> dict:
    env, name = setup(tree, kind, "50/30")
    try:
        t0 = time.monotonic()
        r = run(tree, env, "batch", str(n), "--detach")
        assert r.returncode == 0, r.stderr[-500:]
        return {"filing_s": round(time.monotonic() - t0, 2)}
    finally:
        drop_database(name)


def throughput(tree: str, kind: str, n: int) -> dict:
    env, name = setup(tree, kind, "none")
    try:
        assert run(tree, env, "batch", str(n), "--detach").returncode == 0
        t0 = time.monotonic()
        r = run(tree, env, "worker", "--burst", timeout=1800)
        wall = time.monotonic() - t0
        assert r.returncode == 0, r.stderr[-500:]
        got = rows(env["ACCESSCTL_DATABASE_URL"], "SELECT count(*) FROM accesses")[0][0]
        assert got == n, got
        return {"req_per_s": round(n / wall, 1)}
    finally:
        drop_database(name)


def main() -> None:
    which = sys.argv[1:] or ["limiter", "filing", "throughput"]
    out: dict = {}
    for rnd in range(2):
        for tree in TREES:
            for kind in ("postgres", "sqlite"):
                key = f"{tree}/{kind}"
                res = out.setdefault(key, {})
                if "limiter" in which:
                    res.setdefault("limiter_10x2", []).append(limiter(tree, kind, 10, 2))
                if "filing" in which and rnd == 0:
                    res.setdefault("filing_100k", []).append(filing(tree, kind, 100_000))
                if "throughput" in which:
                    res.setdefault("throughput_2000", []).append(throughput(tree, kind, 2000))
                print(key, json.dumps(res), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
