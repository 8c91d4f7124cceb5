"""``accessctl serve`` against the CLI, in one run.

* ``POST /submit`` of one ID: requests per second and latency percentiles, from a pool of
  client threads on this machine (so client and server share its 2 cores);
* ``GET /errors?limit=50`` over a table of N error rows (1,000,000 by default; filled with
  one bulk INSERT as bench_startup.py does), first page and a page 20 cursors deep;
* beside them, the CLI doing the same: ``accessctl errors --limit 50`` and
  ``accessctl submit ID --detach`` wall time per invocation.

    uv run python bench/bench_serve.py [--backend postgres|sqlite|both] [--rows N]
        [--requests N] [--clients C]

Prints a Markdown table and writes bench/serve_results.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from bench_startup import _fill_postgres, _fill_sqlite
from common import ACCESSCTL, BENCH, SEED_USERS, backend, log, postgres_available, stderr_path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def load(url: str, method: str, path: str, total: int, clients: int, **kw: Any) -> dict[str, Any]:
    """``total`` requests from ``clients`` threads, each on its own keep-alive connection."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    per_client = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]

    def run(count: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(count):
                t0 = time.perf_counter()
                answer = client.request(method, path, **kw)
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies.append(elapsed)
                    statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, per_client))
    wall = time.perf_counter() - started
    return {
        "requests": total,
        "clients": clients,
        "rps": round(total / wall, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p95_ms": round(percentile(latencies, 95) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "statuses": statuses,
    }


def cli_wall(env: dict[str, str], args: list[str], runs: int) -> dict[str, Any]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([ACCESSCTL, *args], env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return {
        "runs": runs,
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
    }


def bench(kind: str, rows: int, requests: int, clients: int, cli_runs: int) -> dict[str, Any]:
    with backend(kind, f"serve{kind[:2]}") as b:
        log(f"{kind}: filling {rows:,} error rows")
        t0 = time.monotonic()
        (_fill_postgres if kind == "postgres" else _fill_sqlite)(b, rows)
        fill_s = time.monotonic() - t0
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(stderr_path(f"serve-{kind}"), "wb") as err:
            server = subprocess.Popen(
                [ACCESSCTL, "serve", "--port", str(port)],
                env=b.env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not come up (exit {server.poll()})")
                time.sleep(0.05)
            body = {"user_ids": [SEED_USERS[1]]}
            load(url, "POST", "/submit", 20, 2, json=body)  # warm-up
            log(f"{kind}: POST /submit x{requests}")
            submit = load(url, "POST", "/submit", requests, clients, json=body)
            load(url, "GET", "/errors?limit=50", 20, 2)
            log(f"{kind}: GET /errors x{requests}")
            errors = load(url, "GET", "/errors?limit=50", requests, clients)
            cursor = None
            with httpx.Client(base_url=url) as client:
                for _ in range(20):
                    params = {"limit": "50", **({"cursor": cursor} if cursor else {})}
                    cursor = client.get("/errors", params=params).json()["next_cursor"]
            deep = load(url, "GET", f"/errors?limit=50&cursor={cursor}", requests, clients)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
        log(f"{kind}: CLI figures")
        env = {**b.env, "COLUMNS": "200"}
        cli_errors = cli_wall(env, ["errors", "--limit", "50", "--json"], cli_runs)
        cli_submit = cli_wall(env, ["submit", SEED_USERS[1], "--detach"], cli_runs)
    return {
        "backend": kind,
        "rows": rows,
        "fill_s": round(fill_s, 1),
        "server_exit": server.returncode,
        "http": {"submit": submit, "errors": errors, "errors_page_21": deep},
        "cli": {"errors": cli_errors, "submit_detach": cli_submit},
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| backend | what | HTTP req/s | p50 / p95 / p99 ms | CLI per call (median) | "
        "HTTP p50 vs CLI | HTTP req/s vs CLI calls/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        pairs = [
            (
                "POST /submit (1 ID)",
                r["http"]["submit"],
                r["cli"]["submit_detach"],
                "`submit ID --detach`",
            ),
            (
                f"GET /errors?limit=50 ({r['rows']:,} rows)",
                r["http"]["errors"],
                r["cli"]["errors"],
                "`errors --limit 50 --json`",
            ),
            (
                "GET /errors page 21 (cursor)",
                r["http"]["errors_page_21"],
                r["cli"]["errors"],
                "`errors --limit 50 --json`",
            ),
        ]
        for label, http, cli, cli_label in pairs:
            cli_s = cli["median_s"]
            lines.append(
                f"| {r['backend']} | {label} | {http['rps']} | "
                f"{http['p50_ms']} / {http['p95_ms']} / {http['p99_ms']} | "
                f"{cli_s * 1000:.0f} ms ({cli_label}) | "
                f"{cli_s * 1000 / http['p50_ms']:.0f}x faster | "
                f"{http['rps'] * cli_s:.0f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["postgres", "sqlite", "both"], default="both")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cli-runs", type=int, default=5)
    args = parser.parse_args()
    kinds = ["postgres", "sqlite"] if args.backend == "both" else [args.backend]
    if "postgres" in kinds and not postgres_available():
        log("no Postgres: skipping it")
        kinds.remove("postgres")
    results = [bench(k, args.rows, args.requests, args.clients, args.cli_runs) for k in kinds]
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": os.getloadavg()[0],
        "results": results,
    }
    Path(BENCH / "serve_results.json").write_text(json.dumps(out, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
