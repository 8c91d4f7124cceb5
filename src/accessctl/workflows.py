"""Every durable workflow, transaction and the queue they run on.

A batch is filed in one transaction (``filing.py``): its ``batches`` row, one queued
``file_request`` workflow per request and one ``run_batch`` workflow that follows the batch
to its end. Each request writes exactly one ``accesses`` row or exactly one ``errors`` row,
in one database transaction that first looks for the request's row by its unique
``request_id``, so no replay ever writes twice. The provider call is the one DBOS step of a
request (so a replay does not call again). A provider attempt that must be retried enqueues the next attempt
itself, through the same rate-limited queue.

Workflows print nothing and return plain data. Importing this module registers the
functions with DBOS but touches no database: the runtime binds the engine and the
queue after launch (``bind``).
"""

from __future__ import annotations

import functools
import hashlib
import random
import time
import uuid
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

import sqlalchemy as sa
from dbos import DBOS, SetEnqueueOptions, SetWorkflowID, WorkflowStatusString

from accessctl.backend import for_engine
from accessctl.batch_state import WORKFLOW_ENDED, WORKFLOW_IN_FLIGHT
from accessctl.db import dbos_table, describe_db_error, sqlstate_of
from accessctl.models import (
    Access,
    AccessStatus,
    Batch,
    Error,
    User,
    UTCDateTime,
    access_status,
    utcnow,
)
from accessctl.pacing import FollowPace, pacer

if TYPE_CHECKING:
    from dbos import DBOSClient

    from accessctl.provider import ProviderConfig

# Requests: rate-limited and concurrency-limited, globally. Batches: unlimited; a batch
# workflow only fans out and waits.
QUEUE_NAME = "access-requests"
BATCH_QUEUE_NAME = "access-batches"
# Pinned, so that work left by a crash is recovered by the next release too. Bump it only
# when a workflow's steps change in a way an in-flight workflow could not replay.
WORKFLOW_VERSION = "accessctl-wf-3"

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
    state: NotRequired[str]  # batch_state.BatchState; absent from a follower's own result


class _Bound:
    """What the workflows need from the running process. Bound before DBOS launches (it
    may recover work at once)."""

    def __init__(
        self,
        engine: sa.Engine,
        poll_interval: float,
        provider: ProviderConfig | None,
        client: DBOSClient | None = None,
    ) -> None:
        self.engine = engine
        # Reads of DBOS's records from inside a workflow go through a client: DBOS would
        # checkpoint each of its own calls there as a step.
        self.client = client
        self.poll_interval = poll_interval
        self.provider = provider


_bound: _Bound | None = None


def bind(
    engine: sa.Engine,
    poll_interval: float,
    provider: ProviderConfig | None,
    client: DBOSClient | None = None,
) -> _Bound:
    """Give the workflows their engine, provider and DBOS client (called by the runtime
    before launch: queued work may start the moment DBOS is up)."""
    global _bound
    _bound = _Bound(engine, poll_interval, provider, client)
    return _bound


def unbind() -> None:
    global _bound
    _bound = None


def _runtime() -> _Bound:
    if _bound is None:
        raise RuntimeError("accessctl workflows ran before the runtime bound an engine")
    return _bound


def batch_workflow_id(batch_id: str) -> str:
    return f"batch-{batch_id}"


def request_workflow_id(batch_id: str, index: int) -> str:
    return f"req-{batch_id}-{index:07d}"


def invalid_input_id(batch_id: str, index: int) -> str:
    """The ``errors.request_id`` of a batch's refused input line, by its position."""
    return f"invalid-{batch_id}-{index:07d}"


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


# --- transactions (each one database transaction, keyed by the request's ID) --------------


