"""Filing a batch and following it: the service behind ``submit``, ``batch`` and ``status``.

A batch is identified by its batch ID; with ``--key`` the ID is derived from the key, so a
second invocation with the same key (even a concurrent one) attaches to the first batch
instead of filing another: the ``batches`` row is written once, in the same transaction as
the batch's workflows (``filing.py``), and the loser of a race attaches.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from accessctl.exceptions import ExitCode, Interrupted, UsageError
from accessctl.inputs import InvalidInput
from accessctl.pacing import FollowPace
from accessctl.settings import Settings
from accessctl.workflows import (
    Summary,
    batch_id_for_key,
    batch_workflow_id,
    follow_interval,
    is_transient,
)

if TYPE_CHECKING:
    import sqlalchemy as sa
    from dbos import DBOSClient, WorkflowHandle

log = structlog.get_logger(__name__)


@dataclass
class BatchRequest:
    user_ids: list[str]
    invalid: list[InvalidInput]
    key: str | None
    batch_id: str = ""
    retry_of: str | None = None
    # Parallel to ``user_ids`` (a retry's): the idempotency key each request's provider
    # calls must carry instead of its own request ID, or None for its own.
    idempotency_keys: list[str | None] | None = None

    def __post_init__(self) -> None:
        if not self.user_ids and not self.invalid:
            raise UsageError("no user IDs to file")
        if self.idempotency_keys is not None and len(self.idempotency_keys) != len(self.user_ids):
            raise ValueError("idempotency_keys must be parallel to user_ids")
        if not self.batch_id:
            self.batch_id = batch_id_for_key(self.key) if self.key else str(uuid.uuid4())

    @property
    def total(self) -> int:
        return len(self.user_ids) + len(self.invalid)

    def input_digest(self) -> str:
        """SHA-256 of what this batch files: its requests' user IDs in order and its refused
        lines. A key given again must come with the same input (as Stripe's idempotency
        keys): the same digest attaches, another is refused."""
        digest = hashlib.sha256()
        for user_id in self.user_ids:
            digest.update(user_id.encode() + b"\n")
        digest.update(b"--refused--\n")
        for item in self.invalid:
            digest.update(item.text.encode("utf-8", "backslashreplace") + b"\n")
        return digest.hexdigest()


def retry_policy(settings: Settings) -> dict[str, float]:
    """The provider retry policy, fixed into every request when its batch is filed, so
    every replay decides alike."""
    return {
        "max_attempts": float(settings.provider_max_attempts),
        "deadline": settings.provider_deadline,
    }


def enqueue_detached(settings: Settings, engine: sa.Engine, request: BatchRequest) -> str:
    """File the batch durably without executing it here: a worker or the next run does."""
    from accessctl.filing import file_batch
    from accessctl.runtime import filing_client, shared_limit_for

    client = filing_client(settings, engine)
    try:
        shared_limit_for(settings, client, engine)
        filed = file_batch(client, engine, request, retry_policy(settings))
    finally:
        client.destroy()
    log.info(
        "batch filed for workers" if filed else "batch already filed",
        batch_id=request.batch_id,
        key=request.key,
    )
    return request.batch_id


def _interrupted(batch_id: str, code: ExitCode) -> Interrupted:
    return Interrupted(
        f"interrupted; batch {batch_id} is durable and resumes with the next run "
        "or any `accessctl worker`",
        code,
    )


def run_attached(
    request: BatchRequest,
    settings: Settings,
    engine: sa.Engine,
    client: DBOSClient,
    *,
    poll_interval: float,
    stop: threading.Event,
    stop_reason: Callable[[], ExitCode],
    on_progress: Callable[[dict[str, Any]], None],
) -> Summary:
    """File the batch (or attach to the one its key names) and follow it to the end.

    ``stop`` is set by a signal: we stop waiting, and the runtime's shutdown lets in-flight
    requests finish; the batch itself stays durable and resumes with the next run. The
    summary is the batch's report as ``status`` gives it (batch_state.py), so the exit
    code, ``status`` and ``batches`` agree."""
    from dbos import DBOS, error

    from accessctl.batch_state import FINAL, WORKFLOW_ENDED
    from accessctl.filing import file_batch
    from accessctl.queries import batch_status

    batch_id = request.batch_id
    filed = file_batch(client, engine, request, retry_policy(settings))
    log.info(
        "batch filed" if filed else "attached to the batch already filed",
        batch_id=batch_id,
        key=request.key,
        total=request.total,
    )
    try:
        handle: WorkflowHandle[Summary] | None = DBOS.retrieve_workflow(batch_workflow_id(batch_id))
    except error.DBOSNonExistentWorkflowError:
        handle = None  # its records were pruned: it ended, and its row keeps the outcome
    pace = FollowPace(follow_interval(poll_interval, request.total))
    interval = pace.base
    last: dict[str, Any] | None = None
    while True:
        try:
            report = batch_status(engine, batch_id)
            follower = handle.get_status().status if handle is not None else None
        except Exception as exc:
            # A lost connection or a restarting database: read again at the next turn.
            if not is_transient(exc):
                raise
            if stop.wait(interval):
                raise _interrupted(batch_id, stop_reason()) from None
            continue
        progress = {
            "batch_id": batch_id,
            "total": report["total"],
            "done": report["done"],
            "recorded": report["recorded"],
            "failed": report["failed"],
        }
        # Every request done: only the batch's end is awaited now, and soon.
        interval = pace.after(progress != last or report["done"] >= report["total"])
        if progress != last:
            on_progress(progress)
            last = progress
        # Finished once its state is final and its follower has ended (it stores the
        # outcome as it ends, and leaves no work behind), or nothing follows it any more.
        if report["state"] in FINAL and (handle is None or follower in WORKFLOW_ENDED):
            break
        if stop.wait(interval):
            raise _interrupted(batch_id, stop_reason())
    return {
        "batch_id": batch_id,
        "key": request.key,
        "total": report["total"],
        "recorded": report["recorded"],
        "failed": report["failed"],
        "state": report["state"],
    }
