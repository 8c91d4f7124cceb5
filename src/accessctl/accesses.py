"""Access rows by hand: listing them, and moving them along their lifecycle.

Allowed transitions: requested -> approved | rejected | canceled; approved -> canceled.
A command changes all the given accesses or none of them.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from accessctl.exceptions import UsageError
from accessctl.models import Access, AccessStatus, utcnow
from accessctl.queries import MAX_LIMIT, iso_utc

TRANSITIONS: dict[AccessStatus, frozenset[AccessStatus]] = {
    AccessStatus.REQUESTED: frozenset(
        {AccessStatus.APPROVED, AccessStatus.REJECTED, AccessStatus.CANCELED}
    ),
    AccessStatus.APPROVED: frozenset({AccessStatus.CANCELED}),
    AccessStatus.REJECTED: frozenset(),
    AccessStatus.CANCELED: frozenset(),
}


def parse_status(text: str) -> AccessStatus:
    try:
        return AccessStatus(text.strip().lower())
    except ValueError:
        choices = ", ".join(s.value for s in AccessStatus)
        raise UsageError(f"--status {text[:40]!r} is not one of: {choices}") from None


def list_accesses(
    engine: sa.Engine, *, status: str | None, user: str | None, limit: int
) -> list[dict[str, Any]]:
    query = sa.select(Access)
    if status is not None:
        query = query.where(Access.status == parse_status(status))
    if user is not None:
        from accessctl.idprefix import resolve_with
        from accessctl.models import User

        query = query.where(Access.user_id == resolve_with(engine, User.id, user, "--user"))
    query = query.order_by(Access.created_at.desc(), Access.id).limit(min(limit, MAX_LIMIT))
    with engine.connect() as conn:
        return [
            {
                "id": str(row.id),
                "user_id": str(row.user_id),
                "status": AccessStatus(row.status).value,
                "batch_id": str(row.batch_id) if row.batch_id else None,
                "request_id": row.request_id,
                "created_at": iso_utc(row.created_at),
                "updated_at": iso_utc(row.updated_at),
            }
            for row in conn.execute(query)
        ]


def transition(engine: sa.Engine, access_ids: list[str], target: AccessStatus) -> int:
    """Move every given access to ``target``, or none (exit 2 naming the blocker).
    Returns how many distinct accesses moved: an ID given twice is one access."""
    from accessctl.idprefix import hex_prefix, resolve

    for text in access_ids:
        hex_prefix(text, "access ID")  # refuse malformed IDs before opening a transaction
    if not access_ids:
        raise UsageError("give at least one access ID")
    with engine.begin() as conn:
        ids = list(dict.fromkeys(resolve(conn, Access.id, a, "access ID") for a in access_ids))
        rows = dict(
            conn.execute(sa.select(Access.id, Access.status).where(Access.id.in_(ids))).all()
        )
        for access_id in ids:
            if access_id not in rows:
                raise UsageError(f"no access with ID {access_id}")
            current = AccessStatus(rows[access_id])
            if target not in TRANSITIONS[current]:
                raise UsageError(
                    f"access {access_id} is {current.value}; it cannot become {target.value}"
                )
        conn.execute(
            sa.update(Access).where(Access.id.in_(ids)).values(status=target, updated_at=utcnow())
        )
    return len(ids)