def _lookup(
    conn: sa.Connection, request_id: str, user_id: str | None, batch_id: str | None = None
) -> tuple[str | None, bool, bool]:
    """(the request's outcome if it has its row, whether its user exists, whether its batch
    was cancelled), in one round trip. A request's outcome is keyed by its durable ID:
    whatever re-runs, it is written once."""
    recorded = sa.select(Access.id).where(Access.request_id == request_id).scalar_subquery()
    failed = sa.select(Error.id).where(Error.request_id == request_id).scalar_subquery()
    user = (
        sa.select(User.id).where(User.id == uuid.UUID(user_id)).scalar_subquery()
        if user_id is not None
        else sa.null()
    )
    cancelled = (
        sa.select(Batch.cancelled_at).where(Batch.id == uuid.UUID(batch_id)).scalar_subquery()
        if batch_id is not None
        else sa.null()
    )
    row = conn.execute(sa.select(recorded, failed, user, cancelled)).one()
    outcome = "recorded" if row[0] is not None else "failed" if row[1] is not None else None
    return outcome, row[2] is not None, row[3] is not None


def _add_error(conn: sa.Connection, request_id: str, batch_id: str, message: dict[str, Any]) -> str:
    conn.execute(
        sa.insert(Error).values(
            id=uuid.uuid4(),
            message=message,
            batch_id=uuid.UUID(batch_id),
            request_id=request_id,
            created_at=utcnow(),
        )
    )
    return "failed"


def _add_unknown_user(conn: sa.Connection, request_id: str, batch_id: str, user_id: str) -> str:
    message = error_message(
        batch_id=batch_id,
        request_id=request_id,
        user_id=user_id,
        error_class="UnknownUser",
        detail=f"no user with id {user_id}",
    )
    return _add_error(conn, request_id, batch_id, message)


CANCELLED_DETAIL = "the batch was cancelled before this request started"


def _add_cancelled(conn: sa.Connection, request_id: str, batch_id: str, user_id: str | None) -> str:
    message = error_message(
        batch_id=batch_id,
        request_id=request_id,
        user_id=user_id,
        error_class="Cancelled",
        detail=CANCELLED_DETAIL,
    )
    return _add_error(conn, request_id, batch_id, message)


def _single_statement(engine: sa.Engine) -> sa.Connection:
    """A connection whose every statement commits by itself (no BEGIN, no COMMIT)."""
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


@functools.cache
def _record_in_one_statement() -> sa.Select[Any]:
    """Postgres: look for the request's row, its user and its batch's cancellation, and
    insert its ``accesses`` row when it may, in one statement (one snapshot, so as one
    transaction): (recorded before, failed before, written now)."""
    from sqlalchemy.dialects.postgresql import insert

    rid = sa.bindparam("rid", type_=sa.String(120))
    uid = sa.bindparam("uid", type_=sa.Uuid)
    bid = sa.bindparam("bid", type_=sa.Uuid)
    now = sa.bindparam("now", type_=UTCDateTime)
    found = sa.select(
        sa.exists().where(Access.request_id == rid).label("recorded"),
        sa.exists().where(Error.request_id == rid).label("failed"),
        sa.exists().where(User.id == uid).label("known"),
        sa.exists().where(Batch.id == bid, Batch.cancelled_at.is_not(None)).label("cancelled"),
    ).cte("found")
    row = (
        sa.select(
            sa.bindparam("id", type_=sa.Uuid),
            uid,
            sa.cast(sa.bindparam("status"), access_status),
            rid,
            bid,
            now,
            now,
        )
        .select_from(found)
        .where(
            sa.not_(found.c.recorded),
            sa.not_(found.c.failed),
            found.c.known,
            sa.not_(sa.and_(found.c.cancelled, sa.bindparam("before_call", type_=sa.Boolean))),
        )
    )
    columns = ["id", "user_id", "status", "request_id", "batch_id", "created_at", "updated_at"]
    written = (
        insert(Access)
        .from_select(columns, row)
        .on_conflict_do_nothing(index_elements=["request_id"])
        .returning(Access.id)
        .cte("written")
    )
    return sa.select(found.c.recorded, found.c.failed, sa.exists(sa.select(written.c.id)))


