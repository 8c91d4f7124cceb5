"""Filing a batch and following it: the service behind ``submit``, ``batch`` and ``status``.

A batch is identified by its batch ID; with ``--key`` the ID is derived from the key, so a
second invocation with the same key (even a concurrent one) attaches to the first batch
instead of filing another: DBOS starts a workflow ID once and hands later callers the
existing workflow.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from accessctl.errors import ExitCode, Interrupted, UsageError
from accessctl.inputs import InvalidInput
from accessctl.models import utcnow
from accessctl.settings import APP_NAME, Settings
from accessctl.workflows import (
    BATCH_QUEUE_NAME,
    PROGRESS_EVENT,
    WORKFLOW_VERSION,
    Summary,
    batch_id_for_key,
    batch_workflow_id,
    run_batch,
)

if TYPE_CHECKING:
    import sqlalchemy as sa

log = structlog.get_logger(__name__)

TERMINAL = ("SUCCESS", "ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED")


@dataclass
class BatchRequest:
    user_ids: list[str]
    invalid: list[InvalidInput]
    key: str | None
    batch_id: str = ""
    retry_of: str | None = None

    def __post_init__(self) -> None:
        if not self.user_ids and not self.invalid:
            raise UsageError("no user IDs to file")
        if not self.batch_id:
            self.batch_id = batch_id_for_key(self.key) if self.key else str(uuid.uuid4())

    def workflow_args(
        self, settings: Settings
    ) -> tuple[str, str | None, list[str], list[dict[str, Any]], dict[str, float], str | None]:
        # The retry policy travels with the batch, so every replay decides alike.
        retry = {
            "max_attempts": float(settings.provider_max_attempts),
            "deadline": settings.provider_deadline,
        }
        invalid = [i.as_dict() for i in self.invalid]
        return (self.batch_id, self.key, self.user_ids, invalid, retry, self.retry_of)


def record_batch(engine: sa.Engine, request: BatchRequest) -> None:
    """Record the batch before its workflow exists, so `batches` and `status` show it at
    once (the workflow's own record step is idempotent)."""
    import sqlalchemy as sa

    from accessctl.models import Batch

    total = len(request.user_ids) + len(request.invalid)
    bid = uuid.UUID(request.batch_id)
    retry_of = uuid.UUID(request.retry_of) if request.retry_of else None
    from sqlalchemy.exc import IntegrityError

    try:
        with engine.begin() as conn:
            if conn.scalar(sa.select(Batch.id).where(Batch.id == bid)) is None:
                conn.execute(
                    sa.insert(Batch).values(
                        id=bid, key=request.key, total=total, retry_of=retry_of, created_at=utcnow()
                    )
                )
    except IntegrityError:
        # A concurrent run with the same key recorded it first: the same batch, attach.
        with engine.connect() as conn:
            if conn.scalar(sa.select(Batch.id).where(Batch.id == bid)) is None:
                raise


def enqueue_detached(settings: Settings, engine: sa.Engine, request: BatchRequest) -> str:
    """File the batch durably without executing it here: a worker or the next run does."""
    from dbos import DBOSClient

    client = DBOSClient(
        system_database_engine=engine if settings.is_sqlite else None,
        system_database_url=None if settings.is_sqlite else settings.database_url,
        application_name=APP_NAME,
    )
    record_batch(engine, request)
    try:
        client.enqueue(
            {
                "queue_name": BATCH_QUEUE_NAME,
                "workflow_name": "accessctl.run_batch",
                "workflow_id": batch_workflow_id(request.batch_id),
                "app_version": WORKFLOW_VERSION,
            },
            *request.workflow_args(settings),
        )
    finally:
        client.destroy()
    log.info("batch filed for workers", batch_id=request.batch_id, key=request.key)
    return request.batch_id


def run_attached(
    request: BatchRequest,
    settings: Settings,
    engine: sa.Engine,
    *,
    poll_interval: float,
    stop: threading.Event,
    stop_reason: Callable[[], ExitCode],
    on_progress: Callable[[dict[str, Any]], None],
) -> Summary:
    """Enqueue the batch (or attach to the one its key names) and follow it to the end.

    ``stop`` is set by a signal: we stop waiting, and the runtime's shutdown lets in-flight
    requests finish; the batch itself stays durable and resumes with the next run."""
    from dbos import DBOS, SetWorkflowID

    batch_id = request.batch_id
    workflow_id = batch_workflow_id(batch_id)
    queue = DBOS.retrieve_queue(BATCH_QUEUE_NAME)
    assert queue is not None
    record_batch(engine, request)
    with SetWorkflowID(workflow_id):
        handle = queue.enqueue(run_batch, *request.workflow_args(settings))
    log.info("batch filed", batch_id=batch_id, key=request.key, total=len(request.user_ids))
    last: dict[str, Any] | None = None
    while True:
        status = handle.get_status().status
        progress = DBOS.get_event(workflow_id, PROGRESS_EVENT, timeout_seconds=0)
        if progress is not None and progress != last:
            on_progress(progress)
            last = progress
        if status in TERMINAL:
            break
        if stop.wait(poll_interval):
            raise Interrupted(
                f"interrupted; batch {batch_id} is durable and resumes with the next run "
                "or any `accessctl worker`",
                stop_reason(),
            )
    summary: Summary = handle.get_result()
    return summary
