"""The application tables (SQLAlchemy 2). Alembic's migrations in ``migrations/`` build them.

``users``, ``accesses`` and ``errors`` come from the seed; ``batches`` records each filed
batch so that ``status`` and ``batches`` can answer without DBOS. Every column a query
filters or sorts on is indexed.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    from datetime import UTC

    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp stored and compared as UTC on every backend.

    Postgres's ``timestamptz`` compares instants by itself; SQLite stores the wall-clock
    text it is given, so ``14:24-05:00`` would be stored and compared as ``14:24``. Every
    value is converted to UTC on the way in (naive ones are taken as UTC) and comes back
    UTC-aware, so a filter with any offset means that instant on both backends."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        from datetime import UTC

        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        from datetime import UTC

        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


# JSONB on Postgres (indexable, compact), JSON text elsewhere.
JSONDocument = sa.JSON().with_variant(JSONB(), "postgresql")


class AccessStatus(enum.StrEnum):
    REQUESTED = "requested"
    APPROVED = "approved"
    REJECTED = "rejected"
    CANCELED = "canceled"


access_status = sa.Enum(
    AccessStatus,
    name="access_status",
    values_callable=lambda e: [m.value for m in e],
    validate_strings=True,
)


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(sa.String(200))
    email: Mapped[str] = mapped_column(sa.String(320), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True)
    key: Mapped[str | None] = mapped_column(sa.String(200), unique=True)
    total: Mapped[int] = mapped_column(sa.Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # Set on a batch filed by `accessctl retry`: the batch whose failures it re-files.
    retry_of: Mapped[uuid.UUID | None] = mapped_column(sa.Uuid, index=True)
    # SHA-256 of the batch's input (its requests' user IDs in order, and its refused
    # lines): a key given again with other input is refused, never silently attached.
    input_digest: Mapped[str | None] = mapped_column(sa.String(64))
    # The outcome, written once when the batch ends (or when prune finalizes it), so
    # reports stay true after its workflow records and error rows are pruned.
    recorded: Mapped[int | None] = mapped_column(sa.Integer)
    failed: Mapped[int | None] = mapped_column(sa.Integer)
    state: Mapped[str | None] = mapped_column(sa.String(20))
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set by `accessctl cancel`: no request of the batch starts after this.
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Access(Base):
    __tablename__ = "accesses"

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("users.id"), index=True)
    status: Mapped[AccessStatus] = mapped_column(
        access_status, default=AccessStatus.REQUESTED, index=True
    )
    # The durable request (DBOS workflow) that filed this row: unique, so a request
    # can never be written twice, whatever replays.
    request_id: Mapped[str | None] = mapped_column(sa.String(120), unique=True)
    batch_id: Mapped[uuid.UUID | None] = mapped_column(sa.Uuid, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Error(Base):
    __tablename__ = "errors"
    __table_args__ = (sa.Index("ix_errors_batch_id_created_at", "batch_id", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=uuid.uuid4)
    # Structured: batch_id, workflow_id, user_id, error_class, detail, sqlstate.
    message: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    # Copies of message fields that queries filter on, so they can be indexed and unique.
    batch_id: Mapped[uuid.UUID | None] = mapped_column(sa.Uuid)
    request_id: Mapped[str | None] = mapped_column(sa.String(120), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class LimitChange(Base):
    """Who set the shared rate limit, when, and to what (``accessctl limit show``). The
    limit itself lives in DBOS's ``queues`` row, which every worker re-reads."""

    __tablename__ = "limit_changes"

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=uuid.uuid4)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    changed_by: Mapped[str] = mapped_column(sa.String(200))
    reason: Mapped[str] = mapped_column(sa.String(40))
    rate_limit: Mapped[int | None] = mapped_column(sa.Integer)
    period: Mapped[float | None] = mapped_column(sa.Float)
    call_slack: Mapped[float] = mapped_column(sa.Float)
    concurrency: Mapped[int] = mapped_column(sa.Integer)