def _record_access(
    request_id: str,
    batch_id: str,
    user_id: str,
    status: str = AccessStatus.REQUESTED.value,
    *,
    before_call: bool = True,
) -> str:
    """File one request: an ``accesses`` row, or an ``errors`` row for an unknown user (or
    for a cancelled batch, when nothing was called yet).

    On Postgres the usual case (a known user, no row yet) is one statement in autocommit:
    one round trip instead of four (BEGIN, the lookup, the insert, COMMIT), which is most
    of a request's own database time (BENCHMARKS.md, #17). Anything else it leaves to the
    transaction below."""
    engine = _runtime().engine
    if for_engine(engine).single_statement_requests:
        params = {
            "rid": request_id,
            "uid": uuid.UUID(user_id),
            "bid": uuid.UUID(batch_id),
            "id": uuid.uuid4(),
            "status": AccessStatus(status).value,
            "now": utcnow(),
            "before_call": before_call,
        }
        with _single_statement(engine) as conn:
            recorded, failed, written = conn.execute(_record_in_one_statement(), params).one()
        if written or recorded:
            return "recorded"
        if failed:
            return "failed"
        # An unknown user, a cancelled batch, or another execution's row just written:
        # the transaction below decides, as it always did.
    with engine.begin() as conn:
        existing, user_exists, cancelled = _lookup(conn, request_id, user_id, batch_id)
        if existing is not None:
            return existing
        if cancelled and before_call:
            return _add_cancelled(conn, request_id, batch_id, user_id)
        if not user_exists:
            return _add_unknown_user(conn, request_id, batch_id, user_id)
        now = utcnow()
        conn.execute(
            sa.insert(Access).values(
                id=uuid.uuid4(),
                user_id=uuid.UUID(user_id),
                status=AccessStatus(status),
                request_id=request_id,
                batch_id=uuid.UUID(batch_id),
                created_at=now,
                updated_at=now,
            )
        )
        return "recorded"


