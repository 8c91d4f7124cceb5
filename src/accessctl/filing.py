"""Filing a batch: one database transaction, whatever its size.

The transaction writes the ``batches`` row, an ``errors`` row per refused input line, the
batch's own workflow (which follows the batch to its end) and one queued ``file_request``
workflow per request. A run killed while filing leaves the whole batch or none of it, and
the queue can admit a full window of requests the moment the transaction commits.

The workflow rows are DBOS's own: statuses are built by ``DBOSClient`` exactly as for
``enqueue`` and written as DBOS's bulk enqueue (``SystemDatabase.init_workflows``, which
its Kafka consumer uses) writes them, inside our transaction (pinned to dbos 3.4, like the
other two hooks in runtime.py and db.py). Rows go in chunks, so memory stays flat as
batches grow.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from accessctl.errors import UsageError
from accessctl.models import Batch, Error, utcnow
from accessctl.workflows import (
    BATCH_QUEUE_NAME,
    QUEUE_NAME,
    WORKFLOW_VERSION,
    batch_workflow_id,
    error_message,
    invalid_input_id,
    request_workflow_id,
)

if TYPE_CHECKING:
    from dbos import DBOSClient

    from accessctl.batches import BatchRequest

# Requests per INSERT round: DBOS inserts 500 rows a statement; a few statements per round
# keep the built rows (the only thing held in memory) small.
CHUNK = 2000


def _insert_workflows(
    client: DBOSClient, conn: sa.Connection, statuses: list[Any], created_ms: int
) -> None:
    """Write ENQUEUED workflow rows (status and inputs) the way DBOS 3.4's bulk enqueue
    (``SystemDatabase.init_workflows``) does, but in our transaction and as one compiled
    statement executed for many rows: DBOS's multi-row VALUES statement is compiled anew
    for every 500 rows, which made it 10-40x slower (BENCHMARKS.md). Partition keys,
    deduplication and sharding are not used here, which is what lets the row be this
    simple. Every row of a batch carries the same ``created_ms``: the batch was filed at
    one moment (its requests then start in no particular order, which nothing needs)."""
    sys_db = client._sys_db
    tables = sys_db.tables
    now_ms = created_ms
    conn.execute(
        sa.insert(tables.workflow_status),
        [
            {
                "workflow_uuid": s["workflow_uuid"],
                "status": s["status"],
                "name": s["name"],
                "class_name": s["class_name"],
                "config_name": s["config_name"],
                "executor_id": s["executor_id"],
                "application_version": s["app_version"],
                "application_id": s["app_id"],
                "authenticated_user": s["authenticated_user"],
                "authenticated_roles": s["authenticated_roles"],
                "assumed_role": s["assumed_role"],
                "queue_name": s["queue_name"],
                "recovery_attempts": 0,
                "workflow_timeout_ms": s["workflow_timeout_ms"],
                "workflow_deadline_epoch_ms": s["workflow_deadline_epoch_ms"],
                "deduplication_id": None,
                "priority": s["priority"],
                "serialization": s["serialization"],
                "queue_partition_key": None,
                "parent_workflow_id": None,
                "creator_xid": None,
                "delay_until_epoch_ms": s["delay_until_epoch_ms"],
                "attributes": s["attributes"],
                "schedule_name": None,
                "application_name": s["application_name"],
                "created_at": now_ms,
                "updated_at": now_ms,
            }
            for s in statuses
        ],
    )
    conn.execute(
        sa.insert(tables.workflow_input),
        [
            {
                "workflow_uuid": s["workflow_uuid"],
                "inputs": s["inputs"],
                "retention_timestamp": now_ms,
            }
            for s in statuses
        ],
    )


def _status(client: DBOSClient, queue: str, workflow: str, workflow_id: str, *args: Any) -> Any:
    _, status = client._build_enqueue_status(
        {
            "queue_name": queue,
            "workflow_name": workflow,
            "workflow_id": workflow_id,
            "app_version": WORKFLOW_VERSION,
        },
        *args,
    )
    return status


@contextlib.contextmanager
def _write_transaction(client: DBOSClient) -> Iterator[sa.Connection]:
    with client._sys_db.engine.connect() as conn, conn.begin():
        if conn.dialect.name == "sqlite":
            # Take the write lock first: a read-then-write transaction on SQLite fails
            # instead of waiting when another writer got in between.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield conn


def _attach_to_existing(conn: sa.Connection, request: BatchRequest) -> bool:
    """True if ``request``'s batch was already filed and may be attached to: the same key
    with the same input. The same key with other input is refused (exit 2), naming the
    batch; a batch filed before digests were kept (0.2.0) attaches as it did then."""
    row = conn.execute(
        sa.select(Batch.total, Batch.input_digest).where(Batch.id == uuid.UUID(request.batch_id))
    ).first()
    if row is None:
        return False
    if row.input_digest is not None and row.input_digest != request.input_digest():
        raise UsageError(
            f"key {request.key!r} already names batch {request.batch_id} "
            f"({row.total} request(s)), filed with other input; the same key must come with "
            "the same input: use another key for this one"
        )
    return True


def file_batch(client: DBOSClient, request: BatchRequest, retry: dict[str, float]) -> bool:
    """File ``request`` atomically; False if its batch was already filed (same key, or a
    concurrent run with the same key won the race): then there is nothing to do but follow
    it. ``retry`` is the provider retry policy, fixed into every request at filing."""
    bid = uuid.UUID(request.batch_id)
    total = len(request.user_ids) + len(request.invalid)
    created_ms = int(time.time() * 1000)
    try:
        with _write_transaction(client) as conn:
            if _attach_to_existing(conn, request):
                return False
            conn.execute(
                sa.insert(Batch).values(
                    id=bid,
                    key=request.key,
                    total=total,
                    retry_of=uuid.UUID(request.retry_of) if request.retry_of else None,
                    input_digest=request.input_digest(),
                    created_at=utcnow(),
                )
            )
            _insert_refused(conn, request)
            _insert_workflows(
                client,
                conn,
                [
                    _status(
                        client,
                        BATCH_QUEUE_NAME,
                        "accessctl.run_batch",
                        batch_workflow_id(request.batch_id),
                        request.batch_id,
                        request.key,
                        total,
                    )
                ],
                created_ms,
            )
            keys = request.idempotency_keys
            for start in range(0, len(request.user_ids), CHUNK):
                statuses = [
                    _status(
                        client,
                        QUEUE_NAME,
                        "accessctl.file_request",
                        request_workflow_id(request.batch_id, index),
                        request.batch_id,
                        user_id,
                        None,
                        1,
                        retry,
                        # A retried request's original key (file_request's last parameter),
                        # only when it has one: other requests' inputs are as before.
                        *((1, 0.0, keys[index]) if keys and keys[index] else ()),
                    )
                    for index, user_id in enumerate(
                        request.user_ids[start : start + CHUNK], start=start
                    )
                ]
                _insert_workflows(client, conn, statuses, created_ms)
        return True
    except IntegrityError:
        # A concurrent run with the same key committed the batch first: attach to it.
        with client._sys_db.engine.connect() as conn:
            if not _attach_to_existing(conn, request):
                raise
        return False


def _insert_refused(conn: sa.Connection, request: BatchRequest) -> None:
    """The batch's refused input lines, recorded with it (keyed by position in its input:
    two sources can share a line number)."""
    rows: list[dict[str, Any]] = []
    for index, item in enumerate(request.invalid):
        message = error_message(
            batch_id=request.batch_id,
            request_id=None,
            user_id=None,
            error_class="InvalidUserId",
            detail=item.reason,
            input=item.text[:200],
            line=item.line,
        )
        rows.append(
            {
                "id": uuid.uuid4(),
                "message": message,
                "batch_id": uuid.UUID(request.batch_id),
                "request_id": invalid_input_id(request.batch_id, index),
                "created_at": utcnow(),
            }
        )
    for start in range(0, len(rows), CHUNK):
        conn.execute(sa.insert(Error), rows[start : start + CHUNK])
