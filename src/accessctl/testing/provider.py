"""A small fake access provider: approves, rejects, refuses, or fails on a schedule, or
misbehaves on purpose (``hostile``, see ``HOSTILE_MODES``).

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
import socket
import struct
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

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A hostile answer ends when the client hangs up on it: expected, not news.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


# What ``FakeProvider.hostile`` can do (STATUS is any three digits):
#   echo-STATUS     answer STATUS with a body quoting the request line and every header
#                   (Authorization included), as text and as JSON
#   gzip-STATUS     answer STATUS with ``Content-Encoding: gzip`` and a body that is not gzip
#   status-STATUS   answer STATUS with a short body (and a Location for a 3xx)
#   cut-STATUS      send STATUS and half the promised body, then close the connection
#   huge-STATUS     answer STATUS with a 32 MiB body (an echo, repeated)
#   endless-STATUS  answer STATUS with a chunked body that never ends
#   slam            close the connection without answering
HOSTILE_MODES = ("echo", "gzip", "status", "cut", "huge", "endless", "slam")
HUGE_BODY = 32 * 1024 * 1024


def parse_hostile(spec: str) -> tuple[str, int]:
    match = re.fullmatch(r"(slam)|(echo|gzip|status|cut|huge|endless)-(\d{3})", spec.strip())
    if not match:
        raise ValueError(f"{spec!r}: expected slam or MODE-STATUS, MODE one of {HOSTILE_MODES}")
    if match.group(1):
        return "slam", 0
    return match.group(2), int(match.group(3))


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
    # Misbehave (see HOSTILE_MODES) on the first ``hostile_calls`` calls per key (every
    # call if None), then answer as configured above.
    hostile: str | None = None
    hostile_calls: int | None = None
    # Sent verbatim as the Retry-After of every 429/5xx (overrides ``retry_after``).
    retry_after_raw: str | None = None
    # If set, ``fail`` applies only to these users' calls (the others answer at once).
    flaky_users: set[str] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._hostile_seen: dict[str, int] = {}
        if self.hostile is not None:
            parse_hostile(self.hostile)  # fail at construction, not at the first call
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
        if self.flaky_users is not None and user_id not in self.flaky_users:
            return self._final_answer(user_id)
        with self._lock:
            seen = self._seen.get(key or "", 0)
            self._seen[key or ""] = seen + 1
        threshold = 0
        for status, count in self.fail:
            threshold += count
            if seen < threshold:
                return status, {"error": f"scheduled failure {status}"}, self._retry_headers()
        return self._final_answer(user_id)

    def _final_answer(self, user_id: str | None) -> tuple[int, dict[str, Any], dict[str, str]]:
        if user_id in self.refuse_users:
            return 400, {"error": f"user {user_id} may not have access"}, {}
        if not self.status_field:
            return 202, {}, {}
        if user_id in self.reject_users:
            return 200, {"status": "rejected"}, {}
        return 200, {"status": "approved"}, {}

    def _retry_headers(self) -> dict[str, str]:
        if self.retry_after_raw is not None:
            return {"Retry-After": self.retry_after_raw}
        return {"Retry-After": f"{self.retry_after:g}"} if self.retry_after is not None else {}

    def _is_hostile(self, key: str | None) -> bool:
        if self.hostile is None:
            return False
        with self._lock:
            seen = self._hostile_seen.get(key or "", 0)
            self._hostile_seen[key or ""] = seen + 1
        return self.hostile_calls is None or seen < self.hostile_calls

    def _misbehave(self, request: BaseHTTPRequestHandler) -> None:
        """Answer the way ``hostile`` says."""
        assert self.hostile is not None
        mode, status = parse_hostile(self.hostile)
        request.close_connection = True
        if mode == "slam":
            # Reset rather than close: the client sees the connection die, not an answer.
            request.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            return
        echo = self._echo(request)
        extra = self._retry_headers() if status == 429 or status >= 500 else {}
        if mode == "status" and 300 <= status < 400:
            extra["Location"] = f"http://{self.host}:{self.port}/moved?api_key=moved-secret"
        if mode == "gzip":
            extra["Content-Encoding"] = "gzip"
        data = {
            "echo": echo,
            "gzip": b"this is not gzip: " + echo,
            "status": b'{"error": "as you wish"}',
            "cut": echo,
        }.get(mode, echo)
        request.send_response(status)
        for name, value in extra.items():
            request.send_header(name, value)
        if mode == "endless":
            request.send_header("Transfer-Encoding", "chunked")
        else:
            length = HUGE_BODY if mode == "huge" else len(data) * (2 if mode == "cut" else 1)
            request.send_header("Content-Length", str(length))
        request.end_headers()
        if mode in ("echo", "gzip", "status", "cut"):
            request.wfile.write(data)  # for "cut": half of what was promised, then close
        elif mode == "huge":
            for _ in range(HUGE_BODY // len(data)):  # ends early when the client hangs up
                request.wfile.write(data)
        else:
            chunk = f"{len(data):x}\r\n".encode() + data + b"\r\n"
            while True:  # until the client hangs up (the write raises)
                request.wfile.write(chunk)
        request.wfile.flush()

    @staticmethod
    def _echo(request: BaseHTTPRequestHandler) -> bytes:
        """What a careless provider's error page shows: the request, headers and all."""
        headers = dict(request.headers.items())
        text = f"{request.requestline}\r\n{request.headers}\r\n{json.dumps({'headers': headers})}"
        return text.encode("utf-8", errors="replace")

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
        if self._is_hostile(key):
            assert self.hostile is not None
            # Recorded first: an endless answer only ends when the client hangs up.
            call = Call(
                arrived,
                key,
                body.get("user_id"),
                body.get("batch_id"),
                auth is not None,
                parse_hostile(self.hostile)[1],
            )
            with self._lock:
                self.calls.append(call)
            self._misbehave(request)
            return
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
    parser.add_argument("--retry-after-raw", default=None, help="Retry-After sent verbatim")
    parser.add_argument("--hostile", default=None, help="misbehave: slam or MODE-STATUS")
    parser.add_argument("--hostile-calls", type=int, default=None, help="per key (default all)")
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
        hostile=options.hostile,
        hostile_calls=options.hostile_calls,
        retry_after_raw=options.retry_after_raw,
    )
    print(f"fake provider listening on {provider.url}", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        provider._server.serve_forever()


if __name__ == "__main__":
    main()
