"""Approvals: an agent's destructive or promotion action waits for a human, bound to a
hash of its exact arguments.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "approvals",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("project", sa.String(200), nullable=False),
        sa.Column("principal", sa.String(200), nullable=False),
        sa.Column("sponsor", sa.String(200)),
        sa.Column("operation", sa.String(100), nullable=False),
        sa.Column("args", sa.JSON, nullable=False),
        sa.Column("args_hash", sa.String(64), nullable=False),
        sa.Column("preview", sa.JSON),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
        sa.Column("decided_by", sa.String(200)),
        sa.Column("decided_at", sa.Double),
        sa.Column("reason", sa.Text),
        sa.Column("used_at", sa.Double),
    )
    op.create_index("ix_approvals_ask", "approvals",
                    ["project", "principal", "operation", "args_hash"])  # fmt: skip
    op.create_index("ix_approvals_status", "approvals", ["project", "status"])


def downgrade() -> None:
    op.drop_table("approvals")
