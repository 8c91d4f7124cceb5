"""Every durable workflow, transaction and the queue they run on.

A batch is one ``run_batch`` workflow. It records the batch, then enqueues one
``file_request`` workflow per requested user onto the rate-limited queue, publishes its
progress as a DBOS event and returns a summary. Each request writes exactly one
``accesses`` row or exactly one ``errors`` row, in one database transaction whose result
DBOS checkpoints in the same transaction, so no replay ever writes twice.

Workflows print nothing and return plain data. Importing this module registers the
functions with DBOS but touches no database: the runtime binds the datasource and the
queue after launch (``bind``).
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, TypedDict

import sqlalchemy as sa
from dbos import DBOS, SetEnqueueOptions, SetWorkflowID

from accessctl.db import describe_db_error, sqlstate_of
from accessctl.models import Access, AccessStatus, Batch, Error, User

if TYPE_CHECKING:
    from dbos import Queue, SQLAlchemyDatasource
    from sqlalchemy.orm import Session

    from accessctl.provider import ProviderConfig

# Requests: rate-limited and concurrency-limited, globally. Batches: unlimited; a batch
# workflow only fans out and waits.
QUEUE_NAME = "access-requests"
BATCH_QUEUE_NAME = "access-batches"
PROGRESS_EVENT = "progress"
# Pinned, so that work left by a crash is recovered by the next release too. Bump it only
# when a workflow's steps change in a way an in-flight workflow could not replay.
WORKFLOW_VERSION = "accessctl-wf-2"

# Transient database faults inside a request are retried this many times, with backoff,
# before the request is recorded as failed (DBOS already retries serialization failures).
TRANSIENT_ATTEMPTS = 8
TRANSIENT_BACKOFF_SEC = 0.5
# Recovery after crashes must never give up on a request; the default cap could.
MAX_RECOVERY_ATTEMPTS = 1000


class Summary(TypedDict):
    batch_id: str
    key: str | None
    total: int
    recorded: int
    failed: int


class Progress(TypedDict):
    batch_id: str
    total: int
    enqueued: int
    done: int
    recorded: int
    failed: int


class _Bound:
    """What the workflows need from the running process. Bound before DBOS launches (it
    may recover work at once); the queue exists only after launch and is set then."""

    def __init__(
        self,
        datasource: SQLAlchemyDatasource,
        poll_interval: float,
        provider: ProviderConfig | None,
    ) -> None:
        self.datasource = datasource
        self.poll_interval = poll_interval
        self.provider = provider
        self._queue: Queue | None = None
        self._queue_ready = threading.Event()

    def set_queue(self, queue: Queue) -> None:
        self._queue = queue
        self._queue_ready.set()

    @property
    def queue(self) -> Queue:
        if not self._queue_ready.wait(timeout=60):
            raise RuntimeError("the request queue was never registered")
        assert self._queue is not None
        return self._queue


_bound: _Bound | None = None


def bind(
    datasource: SQLAlchemyDatasource, poll_interval: float, provider: ProviderConfig | None
) -> _Bound:
    """Give the workflows their datasource and provider (called by the runtime, before
    launch); the runtime then calls ``set_queue`` on the result after launch."""
    global _bound
    _bound = _Bound(datasource, poll_interval, provider)
    return _bound


def unbind() -> None:
    global _bound
    _bound = None


def _runtime() -> _Bound:
    if _bound is None:
        raise RuntimeError("accessctl workflows ran before the runtime bound a datasource")
    return _bound


def batch_workflow_id(batch_id: str) -> str:
    return f"batch-{batch_id}"


def request_workflow_id(batch_id: str, index: int) -> str:
    return f"req-{batch_id}-{index:07d}"


def batch_id_for_key(key: str) -> str:
    """A key names its batch: the same key always maps to the same batch ID."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"accessctl:batch-key:{key}"))


