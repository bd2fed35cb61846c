"""Shared hardware: pools, queues with quotas, budgets, and workloads asking admission.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pools",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("capacity", sa.JSON, nullable=False),
        sa.Column("gpu_type", sa.String(200)),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=False),
    )
    op.create_table(
        "queues",
        sa.Column("project", sa.String(200), primary_key=True),
        sa.Column("pool", sa.String(200), primary_key=True),
        sa.Column("nominal", sa.JSON, nullable=False),
        sa.Column("cohort", sa.String(200)),
        sa.Column("borrowing_limit", sa.JSON, nullable=False),
        sa.Column("lending_limit", sa.JSON, nullable=False),
        sa.Column("weight", sa.Double, nullable=False),
        sa.Column("strategy", sa.String(16), nullable=False),
        sa.Column("fair_sharing", sa.Boolean, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=False),
    )
    op.create_table(
        "budgets",
        sa.Column("project", sa.String(200), primary_key=True),
        sa.Column("principal", sa.String(200), primary_key=True),
        sa.Column("amount", sa.Double, nullable=False),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=False),
    )
    op.create_table(
        "workloads",
        sa.Column("project", sa.String(200), primary_key=True),
        sa.Column("id", sa.String(32), primary_key=True),  # a run's: its project's
        sa.Column("pool", sa.String(200), nullable=False),
        sa.Column("principal", sa.String(200), nullable=False),
        sa.Column("requests", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("submitted_at", sa.Double, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("agent", sa.Boolean, nullable=False),
        sa.Column("timeout_s", sa.Double),
        sa.Column("max_cost", sa.Double, nullable=False),
        sa.Column("cost", sa.Double, nullable=False),
        sa.Column("admitted_at", sa.Double),
        sa.Column("ended_at", sa.Double),
        sa.Column("cause", sa.Text),
    )
    op.create_index("ix_workloads_state", "workloads", ["state"])
    op.create_index("ix_workloads_project", "workloads", ["project", "submitted_at"])


def downgrade() -> None:
    for table in ("workloads", "budgets", "queues", "pools"):
        op.drop_table(table)
