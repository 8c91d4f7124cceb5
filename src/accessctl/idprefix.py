"""Unique ID prefixes as arguments, as git takes abbreviated commits: ``status a07ff062``.

A prefix is at least ``MIN_PREFIX`` hex digits of the UUID's canonical text (dashes
optional). It is looked up as a range of the UUID column, from the prefix padded with
``0`` to the prefix padded with ``f``: that is the same set of rows as ``LIKE 'prefix%'``
on the text, but it rides the primary-key or batch index on both backends. (SQLAlchemy's
``sa.Uuid`` is a native ``uuid`` on PostgreSQL, ordered bytewise, and 32 lower-case hex
digits without dashes, ``CHAR(32)``, on SQLite, ordered as text: both orders are the
hex digits' order.)
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import sqlalchemy as sa

from accessctl.exceptions import UsageError

MIN_PREFIX = 4
# How many candidates an "ambiguous" error names.
_SHOWN = 3
_HEX = re.compile(r"[0-9a-f]+")


def hex_prefix(text: str, what: str) -> str | None:
    """The hex digits of an ID or ID prefix; None for a whole UUID (no lookup needed).
    Refuses anything else, naming ``what``."""
    value = text.strip().lower()
    try:
        uuid.UUID(value)
    except ValueError:
        pass
    else:
        return None
    digits = value.replace("-", "")
    if not _HEX.fullmatch(digits) or len(digits) > 32 or not _dashes_fit(value):
        raise UsageError(f"{what} {text[:40]!r} is not a UUID or a prefix of one")
    if len(digits) < MIN_PREFIX:
        raise UsageError(
            f"{what} {text[:40]!r} is too short: give at least {MIN_PREFIX} hex digits"
        )
    return digits


def _dashes_fit(value: str) -> bool:
    """Dashes, if any, only where the canonical form has them (8-4-4-4-12)."""
    return all(i in (8, 13, 18, 23) for i, c in enumerate(value) if c == "-")


def resolve(conn: sa.Connection, column: Any, text: str, what: str) -> uuid.UUID:
    """The one ID in ``column`` that ``text`` is, or starts with. Exit 2 when none is,
    or when several are (naming a few, so the operator sees how many digits to add)."""
    digits = hex_prefix(text, what)
    if digits is None:
        return uuid.UUID(text.strip())
    low = uuid.UUID(digits.ljust(32, "0"))
    high = uuid.UUID(digits.ljust(32, "f"))
    found = (
        conn.execute(
            sa.select(column)
            .where(column.between(low, high))
            .distinct()
            .order_by(column)
            .limit(_SHOWN + 1)
        )
        .scalars()
        .all()
    )
    if not found:
        raise UsageError(f"{what} {text.strip()[:40]!r} matches no known ID")
    if len(found) > 1:
        listed = ", ".join(str(f) for f in found[:_SHOWN])
        more = ", ..." if len(found) > _SHOWN else ""
        raise UsageError(
            f"{what} prefix {text.strip()[:40]!r} is ambiguous: it matches {listed}{more}; "
            "give more digits"
        )
    return uuid.UUID(str(found[0]))


def resolve_with(engine: sa.Engine, column: Any, text: str, what: str) -> uuid.UUID:
    """``resolve`` on a connection of its own; a whole UUID needs no connection."""
    if hex_prefix(text, what) is None:
        return uuid.UUID(text.strip())
    with engine.connect() as conn:
        return resolve(conn, column, text, what)
