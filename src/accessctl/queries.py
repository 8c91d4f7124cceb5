"""Read-only queries: errors, batch status, users. Plain data out; no DBOS launch.

Every filter and sort here rides an index (see models.py).
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from accessctl.errors import UsageError
from accessctl.models import Access, Batch, Error, User

if TYPE_CHECKING:
    from accessctl.settings import Settings

_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``30m``, ``2h``, ``7d`` ago, or an ISO date/time (UTC when no zone is given)."""
    now = now or datetime.now(UTC)
    value = text.strip()
    match = _RELATIVE.fullmatch(value)
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"--since {text[:40]!r} is not a duration (30m, 2h, 7d) or an ISO date/time"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_uuid(text: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        raise UsageError(f"{what} {text[:40]!r} is not a UUID") from None


def _iso(value: datetime) -> str:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def list_errors(
    engine: sa.Engine, *, batch: str | None, since: str | None, limit: int
) -> list[dict[str, Any]]:
    """Recorded failures, newest first."""
    if limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    query = sa.select(Error.id, Error.created_at, Error.message)
    if batch is not None:
        query = query.where(Error.batch_id == parse_uuid(batch, "--batch"))
    if since is not None:
        query = query.where(Error.created_at >= parse_since(since))
    query = query.order_by(Error.created_at.desc(), Error.id.desc()).limit(limit)
    with engine.connect() as conn:
        return [
            {"id": str(row.id), "created_at": _iso(row.created_at), "message": row.message}
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
                "created_at": _iso(row.created_at),
            }
            for row in conn.execute(query.limit(limit))
        ]


def _workflow_states(engine: sa.Engine, workflow_ids: list[str]) -> dict[str, str]:
    table = "workflow_status" if engine.dialect.name == "sqlite" else "dbos.workflow_status"
    if not workflow_ids:
        return {}
    stmt = sa.text(
        f"SELECT workflow_uuid, status FROM {table} WHERE workflow_uuid IN :ids"
    ).bindparams(sa.bindparam("ids", expanding=True))
    with engine.connect() as conn:
        return {str(r[0]): str(r[1]) for r in conn.execute(stmt, {"ids": workflow_ids})}


def _state(workflow_status: str | None, done: int, total: int) -> str:
    if workflow_status == "SUCCESS":
        return "done"
    if workflow_status in ("ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED"):
        return "failed"
    if workflow_status is None:
        return "queued"
    return "running" if done < total else "finishing"


def batch_status(settings: Settings, engine: sa.Engine, batch_id: str | None) -> dict[str, Any]:
    """Progress and outcome of one batch (the newest when ``batch_id`` is None)."""
    from accessctl.workflows import batch_workflow_id

    with engine.connect() as conn:
        if batch_id is None:
            newest = conn.scalar(
                sa.select(Batch.id).order_by(Batch.created_at.desc(), Batch.id).limit(1)
            )
            if newest is None:
                raise UsageError("no batch has been filed yet")
            bid = newest
        else:
            bid = parse_uuid(batch_id, "batch ID")
        found = conn.execute(
            sa.select(Batch.key, Batch.total, Batch.created_at).where(Batch.id == bid)
        ).first()
        recorded = conn.scalar(sa.select(sa.func.count()).where(Access.batch_id == bid)) or 0
        failed = conn.scalar(sa.select(sa.func.count()).where(Error.batch_id == bid)) or 0
    states = _workflow_states(engine, [batch_workflow_id(str(bid))])
    workflow_state = states.get(batch_workflow_id(str(bid)))
    if found is None and workflow_state is None:
        raise UsageError(f"no batch with ID {bid}")
    total = found.total if found is not None else None
    done = recorded + failed
    return {
        "batch_id": str(bid),
        "key": found.key if found is not None else None,
        "created_at": _iso(found.created_at) if found is not None else None,
        "total": total,
        "recorded": recorded,
        "failed": failed,
        "done": done,
        "state": _state(workflow_state, done, total or 0),
    }
