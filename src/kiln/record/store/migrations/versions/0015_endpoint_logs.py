"""Endpoint logs: what the replicas of an endpoint printed, by model version.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "endpoint_logs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("project", sa.String(200), nullable=False, server_default="default"),
        sa.Column("endpoint", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer),
        sa.Column("replica", sa.Integer, nullable=False),
        sa.Column("time", sa.Double, nullable=False),
        sa.Column("stream", sa.String(8), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
    )  # fmt: skip
    op.create_index("ix_endpoint_logs_endpoint", "endpoint_logs", ["project", "endpoint", "id"])


def downgrade() -> None:
    op.drop_table("endpoint_logs")
