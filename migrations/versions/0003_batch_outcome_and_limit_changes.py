"""batches keep their outcome and input digest; limit_changes records who set the shared limit

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("input_digest", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("recorded", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("failed", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("state", sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True))

    op.create_table(
        "limit_changes",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("changed_by", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=False),
        sa.Column("rate_limit", sa.Integer(), nullable=True),
        sa.Column("period", sa.Float(), nullable=True),
        sa.Column("call_slack", sa.Float(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("limit_changes", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_limit_changes_changed_at"), ["changed_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("limit_changes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_limit_changes_changed_at"))
    op.drop_table("limit_changes")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        for column in (
            "cancelled_at",
            "finished_at",
            "state",
            "failed",
            "recorded",
            "input_digest",
        ):
            batch_op.drop_column(column)