def _record_error(request_id: str, batch_id: str, message: dict[str, Any]) -> str:
    with _runtime().engine.begin() as conn:
        existing, _, _ = _lookup(conn, request_id, None)
        return existing or _add_error(conn, request_id, batch_id, message)


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
    its row, ``"failed"`` (with its row) for an unknown user or a cancelled batch, else
    ``"ready"``. On Postgres the usual answers (its row, or ready) take one read in
    autocommit, not a transaction of three round trips; only a row to write takes one."""
    engine = _runtime().engine
    if for_engine(engine).single_statement_requests:
        with _single_statement(engine) as conn:
            existing, user_exists, cancelled = _lookup(conn, request_id, user_id, batch_id)
        if existing is not None:
            return existing
        if user_exists and not cancelled:
            return "ready"
    with engine.begin() as conn:
        existing, user_exists, cancelled = _lookup(conn, request_id, user_id, batch_id)
        if existing is not None:
            return existing
        if cancelled:
            return _add_cancelled(conn, request_id, batch_id, user_id)
        return "ready" if user_exists else _add_unknown_user(conn, request_id, batch_id, user_id)


def _attempt_state(workflow_id: str) -> tuple[float, bool]:
    """How long ago the limiter admitted this attempt, on the database's clock (the one
    DBOS stamps starts with, so hosts' clock skew does not matter), and whether this
    execution still owns the workflow: once another executor has adopted it (after this
    process lost its lease), DBOS refuses this execution's writes, but not its calls."""
    from accessctl.lease import execution_token

    engine = _runtime().engine
    now_ms = (
        "CAST(strftime('%s','now') * 1000 AS INTEGER)"
        if engine.dialect.name == "sqlite"
        else "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    )
    sql = (
        f"SELECT {now_ms} - started_at_epoch_ms, owner_xid, status "
        f"FROM {dbos_table(engine)} WHERE workflow_uuid = :w"
    )
    with engine.connect() as conn:
        row = conn.execute(sa.text(sql), {"w": workflow_id}).one_or_none()
    if row is None:
        return 0.0, False
    owned = row[2] == "PENDING" and row[1] is not None and row[1] == execution_token(workflow_id)
    return (row[0] or 0) / 1000, owned


@DBOS.step(name="accessctl.call_provider")
def call_provider_step(
    request_id: str, user_id: str, batch_id: str, idempotency_key: str | None = None
) -> dict[str, Any]:
    """One provider call: a checkpointed step, so a replay does not call again. Its result
    is redacted by ``call_provider`` before DBOS stores it.

    The limiter admits *starts*; the provider sees *calls*. The queue's window is widened
    by ``call_slack`` and a call is only made within ``call_slack`` of its start, so any
    window of the configured period at the provider holds at most L calls. An attempt
    that comes too late does not call: it goes back through the queue (``"late"``)."""
    from accessctl.lease import lease_confirmed
    from accessctl.provider import call_provider

    late = {"outcome": "late", "http_status": None, "retry_after": None, "detail": ""}
    if not lease_confirmed():
        # Our executor lease is lost (a database restart, a severed connection): another
        # process may be about to adopt this very request, so calling now could call
        # twice. Not calling spends no provider attempt; the next try goes through the
        # queue again (docs/operations.md, "Executors and leases").
        return late
    provider = _runtime().provider
    assert provider is not None
    workflow_id = DBOS.workflow_id
    assert workflow_id is not None
    # Half the slack at the check leaves the other half for the call to reach the
    # provider (a busy host can pause a thread between the check and the send). The
    # lease is checked again: reading the start time may have waited on the database.
    try:
        since_start, owned = _attempt_state(workflow_id)
    except Exception as exc:
        if not is_transient(exc):
            raise
        return late  # the database is away (a restart): no telling whether it is in time
    if since_start > provider.call_slack / 2 or not owned or not lease_confirmed():
        # Not owned: an adopter runs this request now; DBOS will not record this answer.
        return late
    return call_provider(
        provider,
        request_id=request_id,
        user_id=user_id,
        batch_id=batch_id,
        idempotency_key=idempotency_key,
    )


def _run_tx(transaction: Any, *args: Any) -> Any:
    """Run one request transaction, retried here on transient database faults (with
    backoff); any other error is raised. Not a DBOS step, on purpose: the transaction
    looks for its request's row first, so running it again on a replay finds the row and
    writes nothing, and recording it as a step would cost two more round trips and a
    fifth of a worker's time per request (BENCHMARKS.md). For the same reason the backoff
    is a plain sleep: a replay simply tries again. The sleeps are jittered (full jitter),
    so the requests a database restart interrupted together do not retry in lockstep, and
    there is none after the last attempt."""
    for attempt in range(TRANSIENT_ATTEMPTS):
        try:
            return transaction(*args)
        except Exception as exc:
            if not is_transient(exc) or attempt == TRANSIENT_ATTEMPTS - 1:
                raise
            time.sleep(transient_backoff(attempt, random.random()))
    raise AssertionError("unreachable: the last attempt returns or raises")


def transient_backoff(attempt: int, jitter: float) -> float:
    """Seconds before retrying a transaction after ``attempt`` (0-based) failed, with
    ``jitter`` in [0, 1): between half and all of 0.5 s * 2**attempt."""
    return float(TRANSIENT_BACKOFF_SEC * 2**attempt * (0.5 + jitter / 2))


def _database_failure(
    request_id: str,
    batch_id: str,
    user_id: str,
    exc: BaseException,
    idempotency_key: str | None = None,
) -> str:
    message = error_message(
        batch_id=batch_id,
        request_id=request_id,
        user_id=user_id,
        error_class=type(exc).__name__ if not is_transient(exc) else "TransientRetriesExhausted",
        detail=describe_db_error(exc, url=_runtime().engine.url),
        sqlstate=sqlstate_of(exc),
        **_key_field(idempotency_key),
    )
    return str(_record_error(request_id, batch_id, message))


def _key_field(idempotency_key: str | None) -> dict[str, str]:
    """An errors row's record of the key its provider calls carried, when that was not
    its own request ID (a retry of a request the provider may have acted on), so that a
    retry of this retry still presents the very first key (``queries.failed_requests``)."""
    return {"idempotency_key": idempotency_key} if idempotency_key else {}


def _jitter(request_id: str, attempt: int) -> float:
    """Deterministic jitter in [0, 1): a replay schedules the same retry."""
    digest = hashlib.sha256(f"{request_id}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def _enqueue_next(
    batch_id: str,
    user_id: str,
    request_id: str,
    attempt: int,
    retry: dict[str, float],
    tries: int,
    waited: float,
    delay: float,
    idempotency_key: str | None,
) -> None:
    """Send this request through the rate-limited queue again, as a new workflow (each
    try has its own ID; the request keeps ``request_id``). Enqueuing is a checkpointed
    step of this workflow, so a replay does not enqueue twice."""
    options = SetEnqueueOptions(delay_seconds=delay) if delay > 0 else SetEnqueueOptions()
    with SetWorkflowID(f"{request_id}.t{tries + 1}"), options:
        DBOS.enqueue_workflow(
            QUEUE_NAME,
            file_request,
            batch_id,
            user_id,
            request_id,
            attempt,
            retry,
            tries + 1,
            waited,
            # Appended only when set: the stored inputs of an ordinary request stay as
            # they were, and a request the previous release queued replays as it was.
            *((idempotency_key,) if idempotency_key else ()),
        )
    if delay > 0:
        pacer().due_in(delay)  # stay awake for it, however idle this process is by then


def _provider_attempt(
    batch_id: str,
    user_id: str,
    rid: str,
    attempt: int,
    retry: dict[str, float],
    tries: int,
    waited: float,
    idempotency_key: str | None,
) -> str:
    """One provider attempt: its outcome, or ``"requeued"`` once the next try is queued."""
    from accessctl.provider import backoff_seconds

    state = _run_tx(_check_request, rid, batch_id, user_id)
    if state != "ready":
        return str(state)
    answer: dict[str, Any] = call_provider_step(rid, user_id, batch_id, idempotency_key)
    outcome = answer["outcome"]
    if outcome in ("approved", "rejected", "requested"):
        # The provider acted: its answer is recorded even if the batch was cancelled since.
        return str(
            _run_tx(
                functools.partial(_record_access, before_call=False),
                rid,
                batch_id,
                user_id,
                outcome,
            )
        )
    if outcome == "late":
        # Admitted but not called in time: no provider attempt was spent.
        _enqueue_next(batch_id, user_id, rid, attempt, retry, tries, waited, 0.0, idempotency_key)
        return "requeued"
    if outcome == "transient":
        delay = backoff_seconds(attempt, answer.get("retry_after"), _jitter(rid, attempt))
        if attempt < retry["max_attempts"] and waited + delay <= retry["deadline"]:
            _enqueue_next(
                batch_id,
                user_id,
                rid,
                attempt + 1,
                retry,
                tries,
                waited + delay,
                delay,
                idempotency_key,
            )
            return "requeued"
        error_class = "ProviderUnavailable"
        detail = f"gave up after {attempt} attempt(s): {answer.get('detail') or 'no answer'}"
    else:  # "refused"
        error_class, detail = "ProviderRefused", answer["detail"]
    message = error_message(
        batch_id=batch_id,
        request_id=rid,
        user_id=user_id,
        error_class=error_class,
        detail=detail,
        http_status=answer.get("http_status"),
        attempt=attempt,
        **_key_field(idempotency_key),
    )
    return str(_run_tx(_record_error, rid, batch_id, message))


@DBOS.workflow(name="accessctl.file_request", max_recovery_attempts=MAX_RECOVERY_ATTEMPTS)
def file_request(
    batch_id: str,
    user_id: str,
    request_id: str | None = None,
    attempt: int = 1,
    retry: dict[str, float] | None = None,
    tries: int = 1,
    waited: float = 0.0,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """One try at one access request; this is what the rate limiter admits.

    Without a provider it records the request. With one, it calls the provider once and
    records the outcome, or queues the next try (``"requeued"``). ``request_id`` is the
    request's durable ID (the first try's workflow ID): its idempotency key and its row's
    key. ``retry`` (``max_attempts``, ``deadline`` seconds) was fixed when the batch was
    filed, so every replay decides alike; ``waited`` is the backoff spent so far.
    ``idempotency_key``, when set, is the key of the earlier request this one re-files
    (``accessctl retry``): its calls carry that key, while its row keeps ``request_id``.
    It is the last parameter and optional, so inputs stored by earlier releases replay."""
    rid = request_id or DBOS.workflow_id
    assert rid is not None
    policy = retry or {"max_attempts": 1, "deadline": 0.0}
    try:
        if _runtime().provider is None:
            return {"outcome": _run_tx(_record_access, rid, batch_id, user_id)}
        outcome = _provider_attempt(
            batch_id, user_id, rid, attempt, policy, tries, waited, idempotency_key
        )
        return {"outcome": outcome, "attempt": attempt}
    except Exception as exc:
        from sqlalchemy.exc import DBAPIError

        if not isinstance(exc, DBAPIError):
            raise
        return {"outcome": _database_failure(rid, batch_id, user_id, exc, idempotency_key)}


# A batch whose count has not moved for this long is checked for requests that ended
# without an outcome (a cancelled request workflow, or one that failed outside the
# database), so it records them as failed instead of waiting forever.
STALL_CHECK_SEC = 5.0


def outcome_counts(engine: sa.Engine, batch_id: str) -> tuple[int, int]:
    """(recorded, failed) so far: the batch's ``accesses`` and ``errors`` rows."""
    bid = uuid.UUID(batch_id)
    with engine.connect() as conn:
        recorded = conn.scalar(sa.select(sa.func.count()).where(Access.batch_id == bid))
        failed = conn.scalar(sa.select(sa.func.count()).where(Error.batch_id == bid))
    return int(recorded or 0), int(failed or 0)


def record_outcome(engine: sa.Engine, batch_id: str) -> tuple[int, int, str]:
    """Store a batch's outcome in its ``batches`` row, once: (recorded, failed, state).
    Written when the batch ends (and by prune before it removes anything the counts are
    read from), so its report survives pruning. Running it again changes nothing."""
    from accessctl.batch_state import BatchState

    bid = uuid.UUID(batch_id)
    with engine.begin() as conn:
        row = conn.execute(
            sa.select(
                Batch.total, Batch.recorded, Batch.failed, Batch.state, Batch.cancelled_at
            ).where(Batch.id == bid)
        ).one()
        if row.state is not None:
            return int(row.recorded or 0), int(row.failed or 0), str(row.state)
        recorded = int(conn.scalar(sa.select(sa.func.count()).where(Access.batch_id == bid)) or 0)
        failed = int(conn.scalar(sa.select(sa.func.count()).where(Error.batch_id == bid)) or 0)
        if row.cancelled_at is not None:
            state = BatchState.CANCELLED
        elif recorded + failed >= row.total:
            state = BatchState.DONE
        else:
            state = BatchState.FAILED
        conn.execute(
            sa.update(Batch)
            .where(Batch.id == bid, Batch.state.is_(None))
            .values(recorded=recorded, failed=failed, state=str(state), finished_at=utcnow())
        )
    return recorded, failed, str(state)


def requests_in_flight(engine: sa.Engine, batch_id: str) -> int:
    """Request workflows of this batch still queued, delayed or running. Once every row is
    written this is usually none; a try cut off by a crash after writing its row is still
    PENDING until an executor adopts it, and the batch waits for it, so a finished batch
    leaves no work behind. Rides DBOS's in-flight index (queue, status)."""
    table = dbos_table(engine)
    sql = sa.text(
        f"SELECT count(*) FROM {table} WHERE queue_name = :q "
        "AND status IN :s AND workflow_uuid LIKE :p"
    ).bindparams(sa.bindparam("s", expanding=True))
    with engine.connect() as conn:
        return int(
            conn.scalar(
                sql, {"q": QUEUE_NAME, "s": sorted(WORKFLOW_IN_FLIGHT), "p": f"req-{batch_id}-%"}
            )
            or 0
        )


def _record_ended_requests(engine: sa.Engine, batch_id: str, *, early: bool = False) -> int:
    """Give every request of this batch whose last try ended (cancelled, failed) without
    a row its ``errors`` row; returns how many it recorded. Keyed by request ID like every
    request row, so running it twice records nothing twice. ``early`` (nothing in flight,
    before the stall check): not for a cancelled batch, whose rows ``cancel`` is writing."""
    client = _runtime().client
    assert client is not None
    with engine.connect() as conn:
        cancelled = conn.scalar(
            sa.select(Batch.cancelled_at).where(Batch.id == uuid.UUID(batch_id))
        )
    if early and cancelled is not None:
        return 0
    ended = client.list_workflows(
        workflow_id_prefix=f"req-{batch_id}-",
        status=sorted(WORKFLOW_ENDED - {WorkflowStatusString.SUCCESS.value}),
        name="accessctl.file_request",  # not the queue: cancelling takes a workflow off it
        load_input=True,
        load_output=False,
    )
    recorded = 0
    for workflow in ended:
        args = list(workflow.input["args"]) if workflow.input else []
        user_id = args[1] if len(args) > 1 else None
        rid = args[2] if len(args) > 2 and args[2] else workflow.workflow_id
        key = args[7] if len(args) > 7 and isinstance(args[7], str) else None
        message = error_message(
            batch_id=batch_id,
            request_id=rid,
            user_id=user_id,
            error_class="Cancelled" if cancelled is not None else "RequestEnded",
            detail=f"request workflow {workflow.workflow_id} ended {workflow.status} "
            "without recording an outcome",
            **_key_field(key),
        )
        with engine.begin() as conn:
            existing, _, _ = _lookup(conn, rid, None)
            if existing is None:
                _add_error(conn, rid, batch_id, message)
                recorded += 1
    return recorded


@DBOS.workflow(name="accessctl.run_batch", max_recovery_attempts=MAX_RECOVERY_ATTEMPTS)
def run_batch(batch_id: str, key: str | None, total: int) -> Summary:
    """Follow one filed batch to its end and return its summary.

    Its requests were filed with it and run on their own; this workflow only counts
    their rows, so it does nothing a replay could repeat. Its status is the batch's:
    ``status``, ``batches`` and ``prune`` read it."""
    rt = _runtime()
    engine = rt.engine
    last_done, quiet_since = -1, time.monotonic()
    pace = FollowPace(follow_interval(rt.poll_interval, total))
    changed, looked_early = True, False
    while True:
        try:
            recorded, failed = outcome_counts(engine, batch_id)
            if recorded + failed >= total and not requests_in_flight(engine, batch_id):
                recorded, failed, _ = record_outcome(engine, batch_id)
                return {
                    "batch_id": batch_id,
                    "key": key,
                    "total": total,
                    "recorded": recorded,
                    "failed": failed,
                }
            # Every row written: only in-flight tries are awaited now, and soon.
            changed = recorded + failed != last_done or recorded + failed >= total
            if changed:
                last_done, quiet_since = recorded + failed, time.monotonic()
                looked_early = False
            elif time.monotonic() - quiet_since > STALL_CHECK_SEC:
                _record_ended_requests(engine, batch_id)
                quiet_since = time.monotonic()
            elif not looked_early:
                # Once per quiet spell (a batch held by its window costs no more reads):
                # rows missing and nothing left to write them (a try queues its next one
                # before it ends) means an operator cancelled a request. Look now.
                looked_early = True
                if not requests_in_flight(engine, batch_id):
                    _record_ended_requests(engine, batch_id, early=True)
        except Exception as exc:
            # A lost connection or a restarting database: read again at the next turn.
            if not is_transient(exc):
                raise
        time.sleep(pace.after(changed))


def follow_interval(poll_interval: float, total: int) -> float:
    """How often a batch's counts are read: the poll interval for small batches, up to a
    second for the largest, where each count reads more rows and a second is nothing."""
    return min(1.0, max(poll_interval, total / 100_000))
