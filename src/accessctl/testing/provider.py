"""A small fake access provider: approves, rejects, refuses, or fails on a schedule.

Run it to try accessctl against something real::

    python -m accessctl.testing.provider --port 8099 --fail 429x2 --retry-after 1
    ACCESSCTL_PROVIDER_URL=http://127.0.0.1:8099/access accessctl batch 20

Every call is logged as one JSON line (arrival time, idempotency key, user, answer) on
stdout or to ``--log``. Tests use ``FakeProvider`` in-process and read ``calls``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO


@dataclass
class Call:
    arrived: float  # time.time() at arrival
    key: str | None
    user_id: str | None
    batch_id: str | None
    authorization: bool  # whether a bearer token came; the token itself is never kept
    answered: int
    finished: float = 0.0  # time.time() when the answer was sent (after any ``delay``)


class _Server(ThreadingHTTPServer):
    # socketserver's listen backlog is 5: a window's worth of calls arriving at once on a
    # busy machine overflowed it, and the dropped connections came back a second later
    # (TCP's SYN retransmit), which looked like calls over the limit. Real servers
    # accept far more; so does this one.
    request_queue_size = 128
    daemon_threads = True


@dataclass
class FakeProvider:
    """``fail``: list of (HTTP status, how many first calls per idempotency key get it)."""

    host: str = "127.0.0.1"
    port: int = 0
    fail: list[tuple[int, int]] = field(default_factory=list)
    retry_after: float | None = None
    refuse_users: set[str] = field(default_factory=set)  # answered 400
    reject_users: set[str] = field(default_factory=set)  # answered 200 {"status": "rejected"}
    status_field: bool = True
    expected_token: str | None = None
    delay: float = 0.0  # seconds every call is held before it is answered: a slow provider
    log: TextIO | None = None
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                provider._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Server((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/access"

    def start(self) -> FakeProvider:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answer(
        self, key: str | None, user_id: str | None, token_ok: bool
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        if not token_ok:
            return 401, {"error": "bad token"}, {}
        with self._lock:
            seen = self._seen.get(key or "", 0)
            self._seen[key or ""] = seen + 1
        threshold = 0
        for status, count in self.fail:
            threshold += count
            if seen < threshold:
                headers = (
                    {"Retry-After": f"{self.retry_after:g}"} if self.retry_after is not None else {}
                )
                return status, {"error": f"scheduled failure {status}"}, headers
        if user_id in self.refuse_users:
            return 400, {"error": f"user {user_id} may not have access"}, {}
        if not self.status_field:
            return 202, {}, {}
        if user_id in self.reject_users:
            return 200, {"status": "rejected"}, {}
        return 200, {"status": "approved"}, {}

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        arrived = time.time()
        length = int(request.headers.get("Content-Length") or 0)
        try:
            body = json.loads(request.rfile.read(length) or b"{}")
        except ValueError:
            body = {}
        key = request.headers.get("Idempotency-Key")
        auth = request.headers.get("Authorization")
        token_ok = self.expected_token is None or auth == f"Bearer {self.expected_token}"
        status, payload, headers = self._answer(key, body.get("user_id"), token_ok)
        if self.delay > 0:
            time.sleep(self.delay)
        call = Call(
            arrived,
            key,
            body.get("user_id"),
            body.get("batch_id"),
            auth is not None,
            status,
            time.time(),
        )
        with self._lock:
            self.calls.append(call)
            if self.log is not None:
                self.log.write(json.dumps(call.__dict__) + "\n")
                self.log.flush()
        data = json.dumps(payload).encode()
        request.send_response(status)
        for name, value in headers.items():
            request.send_header(name, value)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)


def parse_fail(spec: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d{3})x(\d+)", spec.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected STATUSxCOUNT, e.g. 429x2")
    return int(match.group(1)), int(match.group(2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake access provider for accessctl.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument(
        "--fail",
        type=parse_fail,
        action="append",
        default=[],
        help="STATUSxCOUNT: the first COUNT calls per key get STATUS (repeatable)",
    )
    parser.add_argument("--retry-after", type=float, default=None)
    parser.add_argument("--refuse", action="append", default=[], help="user ID answered 400")
    parser.add_argument("--reject", action="append", default=[], help="user ID answered rejected")
    parser.add_argument("--token", default=None, help="require this bearer token")
    parser.add_argument("--delay", type=float, default=0.0, help="hold every call this many s")
    parser.add_argument("--log", default=None, help="append call lines here (default stdout)")
    options = parser.parse_args(argv)
    log = open(options.log, "a", encoding="utf-8") if options.log else sys.stdout  # noqa: SIM115
    provider = FakeProvider(
        host=options.host,
        port=options.port,
        fail=options.fail,
        retry_after=options.retry_after,
        refuse_users=set(options.refuse),
        reject_users=set(options.reject),
        expected_token=options.token,
        delay=options.delay,
        log=log,
    )
    print(f"fake provider listening on {provider.url}", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        provider._server.serve_forever()


if __name__ == "__main__":
    main()
