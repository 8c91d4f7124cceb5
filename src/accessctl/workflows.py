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

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

import sqlalchemy as sa
from dbos import DBOS, SetWorkflowID

from accessctl.db import describe_db_error, sqlstate_of
from accessctl.models import Access, AccessStatus, Batch, Error, User

if TYPE_CHECKING:
    from dbos import Queue, SQLAlchemyDatasource

# Requests: rate-limited and concurrency-limited, globally. Batches: unlimited; a batch
# workflow only fans out and waits.
QUEUE_NAME = "access-requests"
BATCH_QUEUE_NAME = "access-batches"
PROGRESS_EVENT = "progress"
# Pinned, so that work left by a crash is recovered by the next release too. Bump it only
# when a workflow's steps change in a way an in-flight workflow could not replay.
WORKFLOW_VERSION = "accessctl-wf-1"

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


@dataclass
class _Bound:
    datasource: SQLAlchemyDatasource
    queue: Queue
    poll_interval: float


_bound: _Bound | None = None


def bind(datasource: SQLAlchemyDatasource, queue: Queue, poll_interval: float) -> None:
    """Give the workflows their datasource and queue (called by the runtime at launch)."""
    global _bound
    _bound = _Bound(datasource, queue, poll_interval)


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


def _create_batch_record(batch_id: str, key: str | None, total: int) -> None:
    session = _runtime().datasource.sql_session()
    if session.get(Batch, uuid.UUID(batch_id)) is None:
        session.add(Batch(id=uuid.UUID(batch_id), key=key, total=total))


def _record_invalid_inputs(batch_id: str, invalid: list[dict[str, Any]]) -> None:
    session = _runtime().datasource.sql_session()
    for item in invalid:
        request_id = f"invalid-{batch_id}-{item['line']}"
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


def _record_access(request_id: str, batch_id: str, user_id: str) -> str:
    """File one request: an ``accesses`` row, or an ``errors`` row for an unknown user."""
    session = _runtime().datasource.sql_session()
    # A request's outcome is keyed by its durable ID: whatever re-runs, it is written once.
    if session.scalar(sa.select(Access.id).where(Access.request_id == request_id)) is not None:
        return "recorded"
    if session.scalar(sa.select(Error.id).where(Error.request_id == request_id)) is not None:
        return "failed"
    if session.get(User, uuid.UUID(user_id)) is None:
        message = error_message(
            batch_id=batch_id,
            request_id=request_id,
            user_id=user_id,
            error_class="UnknownUser",
            detail=f"no user with id {user_id}",
        )
        session.add(Error(message=message, batch_id=uuid.UUID(batch_id), request_id=request_id))
        return "failed"
    session.add(
        Access(
            user_id=uuid.UUID(user_id),
            status=AccessStatus.REQUESTED,
            request_id=request_id,
            batch_id=uuid.UUID(batch_id),
        )
    )
    return "recorded"


def _record_error(request_id: str, batch_id: str, message: dict[str, Any]) -> str:
    session = _runtime().datasource.sql_session()
    if session.scalar(sa.select(Error.id).where(Error.request_id == request_id)) is None:
        session.add(Error(message=message, batch_id=uuid.UUID(batch_id), request_id=request_id))
    return "failed"


def is_transient(exc: BaseException) -> bool:
    """Connection loss, server restart, serialization failure: worth running again."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    state = sqlstate_of(exc) or ""
    if state.startswith(("08", "40", "53", "57P")):
        return True
    return isinstance(exc, (OperationalError, InterfaceError)) and not state


# --- workflows ------------------------------------------------------------------------------


@DBOS.workflow(name="accessctl.file_request", max_recovery_attempts=MAX_RECOVERY_ATTEMPTS)
def file_request(batch_id: str, user_id: str) -> str:
    """One access request: ``"recorded"`` or ``"failed"`` (with its ``errors`` row)."""
    ds = _runtime().datasource
    request_id = DBOS.workflow_id
    assert request_id is not None
    last: BaseException | None = None
    for attempt in range(TRANSIENT_ATTEMPTS):
        try:
            outcome: str = ds.run_tx_step(
                {"name": "record_access"}, _record_access, request_id, batch_id, user_id
            )
            return outcome
        except Exception as exc:
            if not is_transient(exc):
                message = error_message(
                    batch_id=batch_id,
                    request_id=request_id,
                    user_id=user_id,
                    error_class=type(exc).__name__,
                    detail=describe_db_error(exc),
                    sqlstate=sqlstate_of(exc),
                )
                return str(
                    ds.run_tx_step(
                        {"name": "record_error"}, _record_error, request_id, batch_id, message
                    )
                )
            last = exc
            DBOS.sleep(TRANSIENT_BACKOFF_SEC * 2**attempt)
    assert last is not None
    message = error_message(
        batch_id=batch_id,
        request_id=request_id,
        user_id=user_id,
        error_class="TransientRetriesExhausted",
        detail=describe_db_error(last),
        sqlstate=sqlstate_of(last),
    )
    return str(
        ds.run_tx_step({"name": "record_error"}, _record_error, request_id, batch_id, message)
    )


@DBOS.workflow(name="accessctl.run_batch", max_recovery_attempts=MAX_RECOVERY_ATTEMPTS)
def run_batch(
    batch_id: str,
    key: str | None,
    user_ids: list[str],
    invalid: list[dict[str, Any]] | None = None,
) -> Summary:
    """File one batch: a request per user ID, on the rate-limited queue."""
    rt = _runtime()
    invalid = invalid or []
    total = len(user_ids) + len(invalid)
    rt.datasource.run_tx_step(
        {"name": "create_batch_record"}, _create_batch_record, batch_id, key, total
    )
    if invalid:
        rt.datasource.run_tx_step(
            {"name": "record_invalid_inputs"}, _record_invalid_inputs, batch_id, invalid
        )
    handles = []
    for index, user_id in enumerate(user_ids):
        with SetWorkflowID(request_workflow_id(batch_id, index)):
            handles.append(rt.queue.enqueue(file_request, batch_id, user_id))
    progress: Progress = {
        "batch_id": batch_id,
        "total": total,
        "enqueued": len(handles),
        "done": len(invalid),
        "recorded": 0,
        "failed": len(invalid),
    }
    DBOS.set_event(PROGRESS_EVENT, dict(progress))
    # Publish about a hundred updates per batch: deterministic, so replays line up.
    stride = max(1, len(handles) // 100)
    for position, handle in enumerate(handles, start=1):
        outcome = handle.get_result(polling_interval_sec=rt.poll_interval)
        progress["done"] += 1
        progress["recorded" if outcome == "recorded" else "failed"] += 1
        if position % stride == 0 or position == len(handles):
            DBOS.set_event(PROGRESS_EVENT, dict(progress))
    return {
        "batch_id": batch_id,
        "key": key,
        "total": total,
        "recorded": progress["recorded"],
        "failed": progress["failed"],
    }
