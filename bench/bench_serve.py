"""``accessctl serve`` against the CLI, in one run.

* ``POST /submit`` of one ID: requests per second and latency percentiles, from a pool of
  client threads on this machine (so client and server share its 2 cores);
* ``GET /errors?limit=50`` over a table of N error rows (1,000,000 by default; filled with
  one bulk INSERT as bench_startup.py does), first page and a page 20 cursors deep;
* beside them, the CLI doing the same: ``accessctl errors --limit 50`` and
  ``accessctl submit ID --detach`` wall time per invocation, in rounds interleaved with the
  HTTP load so both meet the same machine load.

The server runs ``--no-execute`` (a pure API front): an executing server would also be
working off the batches the benchmark files, and that work would be measured as HTTP cost.

    uv run python bench/bench_serve.py [--backend postgres|sqlite|both] [--rows N]
        [--requests N] [--clients C]

Writes its figures into bench/results.json (section ``serve``) and regenerates BENCHMARKS.md's
tables (bench/tables.py; the section's prose is edited by hand) (formerly report.py kept that
section when it re-renders the rest), and prints the table.
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
from dataclasses import dataclass, field
from typing import Any

import httpx
import tables
from bench_startup import _fill_postgres, _fill_sqlite
from common import (
    ACCESSCTL,
    BENCH,
    SEED_USERS,
    backend,
    log,
    postgres_available,
    save_json,
    stderr_path,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Figures:
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)

    def summary(self, clients: int) -> dict[str, Any]:
        lat = self.latencies
        return {
            "requests": len(lat),
            "clients": clients,
            "rps": round(len(lat) / self.wall, 1),
            "p50_ms": round(percentile(lat, 50) * 1000, 1),
            "p95_ms": round(percentile(lat, 95) * 1000, 1),
            "p99_ms": round(percentile(lat, 99) * 1000, 1),
            "statuses": self.statuses,
        }


def load(
    url: str, method: str, path: str, total: int, clients: int, into: Figures, **kw: Any
) -> None:
    """``total`` requests from ``clients`` threads, each on its own keep-alive connection."""
    lock = threading.Lock()
    per_client = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]

    def run(count: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(count):
                t0 = time.perf_counter()
                answer = client.request(method, path, **kw)
                elapsed = time.perf_counter() - t0
                with lock:
                    into.latencies.append(elapsed)
                    into.statuses[answer.status_code] = into.statuses.get(answer.status_code, 0) + 1

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, per_client))
    into.wall += time.perf_counter() - started


def cli_once(env: dict[str, str], args: list[str], into: list[float]) -> None:
    t0 = time.perf_counter()
    subprocess.run([ACCESSCTL, *args], env=env, capture_output=True, check=True)
    into.append(time.perf_counter() - t0)


def cli_summary(times: list[float]) -> dict[str, Any]:
    return {
        "runs": len(times),
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
                [ACCESSCTL, "serve", "--port", str(port), "--no-execute"],
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
            env = {**b.env, "COLUMNS": "200"}
            scratch = Figures()
            load(url, "POST", "/submit", 20, 2, scratch, json=body)  # warm-up
            load(url, "GET", "/errors?limit=50", 20, 2, scratch)
            cursor = None
            with httpx.Client(base_url=url) as client:
                for _ in range(20):
                    params = {"limit": "50", **({"cursor": cursor} if cursor else {})}
                    cursor = client.get("/errors", params=params).json()["next_cursor"]
            submit, errors, deep = Figures(), Figures(), Figures()
            cli_submit: list[float] = []
            cli_errors: list[float] = []
            # Interleaved rounds: both sides meet the same load on this shared machine.
            for round_ in range(cli_runs):
                log(f"{kind}: round {round_ + 1}/{cli_runs}")
                per_round = requests // cli_runs
                load(url, "POST", "/submit", per_round, clients, submit, json=body)
                cli_once(env, ["submit", SEED_USERS[1], "--detach"], cli_submit)
                load(url, "GET", "/errors?limit=50", per_round, clients, errors)
                cli_once(env, ["errors", "--limit", "50", "--json"], cli_errors)
                load(url, "GET", f"/errors?limit=50&cursor={cursor}", per_round, clients, deep)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    return {
        "backend": kind,
        "rows": rows,
        "fill_s": round(fill_s, 1),
        "server_exit": server.returncode,
        "server": "accessctl serve --no-execute",
        "http": {
            "submit": submit.summary(clients),
            "errors": errors.summary(clients),
            "errors_page_21": deep.summary(clients),
        },
        "cli": {"errors": cli_summary(cli_errors), "submit_detach": cli_summary(cli_submit)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["postgres", "sqlite", "both"], default="both")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cli-runs", type=int, default=5, help="interleaved rounds")
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
    # Kept beside the other sections' figures; BENCHMARKS.md's table is regenerated from
    # them (bench/tables.py), its prose is edited by hand.
    path = BENCH / "results.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored.setdefault("sections", {})["serve"] = out
    save_json(path, stored)
    tables.main([])
    print(tables.serve(stored))


if __name__ == "__main__":
    main()
