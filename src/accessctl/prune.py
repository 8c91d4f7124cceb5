"""Retention: remove finished DBOS workflow records and old ``errors`` rows.

Only finished work is touched: a batch's records go once its batch workflow has finished
(its requests' records with it), and the ``errors`` rows of any batch still running are
kept. A batch's ``batches`` row stays, with its outcome stored first, so ``batches``,
``status`` and a rerun of its key report it as it ended. Deletes run in bounded chunks, one
short transaction each, so a large prune never holds locks for long. ``accesses`` rows are the record of what was filed: never pruned.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from accessctl.models import Batch, Error
from accessctl.workflows import record_outcome

if TYPE_CHECKING:
    from dbos import DBOSClient

CHUNK = 1000


def _ids(client: DBOSClient, **filters: Any) -> list[str]:
    return [
        w.workflow_id for w in client.list_workflows(load_input=False, load_output=False, **filters)
    ]


def prune(
    client: DBOSClient, engine: sa.Engine, cutoff: datetime, *, dry_run: bool
) -> dict[str, Any]:
    """Remove what finished before ``cutoff``; returns what was (or would be) removed.

    DBOS's records go through its client (``list_workflows``/``delete_workflows``, which
    removes a workflow's inputs, outputs and steps with it; its events, streams and
    notifications cascade)."""
    from accessctl.batch_state import WORKFLOW_ENDED, WORKFLOW_IN_FLIGHT

    # Finished batch workflows created before the cutoff: their requests are finished too.
    batch_workflows = _ids(
        client,
        workflow_id_prefix="batch-",
        status=sorted(WORKFLOW_ENDED),
        end_time=cutoff.isoformat(),
    )
    running_batches = {
        w[len("batch-") :]
        for w in _ids(client, workflow_id_prefix="batch-", status=sorted(WORKFLOW_IN_FLIGHT))
    }
    with engine.connect() as conn:
        doomed = [
            (r[0], r[1])
            for r in conn.execute(
                sa.select(Error.id, Error.batch_id).where(Error.created_at < cutoff)
            )
            if r[1] is None or str(r[1]) not in running_batches
        ]
        doomed_errors = [error_id for error_id, _ in doomed]
        existing = {
            str(r[0]) for r in conn.execute(sa.select(Batch.id).where(Batch.state.is_(None)))
        }
    removed = {"workflows": 0, "errors": 0, "batches": len(batch_workflows)}
    if not dry_run:
        # Store each affected batch's outcome first: its report must not change when the
        # rows and records it was counted from go (workflows.record_outcome).
        affected = {b[len("batch-") :] for b in batch_workflows}
        affected |= {str(batch_id) for _, batch_id in doomed if batch_id is not None}
        for batch_id in sorted(affected & existing):
            record_outcome(engine, batch_id)
    for batch_workflow in batch_workflows:
        prefix = f"req-{batch_workflow[len('batch-') :]}-"
        offset = 0
        while True:
            # Each page is deleted (one short DBOS transaction) before the next is read;
            # a dry run pages through instead.
            ids = _ids(client, workflow_id_prefix=prefix, limit=CHUNK, offset=offset)
            if not ids:
                break
            if dry_run:
                offset += len(ids)
            else:
                client.delete_workflows(ids)
            removed["workflows"] += len(ids)
        if not dry_run:
            client.delete_workflows([batch_workflow])
        removed["workflows"] += 1
    for start in range(0, len(doomed_errors), CHUNK):
        chunk = doomed_errors[start : start + CHUNK]
        if not dry_run:
            with engine.begin() as conn:
                conn.execute(sa.delete(Error).where(Error.id.in_(chunk)))
        removed["errors"] += len(chunk)
    return {"cutoff": cutoff.isoformat(), "dry_run": dry_run, **removed}
