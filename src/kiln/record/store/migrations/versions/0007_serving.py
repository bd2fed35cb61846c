"""Endpoints and the spans of their inferences.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "endpoints",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("app", sa.String(200), nullable=False),
        sa.Column("model", sa.String(300), nullable=False),
        sa.Column("spec", JSONType, nullable=False),
        sa.Column("traffic", JSONType),
        sa.Column("url", sa.String(500)),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stats", JSONType),
        sa.Column("started_at", sa.Double),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_table(
        "spans",
        sa.Column("trace_id", sa.String(32), primary_key=True),
        sa.Column("span_id", sa.String(16), primary_key=True),
        sa.Column("parent_id", sa.String(16)),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("endpoint", sa.String(200)),
        sa.Column("model_name", sa.String(200)),
        sa.Column("model_version", sa.Integer),
        sa.Column("run_id", sa.String(32)),
        sa.Column("start_ns", sa.BigInteger, nullable=False),
        sa.Column("duration_ns", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attributes", JSONType, nullable=False),
    )
    op.create_index("ix_spans_endpoint_start", "spans", ["endpoint", "start_ns"])
    op.create_index("ix_spans_run", "spans", ["run_id"])


def downgrade() -> None:
    op.drop_table("spans")
    op.drop_table("endpoints")
