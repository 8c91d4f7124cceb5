"""``accessctl cancel``: stop a batch. No further request of it starts; the ones in flight
finish; every request that never started gets one ``Cancelled`` errors row, so ``retry``
can file it again.

Race-free by order: the batch is marked cancelled (committed) before anything else. A
request that checks its batch after that records itself as Cancelled without calling
anyone (workflows._check_request); one that checked before is in flight and finishes.
Queued tries are then taken off the queue through DBOS and recorded here; a row is keyed
by its request ID, so whichever of the two writes first, a request gets exactly one. (A
try dequeued between our listing and DBOS's cancel loses its start stamp, but it was
dequeued after the mark, so it calls nobody: the provider's limit still holds.)
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog

from accessctl.exceptions import UsageError
from accessctl.models import Batch, Error, utcnow

if TYPE_CHECKING:
    from dbos import DBOSClient

log = structlog.get_logger(__name__)

PAGE = 1000


def cancel_batch(client: DBOSClient, engine: sa.Engine, batch_id: str) -> dict[str, Any]:
    """Cancel ``batch_id``; returns what was done. Cancelling twice is harmless."""
    from accessctl.batch_state import WORKFLOW_WAITING
    from accessctl.queries import batch_status
    from accessctl.workflows import (
        CANCELLED_DETAIL,
        batch_workflow_id,
        error_message,
        record_outcome,
        requests_in_flight,
    )

    bid = uuid.UUID(batch_id)
    with engine.begin() as conn:
        row = conn.execute(
            sa.select(Batch.state, Batch.cancelled_at).where(Batch.id == bid)
        ).first()
        if row is None:
            raise UsageError(f"no batch with ID {batch_id}")
        if row.state is not None:
            return {"batch_id": batch_id, "cancelled": 0, "state": row.state, "changed": False}
        if row.cancelled_at is None:
            conn.execute(sa.update(Batch).where(Batch.id == bid).values(cancelled_at=utcnow()))
    cancelled = 0
    while True:
        # Pages of queued or delayed tries (first tries and provider retries alike).
        queued = client.list_workflows(
            workflow_id_prefix=f"req-{batch_id}-",
            status=sorted(WORKFLOW_WAITING),
            load_input=True,
            load_output=False,
            limit=PAGE,
        )
        if not queued:
            break
        client.cancel_workflows([w.workflow_id for w in queued])
        rows = []
        for workflow in queued:
            args = list(workflow.input["args"]) if workflow.input else []
            user_id = args[1] if len(args) > 1 else None
            request_id = args[2] if len(args) > 2 and args[2] else workflow.workflow_id
            rows.append(
                {
                    "id": uuid.uuid4(),
                    "batch_id": bid,
                    "request_id": request_id,
                    "created_at": utcnow(),
                    "message": error_message(
                        batch_id=batch_id,
                        request_id=request_id,
                        user_id=user_id,
                        error_class="Cancelled",
                        detail=CANCELLED_DETAIL,
                    ),
                }
            )
        with engine.begin() as conn:
            have = set(
                conn.scalars(
                    sa.select(Error.request_id).where(
                        Error.request_id.in_([r["request_id"] for r in rows])
                    )
                )
            )
            fresh = [r for r in rows if r["request_id"] not in have]
            if fresh:
                conn.execute(sa.insert(Error), fresh)
        cancelled += len(fresh)
    report = batch_status(engine, batch_id)
    if report["done"] >= report["total"] and not requests_in_flight(engine, batch_id):
        # Nothing left to run: end it now, follower included (a detached batch nobody
        # picked up would otherwise wait for a worker just to end).
        record_outcome(engine, batch_id)
        follower = client.list_workflows(
            workflow_ids=[batch_workflow_id(batch_id)],
            status=sorted(WORKFLOW_WAITING),
            load_input=False,
            load_output=False,
        )
        if follower:
            client.cancel_workflows([follower[0].workflow_id])
        report = batch_status(engine, batch_id)
    log.info("batch cancelled", batch_id=batch_id, cancelled=cancelled, state=report["state"])
    return {"batch_id": batch_id, "cancelled": cancelled, "state": report["state"], "changed": True}
