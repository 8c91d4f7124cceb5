"""Filing a batch: one database transaction, whatever its size.

The transaction writes the ``batches`` row, an ``errors`` row per refused input line, the
batch's own workflow (which follows the batch to its end) and one queued ``file_request``
workflow per request. A run killed while filing leaves the whole batch or none of it, and
the queue can admit a full window of requests the moment the transaction commits.

The workflows are enqueued inside our transaction: through DBOS's public
``enqueue_in_transaction`` for a small batch, and for a large one as DBOS's own rows
written in bulk (``dbos_compat.bulk_enqueue``), in chunks, so memory stays flat as batches
grow.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from accessctl.backend import for_engine
from accessctl.dbos_compat import build_enqueue_status, bulk_enqueue
from accessctl.exceptions import UsageError
from accessctl.models import Batch, Error, utcnow
from accessctl.pacing import pacer
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
# Up to this many workflows a batch is enqueued through DBOS's public API, one call each;
# above it, in bulk (dbos_compat.bulk_enqueue; BENCHMARKS.md, "Filing").
BULK_THRESHOLD = 500


def _enqueue(
    client: DBOSClient,
    conn: sa.Connection,
    jobs: list[tuple[str, str, str, tuple[Any, ...]]],
    created_ms: int,
) -> None:
    """Enqueue ``(queue, workflow name, workflow ID, args)`` jobs inside ``conn``'s
    transaction: through DBOS's public ``enqueue_in_transaction`` for a small batch, and
    above ``BULK_THRESHOLD`` as DBOS's own rows in one executemany (dbos_compat.py: the
    rows are the same, a test compares them column by column)."""
    if len(jobs) <= BULK_THRESHOLD:
        for queue, name, workflow_id, args in jobs:
            client.enqueue_in_transaction(
                conn,
                {
                    "queue_name": queue,
                    "workflow_name": name,
                    "workflow_id": workflow_id,
                    "app_version": WORKFLOW_VERSION,
                },
                *args,
            )
        return
    statuses = [
        build_enqueue_status(client, queue, name, workflow_id, WORKFLOW_VERSION, *args)
        for queue, name, workflow_id, args in jobs
    ]
    bulk_enqueue(client, conn, statuses, created_ms)


@contextlib.contextmanager
def _write_transaction(engine: sa.Engine) -> Iterator[sa.Connection]:
    with engine.connect() as conn, conn.begin():
        # Take SQLite's write lock first: a read-then-write transaction there fails
        # instead of waiting when another writer got in between.
        for_engine(conn).begin_write(conn)
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


def file_batch(
    client: DBOSClient, engine: sa.Engine, request: BatchRequest, retry: dict[str, float]
) -> bool:
    """File ``request`` atomically; False if its batch was already filed (same key, or a
    concurrent run with the same key won the race): then there is nothing to do but follow
    it. ``retry`` is the provider retry policy, fixed into every request at filing."""
    bid = uuid.UUID(request.batch_id)
    total = len(request.user_ids) + len(request.invalid)
    created_ms = int(time.time() * 1000)
    try:
        with _write_transaction(engine) as conn:
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
            follower = (
                BATCH_QUEUE_NAME,
                "accessctl.run_batch",
                batch_workflow_id(request.batch_id),
                (request.batch_id, request.key, total),
            )
            keys = request.idempotency_keys
            requests = (
                (
                    QUEUE_NAME,
                    "accessctl.file_request",
                    request_workflow_id(request.batch_id, index),
                    (
                        request.batch_id,
                        user_id,
                        None,
                        1,
                        retry,
                        # A retried request's original key (file_request's last parameter),
                        # only when it has one: other requests' inputs are as before.
                        *((1, 0.0, keys[index]) if keys and keys[index] else ()),
                    ),
                )
                for index, user_id in enumerate(request.user_ids)
            )
            if total <= BULK_THRESHOLD:
                _enqueue(client, conn, [follower, *requests], created_ms)
            else:
                _enqueue(client, conn, [follower], created_ms)
                # In chunks, so the built rows (all that is held in memory) stay few.
                while chunk := list(itertools.islice(requests, CHUNK)):
                    _enqueue(client, conn, chunk, created_ms)
            for_engine(conn).announce_work(conn)
        pacer().wake()  # this process's own loops, if it executes
        return True
    except IntegrityError:
        # A concurrent run with the same key committed the batch first: attach to it.
        with engine.connect() as conn:
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
