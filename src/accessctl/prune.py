"""Retention: remove finished DBOS workflow records and old ``errors`` rows.

Only finished work is touched: a batch's records go once its batch workflow has finished
(its requests' records with it), and the ``errors`` rows of any batch still running are
kept. A batch's ``batches`` row stays, with its outcome stored first, so ``batches``,
``status`` and a rerun of its key report it as it ended. Deletes run in bounded chunks, one short transaction each, so a large prune never
holds locks for long. ``accesses`` rows are the record of what was filed: never pruned.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from accessctl.db import dbos_table
from accessctl.models import Batch, Error
from accessctl.workflows import record_outcome

FINISHED = ("SUCCESS", "ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED")
CHUNK = 1000


# Every DBOS table keyed by workflow ID, cleared explicitly before workflow_status: in
# DBOS 3.4's schema several (inputs, outputs, step results, datasource checkpoints) do not
# cascade from it. Column name beside each.
KEYED_BY_WORKFLOW = (
    ("operation_outputs", "workflow_uuid"),
    ("workflow_events", "workflow_uuid"),
    ("workflow_events_history", "workflow_uuid"),
    ("streams", "workflow_uuid"),
    ("notifications", "destination_uuid"),
    ("workflow_input", "workflow_uuid"),
    ("workflow_output", "workflow_uuid"),
    ("datasource_outputs", "workflow_id"),
)


def _tables(engine: sa.Engine) -> tuple[str, list[tuple[str, str]]]:
    return dbos_table(engine), [(dbos_table(engine, t), c) for t, c in KEYED_BY_WORKFLOW]


def prune(engine: sa.Engine, cutoff: datetime, *, dry_run: bool) -> dict[str, Any]:
    """Remove what finished before ``cutoff``; returns what was (or would be) removed."""
    workflows, keyed = _tables(engine)
    cutoff_ms = int(cutoff.timestamp() * 1000)
    finished = ", ".join(f"'{s}'" for s in FINISHED)
    # Finished batch workflows older than the cutoff: their requests are finished too.
    with engine.connect() as conn:
        batch_workflows = [
            str(r[0])
            for r in conn.execute(
                sa.text(
                    f"SELECT workflow_uuid FROM {workflows} WHERE workflow_uuid LIKE 'batch-%' "
                    f"AND status IN ({finished}) AND created_at < :cutoff"
                ),
                {"cutoff": cutoff_ms},
            )
        ]
        running_batches = {
            str(r[0])[len("batch-") :]
            for r in conn.execute(
                sa.text(
                    f"SELECT workflow_uuid FROM {workflows} WHERE workflow_uuid LIKE 'batch-%' "
                    f"AND status NOT IN ({finished})"
                )
            )
        }
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
        batch_id = batch_workflow[len("batch-") :]
        pattern = f"req-{batch_id}-%"
        while True:
            with engine.begin() as conn:
                ids = [
                    str(r[0])
                    for r in conn.execute(
                        sa.text(
                            f"SELECT workflow_uuid FROM {workflows} "
                            "WHERE workflow_uuid LIKE :p OR workflow_uuid = :b LIMIT :n"
                        ),
                        {"p": pattern, "b": batch_workflow, "n": CHUNK},
                    )
                ]
                if dry_run:
                    removed["workflows"] += (
                        conn.execute(
                            sa.text(
                                f"SELECT count(*) FROM {workflows} "
                                "WHERE workflow_uuid LIKE :p OR workflow_uuid = :b"
                            ),
                            {"p": pattern, "b": batch_workflow},
                        ).scalar()
                        or 0
                    )
                    break
                if not ids:
                    break
                for table, column in [*keyed, (workflows, "workflow_uuid")]:
                    conn.execute(
                        sa.text(f"DELETE FROM {table} WHERE {column} IN :ids").bindparams(
                            sa.bindparam("ids", expanding=True)
                        ),
                        {"ids": ids},
                    )
                removed["workflows"] += len(ids)
    for start in range(0, len(doomed_errors), CHUNK):
        chunk = doomed_errors[start : start + CHUNK]
        if not dry_run:
            with engine.begin() as conn:
                conn.execute(sa.delete(Error).where(Error.id.in_(chunk)))
        removed["errors"] += len(chunk)
    return {"cutoff": cutoff.isoformat(), "dry_run": dry_run, **removed}