def error_message(
    *,
    batch_id: str | None,
    request_id: str | None,
    user_id: str | None,
    error_class: str,
    detail: str,
    sqlstate: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The structured body of an ``errors`` row."""
    return {
        "batch_id": batch_id,
        "workflow_id": request_id,
        "user_id": user_id,
        "error_class": error_class,
        "detail": detail[:2000],
        "sqlstate": sqlstate,
        **extra,
    }


# --- transactions (each one database transaction, checkpointed with its result) ----------


def _create_batch_record(
    batch_id: str, key: str | None, total: int, retry_of: str | None = None
) -> None:
    session = _runtime().datasource.sql_session()
    if session.get(Batch, uuid.UUID(batch_id)) is None:
        parent = uuid.UUID(retry_of) if retry_of else None
        session.add(Batch(id=uuid.UUID(batch_id), key=key, total=total, retry_of=parent))


def _record_invalid_inputs(batch_id: str, invalid: list[dict[str, Any]]) -> None:
    session = _runtime().datasource.sql_session()
    for index, item in enumerate(invalid):
        # Keyed by position in the batch's input: two sources can share a line number.
        request_id = f"invalid-{batch_id}-{index:07d}"
        if session.scalar(sa.select(Error.id).where(Error.request_id == request_id)) is None:
            message = error_message(
                batch_id=batch_id,
                request_id=None,
                user_id=None,
                error_class="InvalidUserId",
                detail=item["reason"],
                input=item["text"][:200],
                line=item["line"],
            )
            session.add(Error(message=message, batch_id=uuid.UUID(batch_id), request_id=request_id))


def _existing_outcome(session: Session, request_id: str) -> str | None:
    """A request's outcome is keyed by its durable ID: whatever re-runs, it is written once."""
    if session.scalar(sa.select(Access.id).where(Access.request_id == request_id)) is not None:
        return "recorded"
    if session.scalar(sa.select(Error.id).where(Error.request_id == request_id)) is not None:
        return "failed"
    return None


def _add_error(session: Session, request_id: str, batch_id: str, message: dict[str, Any]) -> str:
    session.add(Error(message=message, batch_id=uuid.UUID(batch_id), request_id=request_id))
    return "failed"


def _unknown_user(session: Session, request_id: str, batch_id: str, user_id: str) -> bool:
    """Record the request as failed if its user does not exist; True if so."""
    if session.get(User, uuid.UUID(user_id)) is not None:
        return False
    message = error_message(
        batch_id=batch_id,
        request_id=request_id,
        user_id=user_id,
        error_class="UnknownUser",
        detail=f"no user with id {user_id}",
    )
    _add_error(session, request_id, batch_id, message)
    return True


def _record_access(
    request_id: str, batch_id: str, user_id: str, status: str = AccessStatus.REQUESTED.value
) -> str:
    """File one request: an ``accesses`` row, or an ``errors`` row for an unknown user."""
    session = _runtime().datasource.sql_session()
    existing = _existing_outcome(session, request_id)
    if existing is not None:
        return existing
    if _unknown_user(session, request_id, batch_id, user_id):
        return "failed"
    session.add(
        Access(
            user_id=uuid.UUID(user_id),
            status=AccessStatus(status),
            request_id=request_id,
            batch_id=uuid.UUID(batch_id),
        )
    )
    return "recorded"


def _record_error(request_id: str, batch_id: str, message: dict[str, Any]) -> str:
    session = _runtime().datasource.sql_session()
    return _existing_outcome(session, request_id) or _add_error(
        session, request_id, batch_id, message
    )


def is_transient(exc: BaseException) -> bool:
    """Connection loss, server restart, serialization failure: worth running again."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    state = sqlstate_of(exc) or ""
    if state.startswith(("08", "40", "53", "57P")):
        return True
    return isinstance(exc, (OperationalError, InterfaceError)) and not state


def _check_request(request_id: str, batch_id: str, user_id: str) -> str:
    """Before calling the provider: ``"recorded"``/``"failed"`` if this request already has
    its row, ``"failed"`` (with its row) for an unknown user, else ``"ready"``."""
    session = _runtime().datasource.sql_session()
    existing = _existing_outcome(session, request_id)
    if existing is not None:
        return existing
    return "failed" if _unknown_user(session, request_id, batch_id, user_id) else "ready"


def _seconds_since_start(workflow_id: str) -> float:
    """How long ago the limiter admitted this attempt, on the database's clock (the one
    DBOS stamps starts with), so hosts' clock skew does not matter."""
    ds = _runtime().datasource
    engine = ds.engine
    if engine.dialect.name == "sqlite":
        sql = (
            "SELECT CAST(strftime('%s','now') * 1000 AS INTEGER) - started_at_epoch_ms "
            "FROM workflow_status WHERE workflow_uuid = :w"
        )
    else:
        sql = (
            "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT) "
            "- started_at_epoch_ms FROM dbos.workflow_status WHERE workflow_uuid = :w"
        )
    with engine.connect() as conn:
        elapsed_ms = conn.execute(sa.text(sql), {"w": workflow_id}).scalar()
    return (elapsed_ms or 0) / 1000


