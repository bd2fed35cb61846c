"""Promotion requests waiting for approval.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "promotion_requests",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("alias", sa.String(100), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("policy", JSONType, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("approvals", JSONType, nullable=False),
        sa.Column("requested_by", sa.String(200), nullable=False),
        sa.Column("requested_at", sa.Double, nullable=False),
        sa.Column("decided_at", sa.Double),
    )
    op.create_index("ix_promotion_requests_status", "promotion_requests", ["status"])


def downgrade() -> None:
    op.drop_table("promotion_requests")
