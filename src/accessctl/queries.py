"""Read-only queries: errors, batch status, users. Plain data out; no DBOS launch.

Every filter and sort here rides an index (see models.py).
"""

from __future__ import annotations

import functools
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from accessctl.db import dbos_table
from accessctl.exceptions import UsageError
from accessctl.models import Access, Batch, Error, User

_RELATIVE = re.compile(r"(\d{1,12})\s*([smhdw])", re.ASCII)
# A LIMIT larger than a signed 64-bit integer overflows both drivers; nobody needs more.
MAX_LIMIT = 2**63 - 1
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None, *, option: str = "--since") -> datetime:
    """``30m``, ``2h``, ``7d`` ago, or an ISO date/time (UTC when no zone is given).
    ``option`` names the flag in errors."""
    now = now or datetime.now(UTC)
    value = text.strip()
    match = _RELATIVE.fullmatch(value)
    if match:
        try:
            return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        except OverflowError:
            raise UsageError(f"{option} {text[:40]!r} reaches back too far") from None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"{option} {text[:40]!r} is not a duration (30m, 2h, 7d) or an ISO date/time"
        ) from None
    # An offset means that instant: compared in UTC on both backends (models.UTCDateTime).
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_uuid(text: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        raise UsageError(f"{what} {text[:40]!r} is not a UUID") from None


def iso_utc(value: datetime) -> str:
    return (value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def list_errors(
    engine: sa.Engine, *, batch: str | None, since: str | None, limit: int
) -> list[dict[str, Any]]:
    """Recorded failures, newest first."""
    if limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    limit = min(limit, MAX_LIMIT)
    query = sa.select(Error.id, Error.created_at, Error.message)
    if batch is not None:
        from accessctl.idprefix import resolve_with

        query = query.where(Error.batch_id == resolve_with(engine, Batch.id, batch, "--batch"))
    if since is not None:
        query = query.where(Error.created_at >= parse_since(since))
    query = query.order_by(Error.created_at.desc(), Error.id.desc()).limit(limit)
    with engine.connect() as conn:
        return [
            {"id": str(row.id), "created_at": iso_utc(row.created_at), "message": row.message}
            for row in conn.execute(query)
        ]


def list_users(engine: sa.Engine, *, limit: int) -> list[dict[str, Any]]:
    query = sa.select(User.id, User.name, User.email, User.created_at).order_by(
        User.created_at.desc(), User.id
    )
    with engine.connect() as conn:
        return [
            {
                "id": str(row.id),
                "name": row.name,
                "email": row.email,
                "created_at": iso_utc(row.created_at),
            }
            for row in conn.execute(query.limit(min(limit, MAX_LIMIT)))
        ]


def batch_status(engine: sa.Engine, batch_id: str | None) -> dict[str, Any]:
    """Progress and outcome of one batch (the newest when ``batch_id`` is None)."""
    from accessctl.idprefix import resolve_with

    only = resolve_with(engine, Batch.id, batch_id, "batch ID") if batch_id is not None else None
    found = list_batches(engine, limit=1, only=only)
    if not found:
        raise UsageError(f"no batch with ID {only}" if only else "no batch has been filed yet")
    batch = found[0]
    return {**batch, "done": batch["recorded"] + batch["failed"]}


def list_batches(
    engine: sa.Engine, *, limit: int, only: uuid.UUID | None = None
) -> list[dict[str, Any]]:
    """Recent batches (or just ``only``), newest first, with outcome counts and state
    (batch_state.py). A batch that ended reports the outcome stored with it."""
    from accessctl.batch_state import WORKFLOW_IN_FLIGHT, WORKFLOW_WAITING, batch_state
    from accessctl.lease import any_executor_alive, executors_alive
    from accessctl.workflows import batch_workflow_id, requests_in_flight

    if limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    with engine.connect() as conn:
        query = sa.select(
            Batch.id,
            Batch.key,
            Batch.created_at,
            Batch.total,
            Batch.retry_of,
            Batch.recorded,
            Batch.failed,
            Batch.state,
            Batch.cancelled_at,
        )
        if only is not None:
            query = query.where(Batch.id == only)
        batches = conn.execute(
            query.order_by(Batch.created_at.desc(), Batch.id).limit(min(limit, MAX_LIMIT))
        ).all()
        # Counted only for the batches still going: an ended batch stored its outcome.
        ids = [b.id for b in batches if b.state is None]
        recorded = dict(
            conn.execute(
                sa.select(Access.batch_id, sa.func.count())
                .where(Access.batch_id.in_(ids))
                .group_by(Access.batch_id)
            ).all()
        )
        failed = dict(
            conn.execute(
                sa.select(Error.batch_id, sa.func.count())
                .where(Error.batch_id.in_(ids))
                .group_by(Error.batch_id)
            ).all()
        )
    table = dbos_table(engine)
    workflow_ids = [batch_workflow_id(str(b)) for b in ids]
    stmt = sa.text(
        f"SELECT workflow_uuid, status, executor_id FROM {table} WHERE workflow_uuid IN :ids"
    ).bindparams(sa.bindparam("ids", expanding=True))
    with engine.connect() as conn:
        workflows = (
            {str(r[0]): (str(r[1]), r[2]) for r in conn.execute(stmt, {"ids": workflow_ids})}
            if ids
            else {}
        )
    alive = executors_alive(
        engine, {str(e) for s, e in workflows.values() if s == "PENDING" and e is not None}
    )
    # Asked once, and only where it decides: a batch started but not yet followed.
    anyone_executing = functools.cache(lambda: any_executor_alive(engine))
    result = []
    for b in batches:
        if b.state is not None:
            counts = (b.recorded or 0, b.failed or 0)
        else:
            counts = (recorded.get(b.id, 0), failed.get(b.id, 0))
        status, executor = workflows.get(batch_workflow_id(str(b.id)), (None, None))
        complete = sum(counts) >= b.total
        ended = status is None or status not in WORKFLOW_IN_FLIGHT
        state = batch_state(
            stored=b.state,
            complete=complete,
            cancelled=b.cancelled_at is not None,
            follower_status=status,
            follower_alive=alive.get(str(executor)) if executor else None,
            # Only asked where it decides: nobody follows the batch and rows are missing.
            requests_in_flight=(
                b.state is None
                and not complete
                and ended
                and requests_in_flight(engine, str(b.id)) > 0
            ),
            started=sum(counts) > 0,
            anyone_executing=(
                anyone_executing()
                if b.state is None and status in WORKFLOW_WAITING and sum(counts) > 0
                else None
            ),
        )
        result.append(
            {
                "batch_id": str(b.id),
                "key": b.key,
                "created_at": iso_utc(b.created_at),
                "total": b.total,
                "recorded": counts[0],
                "failed": counts[1],
                "state": str(state),
                "retry_of": str(b.retry_of) if b.retry_of else None,
            }
        )
    return result


# Failures after which the provider definitely did not file the request: a retry of it
# is a new request, with a new idempotency key. After any other failure the provider may
# have acted, and a retry must present the original key.
_NOT_FILED = ("UnknownUser", "InvalidUserId")


def retry_key(message: dict[str, Any], request_id: str | None) -> str | None:
    """The idempotency key a retry of this failed request must send, or None for a new
    one: the key the request itself sent (the very first request's ID, however many
    retries ago), unless the provider certainly did not act on it (an unknown user, an
    invalid ID, or a definite refusal: a 3xx or 4xx other than 429)."""
    error_class = message.get("error_class")
    status = message.get("http_status")
    if error_class in _NOT_FILED:
        return None
    if error_class == "ProviderRefused" and isinstance(status, int) and 300 <= status < 500:
        return None
    key = message.get("idempotency_key") or request_id
    return str(key) if key else None


def failed_requests(engine: sa.Engine, batch_id: str) -> list[dict[str, Any]]:
    """The failed requests of a batch that can be filed again (they name a user), each
    with the idempotency key its retry must send (``retry_key``)."""
    from accessctl.idprefix import resolve

    with engine.connect() as conn:
        bid = resolve(conn, Batch.id, batch_id, "batch ID")
        if conn.scalar(sa.select(Batch.id).where(Batch.id == bid)) is None:
            raise UsageError(f"no batch with ID {bid}")
        rows = conn.execute(
            sa.select(Error.id, Error.message, Error.created_at, Error.request_id)
            .where(Error.batch_id == bid)
            .order_by(Error.created_at, Error.id)
        ).all()
    return [
        {
            "error_id": str(r.id),
            "user_id": r.message.get("user_id"),
            **{"error_class": r.message.get("error_class")},
            "idempotency_key": retry_key(r.message, r.request_id),
            "detail": r.message.get("detail"),
        }
        for r in rows
        if isinstance(r.message, dict) and r.message.get("user_id")
    ]


def list_errors_page(
    engine: sa.Engine,
    *,
    batch: str | None,
    since: str | None,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None = None,
) -> tuple[list[dict[str, Any]], tuple[datetime, uuid.UUID] | None]:
    """One page of ``list_errors`` (newest first) strictly after the keyset position
    ``after`` (created_at, id) of the previous page's last row, and that position for this
    page's last row when more rows follow. Keyset, not OFFSET: a page costs the same however
    deep it is, and rows recorded meanwhile neither repeat nor shift the pages."""
    if limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    query = sa.select(Error.id, Error.created_at, Error.message)
    if batch is not None:
        query = query.where(Error.batch_id == parse_uuid(batch, "--batch"))
    if since is not None:
        query = query.where(Error.created_at >= parse_since(since))
    if after is not None:
        created_at, error_id = after
        query = query.where(
            sa.or_(
                Error.created_at < created_at,
                sa.and_(Error.created_at == created_at, Error.id < error_id),
            )
        )
    query = query.order_by(Error.created_at.desc(), Error.id.desc()).limit(limit + 1)
    with engine.connect() as conn:
        rows = list(conn.execute(query))
    more = len(rows) > limit
    rows = rows[:limit]
    page = [
        {"id": str(row.id), "created_at": iso_utc(row.created_at), "message": row.message}
        for row in rows
    ]
    last = (rows[-1].created_at, rows[-1].id) if more and rows else None
    return page, last


def nothing_to_retry(engine: sa.Engine, batch_id: str) -> str:
    """Why ``retry`` has nothing to file for a batch, for its one-line error: no failures
    at all, or only refused input lines, which name no user to file for."""
    with engine.connect() as conn:
        failures = conn.scalar(
            sa.select(sa.func.count())
            .select_from(Error)
            .where(Error.batch_id == uuid.UUID(batch_id))
        )
    if not failures:
        return f"batch {batch_id} has no failed requests to retry"
    return (
        f"batch {batch_id} has nothing to retry: its {failures} failure(s) are refused "
        "input lines (InvalidUserId), which name no user; fix the input and file it again"
    )