@DBOS.step(name="accessctl.call_provider")
def call_provider_step(request_id: str, user_id: str, batch_id: str) -> dict[str, Any]:
    """One provider call: a checkpointed step, so a replay does not call again.

    The limiter admits *starts*; the provider sees *calls*. The queue's window is widened
    by ``call_slack`` and a call is only made within ``call_slack`` of its start, so any
    window of the configured period at the provider holds at most L calls. An attempt
    that comes too late does not call: it goes back through the queue (``"late"``)."""
    from accessctl.provider import call_provider

    provider = _runtime().provider
    assert provider is not None
    workflow_id = DBOS.workflow_id
    assert workflow_id is not None
    # Half the slack at the check leaves the other half for the call to reach the
    # provider (a busy host can pause a thread between the check and the send).
    if _seconds_since_start(workflow_id) > provider.call_slack / 2:
        return {"outcome": "late", "http_status": None, "retry_after": None, "detail": ""}
    return call_provider(provider, request_id=request_id, user_id=user_id, batch_id=batch_id)


def _run_tx(name: str, func: Any, *args: Any) -> Any:
    """A datasource transaction, retried here on transient database faults (DBOS retries
    serialization failures itself); any other database error is raised."""
    ds = _runtime().datasource
    last: BaseException | None = None
    for attempt in range(TRANSIENT_ATTEMPTS):
        try:
            return ds.run_tx_step({"name": name}, func, *args)
        except Exception as exc:
            if not is_transient(exc):
                raise
            last = exc
            DBOS.sleep(TRANSIENT_BACKOFF_SEC * 2**attempt)
    assert last is not None
    raise last


def _database_failure(request_id: str, batch_id: str, user_id: str, exc: BaseException) -> str:
    message = error_message(
        batch_id=batch_id,
        request_id=request_id,
        user_id=user_id,
        error_class=type(exc).__name__ if not is_transient(exc) else "TransientRetriesExhausted",
        detail=describe_db_error(exc),
        sqlstate=sqlstate_of(exc),
    )
    return str(
        _runtime().datasource.run_tx_step(
            {"name": "record_error"}, _record_error, request_id, batch_id, message
        )
    )


@DBOS.workflow(name="accessctl.file_request", max_recovery_attempts=MAX_RECOVERY_ATTEMPTS)
def file_request(
    batch_id: str, user_id: str, request_id: str | None = None, attempt: int = 1
) -> dict[str, Any]:
    """One attempt at one access request; this is what the rate limiter admits.

    Without a provider it records the request. With one, it calls the provider once and
    records the outcome, or returns ``{"outcome": "transient", ...}`` for the batch to
    schedule the next attempt through the queue. ``request_id`` is the request's durable
    ID (the first attempt's workflow ID): its idempotency key and its row's key."""
    rid = request_id or DBOS.workflow_id
    assert rid is not None
    provider = _runtime().provider
    try:
        if provider is None:
            return {"outcome": _run_tx("record_access", _record_access, rid, batch_id, user_id)}
        state = _run_tx("check_request", _check_request, rid, batch_id, user_id)
        if state != "ready":
            return {"outcome": state}
        answer: dict[str, Any] = call_provider_step(rid, user_id, batch_id)
        outcome = answer["outcome"]
        if outcome in ("approved", "rejected", "requested"):
            recorded = _run_tx("record_access", _record_access, rid, batch_id, user_id, outcome)
            return {"outcome": recorded}
        if outcome == "refused":
            message = error_message(
                batch_id=batch_id,
                request_id=rid,
                user_id=user_id,
                error_class="ProviderRefused",
                detail=answer["detail"],
                http_status=answer["http_status"],
                attempt=attempt,
            )
            return {"outcome": _run_tx("record_error", _record_error, rid, batch_id, message)}
        return {**answer, "attempt": attempt}
    except Exception as exc:
        from sqlalchemy.exc import DBAPIError

        if not isinstance(exc, DBAPIError):
            raise
        return {"outcome": _database_failure(rid, batch_id, user_id, exc)}


