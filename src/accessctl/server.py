"""``accessctl serve``: the seed's HTTP API on the same durable workflows, queue and limit.

One FastAPI app, served by uvicorn in this process:

* **Lifespan.** Startup enters the same runtime as ``accessctl worker``
  (``runtime.executing_runtime``: schema check, executor lease, the shared limit checked,
  DBOS launched, dead executors' work adopted), so the server executes queued requests
  too. With ``--no-execute`` it is a pure API front: no DBOS launch, only a DBOS client on
  the database, as ``--detach`` files. A refused start (limit given on purpose that
  differs from the stored one, schema not at head, database unreachable) ends the process
  with the CLI's exit code and one line, before the socket accepts anything. The lifespan
  is handled by a small ASGI wrapper rather than FastAPI's ``lifespan=`` so that a refused
  start is reported as that one line, not as the traceback Starlette hands uvicorn to log.
* **Filing** is detached-style: the batch is written durably in one transaction
  (``filing.file_batch``, as ``submit --detach``) and answered ``202`` with a ``Location``;
  the server's own runtime and any worker execute it. ``Idempotency-Key`` is the CLI's
  ``--key``: the same key and body attach (``200``, same batch), another body is ``409``.
* **Auth.** Loopback needs none. On any other address the server refuses to start without
  a bearer token (``ACCESSCTL_SERVE_TOKEN`` or ``ACCESSCTL_SERVE_TOKEN_FILE``), compared in
  constant time. The health probes stay open, so an orchestrator needs no secret.
* **Shutdown.** SIGTERM/SIGINT: stop accepting, let in-flight HTTP requests finish, then
  drain in-flight queued work with the configured grace as a worker does, and exit 143/130.
  A second signal exits at once (the work is durable).

Heavy imports (FastAPI, uvicorn, DBOS) happen here, never in ``accessctl --help``.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import ipaddress
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import structlog
import uvicorn
from fastapi import Body, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from accessctl import __version__
from accessctl.api_models import (
    ApiErrorBody,
    BatchBody,
    BatchReport,
    ErrorPage,
    FiledBatch,
    Health,
    SubmitBody,
    decode_cursor,
    encode_cursor,
)
from accessctl.exceptions import (
    AccessctlError,
    ConfigError,
    DatabaseUnreachable,
    ExitCode,
    Interrupted,
    SchemaNotMigrated,
    UsageError,
)
from accessctl.settings import Settings

if TYPE_CHECKING:
    import sqlalchemy as sa
    from dbos import DBOSClient

log = structlog.get_logger("accessctl.server")
access_log = structlog.get_logger("accessctl.access")

MAX_BODY_BYTES = 1 << 20  # 1 MiB: ~25,000 user IDs, far beyond any one HTTP filing
MAX_PAGE = 1000  # rows per page of /errors and /batches
# Endpoints run in anyio's thread pool; at most this many at once (the rest wait their turn
# in the event loop), and the API's connection pool holds as many (half kept open).
API_THREADS = 20
MAX_TOKEN_BYTES = 4096
MIN_TOKEN_CHARS = 16
# RFC 6750's b64token: what may follow "Bearer " in a header, so any such token can be sent.
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# Probes answer without a token: they tell nothing but "up" and "ready".
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
OPEN: dict[str, Any] = {"security": []}  # their OpenAPI entry: no bearer needed
TOKEN_ENV = "ACCESSCTL_SERVE_TOKEN"
TOKEN_FILE_ENV = "ACCESSCTL_SERVE_TOKEN_FILE"


# --- configuration ----------------------------------------------------------------------------


def resolve_token(env: Mapping[str, str]) -> str | None:
    """The bearer token from the environment or its file (read bounded), or None."""
    value = env.get(TOKEN_ENV) or None
    path = env.get(TOKEN_FILE_ENV) or None
    if value is not None and path is not None:
        raise ConfigError(f"set {TOKEN_ENV} or {TOKEN_FILE_ENV}, not both")
    origin = TOKEN_ENV
    if path is not None:
        origin = f"{TOKEN_FILE_ENV} {path}"
        try:
            with open(path, "rb") as handle:
                raw = handle.read(MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"{origin}: cannot read ({exc.strerror})") from None
        except ValueError:  # a NUL in the path
            raise ConfigError(f"{TOKEN_FILE_ENV}: not a valid path") from None
        if len(raw) > MAX_TOKEN_BYTES:
            raise ConfigError(f"{origin}: longer than {MAX_TOKEN_BYTES} bytes")
        try:
            value = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ConfigError(f"{origin}: not UTF-8 text") from None
    if value is None:
        return None
    # Never echo the value: only what is wrong with it.
    if len(value) > MAX_TOKEN_BYTES:
        raise ConfigError(f"{origin}: longer than {MAX_TOKEN_BYTES} characters")
    if not _TOKEN_SHAPE.fullmatch(value):
        raise ConfigError(
            f"{origin}: a bearer token is letters, digits and -._~+/ only (e.g. from "
            "`openssl rand -hex 32`)"
        )
    if len(value) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{origin}: a bearer token needs at least {MIN_TOKEN_CHARS} characters")
    return value


def listen_address(host: str, port: int) -> tuple[socket.AddressFamily, Any]:
    """The (family, sockaddr) ``host:port`` names; UsageError if it names none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, ValueError) as exc:  # ValueError: a NUL
        reason = exc.strerror if isinstance(exc, socket.gaierror) else "not a host name"
        raise UsageError(f"--host {host[:80]!r}: cannot resolve ({reason})") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def is_loopback(sockaddr: Any) -> bool:
    try:
        return ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def bind_socket(family: socket.AddressFamily, sockaddr: Any) -> socket.socket:
    """Bound, not yet listening: nothing is accepted until the runtime is up."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {sockaddr[0]}:{sockaddr[1]}: {exc.strerror}") from None
    return sock


# --- the runtime behind the app ---------------------------------------------------------------


@dataclass
class Backend:
    """What the endpoints use: settings that follow the shared limit, the engine, and the
    DBOS client that files batches (the runtime's own when executing)."""

    settings: Settings
    engine: sa.Engine
    client: DBOSClient
    executor_id: str | None


class ServerState:
    """The runtime the lifespan starts and stops, and why a start was refused."""

    def __init__(self, settings: Settings, *, execute: bool) -> None:
        self.settings = settings
        self.execute = execute
        self.backend: Backend | None = None
        self.startup_error: AccessctlError | None = None
        self._stack: contextlib.ExitStack | None = None

    def start(self) -> None:
        from accessctl.limits import following
        from accessctl.runtime import (
            executing_runtime,
            filing_client,
            open_engine,
            shared_limit_for,
        )
        from accessctl.schema import ensure_schema

        stack = contextlib.ExitStack()
        try:
            settings, executor_id = self.settings, None
            if self.execute:
                runtime = stack.enter_context(executing_runtime(self.settings))
                settings, executor_id = runtime.settings, runtime.executor_id
            # The API's own pool, sized to its request threads: HTTP load never takes a
            # connection that an executing request is waiting for.
            engine = open_engine(self.settings, pool_size=API_THREADS // 2)
            stack.callback(engine.dispose)
            client = filing_client(self.settings, engine)
            stack.callback(client.destroy)
            if not self.execute:
                ensure_schema(engine, auto_create=self.settings.is_sqlite)
                # The same rule as any run: a limit given on purpose must match the stored
                # one (the executing runtime checked it already).
                settings = following(self.settings, shared_limit_for(self.settings, client, engine))
            self.backend = Backend(settings, engine, client, executor_id)
        except BaseException:
            self.backend = None
            stack.close()
            raise
        self._stack = stack

    def stop(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            # Executing: drain_requests lets in-flight requests finish within the grace.
            stack.close()
        self.backend = None


def _operator_error(exc: BaseException, settings: Settings) -> AccessctlError:
    if isinstance(exc, AccessctlError):
        return exc
    from sqlalchemy.exc import DBAPIError

    from accessctl.db import describe_db_error, hide_password

    if isinstance(exc, DBAPIError):
        return DatabaseUnreachable(
            f"database {hide_password(settings.database_url)} failed: "
            f"{describe_db_error(exc, url=settings.database_url)}"
        )
    log.debug("internal error at startup", exc_info=exc)
    return ConfigError(f"internal error at startup: {type(exc).__name__} (rerun with -v)")


class RuntimeLifespan:
    """ASGI middleware that owns the lifespan protocol: startup enters the runtime (in a
    thread: DBOS refuses some calls on a thread running an event loop), shutdown leaves it
    once uvicorn has stopped accepting and finished the requests in flight."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        import anyio.to_thread

        await receive()  # lifespan.startup
        anyio.to_thread.current_default_thread_limiter().total_tokens = API_THREADS
        try:
            await anyio.to_thread.run_sync(self.state.start)
        except Exception as exc:
            self.state.startup_error = _operator_error(exc, self.state.settings)
            # No message: uvicorn would log it, and Starlette's is a traceback.
            await send({"type": "lifespan.startup.failed", "message": ""})
            return
        log.info(
            "server runtime up",
            executes=self.state.execute,
            executor=self.state.backend.executor_id if self.state.backend else None,
        )
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await anyio.to_thread.run_sync(self.state.stop)
        except Exception as exc:
            log.debug("runtime shutdown failed", exc_info=exc)
            log.warning("runtime shutdown did not finish cleanly", error=type(exc).__name__)
        await send({"type": "lifespan.shutdown.complete"})


# --- the HTTP guard: access log, catch-all, auth, body size -----------------------------------


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _error(status: int, message: str) -> dict[str, Any]:
    return {"error": message, "status": status}


class HttpGuard:
    """Every HTTP request, outermost first: one access-log line (method, path, status,
    duration; never a header), a catch-all that answers a bare 500 JSON (the traceback
    only at debug level), the bearer check, and the 1 MiB body bound."""

    def __init__(self, app: ASGIApp, token: str | None, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.token = token.encode() if token is not None else None
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_at = time.perf_counter()
        status = 500
        responded = False

        async def send_logged(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status = int(message["status"])
                responded = True
            await send(message)

        try:
            await self._guarded(scope, receive, send_logged)
        except Exception as exc:
            log.debug("internal error", exc_info=exc)
            log.error("internal error answered with 500", error_class=type(exc).__name__)
            if not responded:
                await _send_json(send_logged, 500, _error(500, "internal error"))
        finally:
            access_log.info(
                "request",
                method=scope.get("method"),
                path=str(scope.get("path", ""))[:200],
                status=status,
                duration_ms=round((time.perf_counter() - started_at) * 1000, 2),
            )

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = self.token is not None and scope.get("path") not in OPEN_PATHS
        if guarded and not self._authorized(scope):
            await _send_json(
                send,
                401,
                _error(401, "missing or wrong bearer token"),
                ((b"www-authenticate", b"Bearer"),),
            )
            return
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _send_json(send, 413, _error(413, f"request body exceeds {self.max_body} bytes"))
            return
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    # Raised inside the body read: FastAPI passes HTTPExceptions through.
                    raise HTTPException(413, f"request body exceeds {self.max_body} bytes")
            return message

        await self.app(scope, bounded_receive, send)

    def _authorized(self, scope: Scope) -> bool:
        assert self.token is not None
        value = _header(scope, b"authorization") or b""
        scheme, _, given = value.partition(b" ")
        # Compared whatever the scheme, in constant time: the answer's timing says nothing.
        matches = hmac.compare_digest(given.strip(), self.token)
        return scheme.lower() == b"bearer" and matches


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value)
    return None


# --- endpoints --------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _NoStdin(io.StringIO):
    """The CLI reads stdin for a ``-`` argument; over HTTP that is just a malformed ID."""

    def read(self, size: int | None = -1, /) -> str:
        raise UsageError("user ID '-' is not a UUID (stdin is not read over HTTP)")


def _backend(request: Request) -> Backend:
    backend: Backend | None = getattr(request.app.state, "backend_of", lambda: None)()
    if backend is None:
        raise ApiError(503, "the server's runtime is not up")
    return backend


def _filed(
    backend: Backend, user_ids: list[str], invalid: list[Any], key: str | None, **extra: Any
) -> JSONResponse:
    from accessctl.batches import BatchRequest, retry_policy
    from accessctl.filing import file_batch

    request = BatchRequest(user_ids=user_ids, invalid=invalid, key=key, **extra)
    try:
        filed = file_batch(backend.client, backend.engine, request, retry_policy(backend.settings))
    except UsageError as exc:  # the key names a batch filed with other input
        raise ApiError(409, exc.message) from None
    log.info(
        "batch filed" if filed else "attached to the batch already filed",
        batch_id=request.batch_id,
        key=request.key,
        total=request.total,
    )
    body = FiledBatch(batch_id=request.batch_id, key=key, total=request.total, filed=filed)
    return JSONResponse(
        body.model_dump(),
        status_code=202 if filed else 200,
        headers={"Location": f"/batches/{request.batch_id}"},
    )


def _page_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise UsageError(f"limit must be from 1 to {MAX_PAGE}, got {limit}")
    return limit


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = str((detail.get("ctx") or {}).get("error", "invalid JSON"))[:100]
        return 400, f"malformed JSON body: {reason}"
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return 422, "the body must be a JSON object, sent as Content-Type: application/json"
    parts = []
    for e in errors[:3]:
        where = ".".join(str(p)[:40] for p in e.get("loc", ()))
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
    return 422, "; ".join(parts) + more


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ApiErrorBody, "description": text}
    for code, text in {
        400: "Malformed JSON",
        401: "Missing or wrong bearer token",
        413: "Body larger than 1 MiB",
        422: "Invalid input (the CLI's one-line message)",
        503: "Database unavailable or not migrated",
    }.items()
}


KeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Names the batch, as the CLI's --key: the same key and body file "
        "one batch however often they are sent; another body is refused (409).",
    ),
]


def create_app(state: ServerState | None = None, *, token: str | None = None) -> FastAPI:
    """The API; with ``state`` it starts that runtime in its lifespan."""
    app = FastAPI(
        title="accessctl",
        version=__version__,
        description="File user access requests through durable, globally rate-limited DBOS "
        "workflows: the HTTP face of the accessctl CLI, on the same queue and limit.",
        docs_url=None,
        redoc_url=None,
        responses=_ERROR_RESPONSES,
        # FastAPI's own OpenTelemetry hooks record exception messages and stack traces,
        # and export them when FASTAPI_OTEL_AUTO_CONFIGURE is set: off, so nothing leaves
        # but the JSON answers and our own log lines.
        telemetry={
            "tracing": False,
            "metrics": False,
            "logs": False,
            "operation_spans": False,
            "auto_configure": False,
        },
    )
    app.state.backend_of = (lambda: state.backend) if state is not None else (lambda: None)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_error(exc.status, exc.message), status_code=exc.status)

    @app.exception_handler(AccessctlError)
    async def _accessctl_error(_: Request, exc: AccessctlError) -> JSONResponse:
        if isinstance(exc, UsageError):
            return JSONResponse(_error(422, exc.message), status_code=422)
        log.warning("request failed", error=exc.message)
        message = (
            "database schema is not at head; run `accessctl migrate`"
            if isinstance(exc, SchemaNotMigrated)
            else "database unavailable"
        )
        return JSONResponse(_error(503, message), status_code=503)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            _error(exc.status_code, str(exc.detail)),
            status_code=exc.status_code,
            headers=dict(exc.headers or {}),
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(exc)
        return JSONResponse(_error(status, message), status_code=status)

    from sqlalchemy.exc import DBAPIError

    @app.exception_handler(DBAPIError)
    async def _db_error(_: Request, exc: DBAPIError) -> JSONResponse:
        from accessctl.db import describe_db_error

        url = state.settings.database_url if state is not None else None
        log.warning("database error", error=describe_db_error(exc, url=url))
        return JSONResponse(_error(503, "database unavailable"), status_code=503)

    @app.get("/healthz", response_model=Health, tags=["probes"], openapi_extra=OPEN)
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, tags=["probes"], openapi_extra=OPEN)
    def readyz(request: Request) -> dict[str, str]:
        """The database is reachable and its schema is at head."""
        from accessctl.db import check_connection
        from accessctl.schema import check_schema

        backend = _backend(request)
        check_connection(backend.engine)
        check_schema(backend.engine)
        return {"status": "ready"}

    @app.post(
        "/submit",
        status_code=202,
        response_model=FiledBatch,
        responses={200: {"model": FiledBatch}, 409: {"model": ApiErrorBody}},
        tags=["filing"],
    )
    def submit(
        request: Request,
        body: Annotated[SubmitBody | None, Body()] = None,
        idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        """File one batch: an access request for each user ID (default: the configured
        IDs), as ``accessctl submit --detach``."""
        from accessctl.inputs import collect_user_ids, parse_key

        backend = _backend(request)
        body = body or SubmitBody()
        key = parse_key(idempotency_key)
        args = list(body.user_ids or backend.settings.default_users)
        parsed = collect_user_ids(args, None, _NoStdin(), skip_invalid=body.skip_invalid)
        if not parsed.user_ids and not parsed.invalid:
            raise UsageError("no user IDs given")
        if len(parsed.user_ids) > backend.settings.max_batch:
            raise UsageError(
                f"{len(parsed.user_ids)} requests exceed the maximum batch of "
                f"{backend.settings.max_batch} (ACCESSCTL_MAX_BATCH)"
            )
        return _filed(backend, parsed.user_ids, parsed.invalid, key)

    @app.post(
        "/batch/{count}",
        status_code=202,
        response_model=FiledBatch,
        responses={200: {"model": FiledBatch}, 409: {"model": ApiErrorBody}},
        tags=["filing"],
    )
    def batch(
        request: Request,
        count: str,
        body: Annotated[BatchBody | None, Body()] = None,
        idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        """File one batch of ``count`` requests (1 to ACCESSCTL_MAX_BATCH), cycling over
        ``users`` (default: the configured IDs), as ``accessctl batch N --detach``."""
        from accessctl.inputs import collect_user_ids, parse_count, parse_key

        backend = _backend(request)
        n = parse_count(count, backend.settings.max_batch)
        key = parse_key(idempotency_key)
        args = list((body.users if body else None) or backend.settings.default_users)
        parsed = collect_user_ids(args, None, _NoStdin(), skip_invalid=False)
        if not parsed.user_ids:
            raise UsageError("no user IDs to cycle over")
        cycled = [parsed.user_ids[i % len(parsed.user_ids)] for i in range(n)]
        return _filed(backend, cycled, [], key)

    @app.get("/errors", response_model=ErrorPage, tags=["reading"])
    def errors(
        request: Request,
        since: Annotated[
            str | None, Query(description="A duration (30m, 2h, 7d) or an ISO time.")
        ] = None,
        batch: Annotated[str | None, Query(description="Only this batch ID.")] = None,
        limit: Annotated[int, Query(description=f"Rows per page, 1 to {MAX_PAGE}.")] = 50,
        cursor: Annotated[
            str | None, Query(description="next_cursor of the previous page.")
        ] = None,
    ) -> dict[str, Any]:
        """Recorded failures, newest first, a page at a time."""
        from accessctl.queries import list_errors_page

        backend = _backend(request)
        after = decode_cursor(cursor) if cursor is not None else None
        rows, last = list_errors_page(
            backend.engine, batch=batch, since=since, limit=_page_limit(limit), after=after
        )
        return {"errors": rows, "next_cursor": encode_cursor(last) if last else None}

    @app.get("/batches", response_model=list[BatchReport], tags=["reading"])
    def batches(
        request: Request,
        limit: Annotated[int, Query(description=f"At most this many, 1 to {MAX_PAGE}.")] = 20,
    ) -> list[dict[str, Any]]:
        """Recent batches, newest first, with counts and state (as ``accessctl batches``)."""
        from accessctl.queries import list_batches

        return list_batches(_backend(request).engine, limit=_page_limit(limit))

    @app.get(
        "/batches/{batch_id}",
        response_model=BatchReport,
        responses={404: {"model": ApiErrorBody}},
        tags=["reading"],
    )
    def batch_status(request: Request, batch_id: str) -> dict[str, Any]:
        """Progress and outcome of one batch (as ``accessctl status``)."""
        from accessctl.queries import batch_status, parse_uuid

        source = str(parse_uuid(batch_id, "batch ID"))
        try:
            return batch_status(_backend(request).engine, source)
        except UsageError as exc:  # the ID was a UUID: the batch does not exist
            raise ApiError(404, exc.message) from None

    @app.post(
        "/batches/{batch_id}/retry",
        status_code=202,
        response_model=FiledBatch,
        responses={
            200: {"model": FiledBatch},
            404: {"model": ApiErrorBody},
            409: {"model": ApiErrorBody},
        },
        tags=["filing"],
    )
    def retry(request: Request, batch_id: str, idempotency_key: KeyHeader = None) -> JSONResponse:
        """File a new batch from a batch's failed requests (as ``accessctl retry``); its key
        defaults to retry-of-BATCH_ID, so retrying twice files one batch."""
        from accessctl.inputs import parse_key
        from accessctl.queries import failed_requests, nothing_to_retry, parse_uuid

        backend = _backend(request)
        source = str(parse_uuid(batch_id, "batch ID"))
        key = parse_key(idempotency_key) or f"retry-of-{source}"
        try:
            failed = failed_requests(backend.engine, source)
        except UsageError as exc:  # the ID was a UUID: the batch does not exist
            raise ApiError(404, exc.message) from None
        if not failed:
            raise UsageError(nothing_to_retry(backend.engine, source))
        return _filed(
            backend,
            [r["user_id"] for r in failed],
            [],
            key,
            retry_of=source,
            idempotency_keys=[r["idempotency_key"] for r in failed],
        )

    def openapi() -> dict[str, Any]:
        # The bearer scheme is enforced by HttpGuard, not by a dependency: declare it here.
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": f"Required off loopback ({TOKEN_ENV} / {TOKEN_FILE_ENV}); "
                    "/healthz and /readyz are open.",
                }
            }
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(HttpGuard, token=token)
    if state is not None:
        app.add_middleware(RuntimeLifespan, state=state)
    return app


def openapi_json() -> str:
    """The schema as checked in at docs/openapi.json (tests/test_serve.py compares them)."""
    return json.dumps(create_app().openapi(), indent=2, sort_keys=True) + "\n"


# --- running it -------------------------------------------------------------------------------


def _quiet_color(record: Any) -> bool:
    # uvicorn adds an ANSI-coloured copy of some messages as an extra; the JSON line has one.
    record.__dict__.pop("color_message", None)
    return True


def serve(settings: Settings, *, host: str, port: int, execute: bool) -> None:
    """Run the server until a signal; raise the AccessctlError that says how it ended."""
    import logging

    token = resolve_token(os.environ)
    family, sockaddr = listen_address(host, port)
    loopback = is_loopback(sockaddr)
    if not loopback and token is None:
        raise UsageError(
            f"--host {host} is not a loopback address: set {TOKEN_ENV} or {TOKEN_FILE_ENV} "
            "so that only bearers of the token may file"
        )
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).addFilter(_quiet_color)
    state = ServerState(settings, execute=execute)
    sock = bind_socket(family, sockaddr)
    try:
        config = uvicorn.Config(
            create_app(state, token=token),
            log_config=None,  # our structlog handler on the root logger carries its lines
            access_log=False,  # HttpGuard writes one structured line per request
            lifespan="on",
            http="h11",
            ws="none",
            server_header=False,
            timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace)),
        )
        server = _Server(config)
        log.info(
            "server starting",
            host=sockaddr[0],
            port=sock.getsockname()[1],
            executes=execute,
            auth="bearer" if token else "none (loopback)",
        )
        try:
            server.run(sockets=[sock])
        except SystemExit:
            if state.startup_error is None:
                raise ConfigError("the server could not start (see the log above)") from None
    finally:
        sock.close()
    if state.startup_error is not None:
        raise state.startup_error
    if server.received:
        code = ExitCode.TERMINATED if server.received[0] == signal.SIGTERM else ExitCode.INTERRUPTED
        raise Interrupted("server stopped; queued work stays for other workers", code)


class _Server(uvicorn.Server):
    """uvicorn's Server with the CLI's signal rules: the first SIGINT/SIGTERM shuts down
    gracefully, a second exits at once (the work is durable); and the signal is not
    raised again afterwards (uvicorn's default), so the process exits 130/143 through the
    CLI like any run."""

    received: list[int]

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        self.received = []
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: Any) -> None:
            if self.received:
                sys.stderr.write("accessctl: error: second signal, exiting now\n")
                sys.stderr.flush()
                code = ExitCode.TERMINATED if signum == signal.SIGTERM else ExitCode.INTERRUPTED
                os._exit(int(code))
            self.received.append(signum)
            log.info("signal received: shutting down", signal=signal.Signals(signum).name)
            self.should_exit = True

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


__all__ = ["create_app", "openapi_json", "resolve_token", "serve"]
