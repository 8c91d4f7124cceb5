"""``accessctl serve`` against the CLI, in one run.

* ``POST /submit`` of one ID and ``GET /errors?limit=50`` (first page, and a page 20 cursors
  deep) over N error rows (1,000,000 by default): requests per second and latency
  percentiles, from client threads on this machine (so client and server share its cores);
* beside them, ``accessctl submit ID --detach`` and ``accessctl errors --limit 50 --json``,
  wall time per call, in rounds interleaved with the HTTP load so both meet the same load.

The server runs ``--no-execute`` (a pure API front): an executing server would also work
off the batches the benchmark files, and that work would be measured as HTTP cost.

    uv run python bench/bench_serve.py [--backend postgres|sqlite|both] [--rows N]
        [--requests N] [--clients C] [--cli-runs R]

Writes section ``serve`` of bench/results.json and regenerates BENCHMARKS.md's tables.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import tables
from bench_startup import fill_errors
from common import (
    ACCESSCTL,
    BENCH,
    SEED_USERS,
    backend,
    backends,
    load_json,
    log,
    run_cli,
    save_json,
    spawn,
)


@dataclass
class Figures:
    """Latencies and wall time of HTTP requests, over one or more rounds."""

    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)

    def load(self, url: str, method: str, path: str, total: int, clients: int, **kw: Any) -> None:
        """``total`` requests from ``clients`` threads, each on its own keep-alive connection."""
        lock = threading.Lock()

        def client(count: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                for _ in range(count):
                    t0 = time.perf_counter()
                    status = http.request(method, path, **kw).status_code
                    with lock:
                        self.latencies.append(time.perf_counter() - t0)
                        self.statuses[status] = self.statuses.get(status, 0) + 1

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(
                pool.map(client, [total // clients + (i < total % clients) for i in range(clients)])
            )
        self.wall += time.perf_counter() - started

    def summary(self, clients: int) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def ms(q: int) -> float:  # nearest rank
            return round(ordered[round(q / 100 * (len(ordered) - 1))] * 1000, 1)

        return {
            "requests": len(ordered),
            "clients": clients,
            "rps": round(len(ordered) / self.wall, 1),
            "p50_ms": ms(50),
            "p95_ms": ms(95),
            "p99_ms": ms(99),
            "statuses": self.statuses,
        }


def bench(kind: str, rows: int, requests: int, clients: int, cli_runs: int) -> dict[str, Any]:
    with backend(kind, f"serve{kind[:2]}") as b:
        log(f"{kind}: filling {rows:,} error rows")
        fill_s = fill_errors(b, rows)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        server = spawn(
            [ACCESSCTL, "serve", "--port", str(port), "--no-execute"], b.env, f"serve-{kind}"
        )
        try:
            while not _healthy(url):
                if server.poll() is not None or time.monotonic() > server.started + 120:
                    raise RuntimeError(f"server did not come up (exit {server.poll()})")
                time.sleep(0.05)
            body = {"user_ids": [SEED_USERS[1]]}
            env = {**b.env, "COLUMNS": "200"}
            Figures().load(url, "POST", "/submit", 20, 2, json=body)  # warm-up
            Figures().load(url, "GET", "/errors?limit=50", 20, 2)
            cursor = None
            with httpx.Client(base_url=url) as http:
                for _ in range(20):
                    params = {"limit": "50", **({"cursor": cursor} if cursor else {})}
                    cursor = http.get("/errors", params=params).json()["next_cursor"]
            submit, errors, deep = Figures(), Figures(), Figures()
            cli: dict[str, list[float]] = {"submit_detach": [], "errors": []}

            def cli_call(what: str, args: list[str]) -> None:
                t0 = time.perf_counter()
                run_cli(env, args, f"serve-{kind}-cli")
                cli[what].append(time.perf_counter() - t0)

            per_round = requests // cli_runs
            for round_ in range(cli_runs):
                log(f"{kind}: round {round_ + 1}/{cli_runs}")
                submit.load(url, "POST", "/submit", per_round, clients, json=body)
                cli_call("submit_detach", ["submit", SEED_USERS[1], "--detach"])
                errors.load(url, "GET", "/errors?limit=50", per_round, clients)
                cli_call("errors", ["errors", "--limit", "50", "--json"])
                deep.load(url, "GET", f"/errors?limit=50&cursor={cursor}", per_round, clients)
        finally:
            stopped = server.kill(signal.SIGTERM)
    return {
        "backend": kind,
        "rows": rows,
        "fill_s": fill_s,
        "server_exit": stopped.returncode,
        "server": "accessctl serve --no-execute",
        "http": {
            "submit": submit.summary(clients),
            "errors": errors.summary(clients),
            "errors_page_21": deep.summary(clients),
        },
        "cli": {
            k: {
                "runs": len(v),
                "median_s": round(statistics.median(v), 3),
                "min_s": round(min(v), 3),
            }
            for k, v in cli.items()
        },
    }


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["postgres", "sqlite", "both"], default="both")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cli-runs", type=int, default=5, help="interleaved rounds")
    args = parser.parse_args()
    kinds = [k for k in backends() if args.backend in ("both", k)]
    results = [bench(k, args.rows, args.requests, args.clients, args.cli_runs) for k in kinds]
    stored = load_json(BENCH / "results.json")
    stored.setdefault("sections", {})["serve"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": os.getloadavg()[0],
        "results": results,
    }
    save_json(BENCH / "results.json", stored)
    tables.write(stored)
    print(tables.serve(stored))


if __name__ == "__main__":
    main()