def _jitter(request_id: str, attempt: int) -> float:
    """Deterministic jitter in [0, 1): replays of the batch schedule the same retries."""
    digest = hashlib.sha256(f"{request_id}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


@DBOS.workflow(name="accessctl.run_batch", max_recovery_attempts=MAX_RECOVERY_ATTEMPTS)
def run_batch(
    batch_id: str,
    key: str | None,
    user_ids: list[str],
    invalid: list[dict[str, Any]] | None = None,
    retry: dict[str, float] | None = None,
    retry_of: str | None = None,
) -> Summary:
    """File one batch: a request per user ID, each attempt through the rate-limited queue.

    ``retry`` (``max_attempts``, ``deadline`` seconds) bounds provider retries; it is fixed
    when the batch is filed, so every replay makes the same decisions."""
    from accessctl.provider import backoff_seconds

    rt = _runtime()
    invalid = invalid or []
    retry = retry or {"max_attempts": 1, "deadline": 0.0}
    total = len(user_ids) + len(invalid)
    rt.datasource.run_tx_step(
        {"name": "create_batch_record"}, _create_batch_record, batch_id, key, total, retry_of
    )
    if invalid:
        rt.datasource.run_tx_step(
            {"name": "record_invalid_inputs"}, _record_invalid_inputs, batch_id, invalid
        )
    # (handle, user ID, request ID, attempt, seconds of backoff so far)
    waiting: deque[tuple[Any, str, str, int, float]] = deque()
    for index, user_id in enumerate(user_ids):
        request_id = request_workflow_id(batch_id, index)
        with SetWorkflowID(request_id):
            waiting.append(
                (rt.queue.enqueue(file_request, batch_id, user_id), user_id, request_id, 1, 0.0)
            )
    tries: dict[str, int] = {}  # re-enqueues per request, for unique attempt workflow IDs

    def again(user_id: str, request_id: str, attempt: int, delay: float) -> Any:
        tries[request_id] = tries.get(request_id, 1) + 1
        options = SetEnqueueOptions(delay_seconds=delay) if delay > 0 else SetEnqueueOptions()
        with SetWorkflowID(f"{request_id}.t{tries[request_id]}"), options:
            return rt.queue.enqueue(file_request, batch_id, user_id, request_id, attempt)

    progress: Progress = {
        "batch_id": batch_id,
        "total": total,
        "enqueued": len(user_ids),
        "done": len(invalid),
        "recorded": 0,
        "failed": len(invalid),
    }
    DBOS.set_event(PROGRESS_EVENT, dict(progress))
    # About a hundred updates per batch, at deterministic points, so replays line up.
    stride = max(1, len(user_ids) // 100)
    while waiting:
        handle, user_id, request_id, attempt, waited = waiting.popleft()
        result = handle.get_result(polling_interval_sec=rt.poll_interval)
        outcome = result["outcome"]
        if outcome == "late":
            # Admitted but not called in time: no provider attempt was spent.
            waiting.append(
                (again(user_id, request_id, attempt, 0.0), user_id, request_id, attempt, waited)
            )
            continue
        if outcome == "transient":
            delay = backoff_seconds(
                attempt, result.get("retry_after"), _jitter(request_id, attempt)
            )
            if attempt < retry["max_attempts"] and waited + delay <= retry["deadline"]:
                handle = again(user_id, request_id, attempt + 1, delay)
                waiting.append((handle, user_id, request_id, attempt + 1, waited + delay))
                continue
            message = error_message(
                batch_id=batch_id,
                request_id=request_id,
                user_id=user_id,
                error_class="ProviderUnavailable",
                detail=f"gave up after {attempt} attempt(s): {result.get('detail') or 'no answer'}",
                http_status=result.get("http_status"),
                attempt=attempt,
            )
            outcome = rt.datasource.run_tx_step(
                {"name": "record_error"}, _record_error, request_id, batch_id, message
            )
        progress["done"] += 1
        if outcome == "recorded":
            progress["recorded"] += 1
        else:
            progress["failed"] += 1
        if progress["done"] % stride == 0 or not waiting:
            DBOS.set_event(PROGRESS_EVENT, dict(progress))
    return {
        "batch_id": batch_id,
        "key": key,
        "total": total,
        "recorded": progress["recorded"],
        "failed": progress["failed"],
    }
