"""initial schema: users, accesses, errors, batches

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_batches_created_at"), ["created_at"], unique=False)

    op.create_table(
        "errors",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column(
            "message",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("batch_id", sa.Uuid(), nullable=True),
        sa.Column("request_id", sa.String(length=120), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    with op.batch_alter_table("errors", schema=None) as batch_op:
        batch_op.create_index(
            "ix_errors_batch_id_created_at", ["batch_id", "created_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_errors_created_at"), ["created_at"], unique=False)

    op.create_table(
        "users",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("email"),
    )
    op.create_table(
        "accesses",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column(
            "status",
            sa.Enum("requested", "approved", "rejected", "canceled", name="access_status"),
            nullable=False,
        ),
        sa.Column("request_id", sa.String(length=120), nullable=True),
        sa.Column("batch_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    with op.batch_alter_table("accesses", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_accesses_batch_id"), ["batch_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_accesses_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_accesses_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("accesses", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_accesses_user_id"))
        batch_op.drop_index(batch_op.f("ix_accesses_status"))
        batch_op.drop_index(batch_op.f("ix_accesses_batch_id"))

    op.drop_table("accesses")
    op.drop_table("users")
    with op.batch_alter_table("errors", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_errors_created_at"))
        batch_op.drop_index("ix_errors_batch_id_created_at")

    op.drop_table("errors")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_batches_created_at"))

    op.drop_table("batches")
    sa.Enum(name="access_status").drop(op.get_bind(), checkfirst=True)
