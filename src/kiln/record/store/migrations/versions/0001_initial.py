"""The run record: runs, metrics, summary, artifacts.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("app", sa.String(200), nullable=False),
        sa.Column("name", sa.String(200)),
        sa.Column("function", sa.String(500)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(200)),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("engine", sa.String(32)),
        sa.Column("parent_id", sa.String(32)),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("started_at", sa.Double),
        sa.Column("ended_at", sa.Double),
        sa.Column("heartbeat_at", sa.Double),
        sa.Column("params", JSONType, nullable=False),
        sa.Column("tags", JSONType, nullable=False),
        sa.Column("result", JSONType),
        sa.Column("error", sa.Text),
        sa.Column("code", JSONType),
        sa.Column("environment", JSONType),
        sa.Column("usage", JSONType),
    )
    op.create_index("ix_runs_app_created", "runs", ["app", "created_at"])
    op.create_index("ix_runs_created", "runs", ["created_at"])
    op.create_index("ix_runs_parent", "runs", ["parent_id"])
    op.create_index("ix_runs_status", "runs", ["status"])

    op.create_table(
        "metrics",
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("key", sa.String(250), nullable=False),
        sa.Column("step", sa.BigInteger, nullable=False),
        sa.Column("time", sa.Double, nullable=False),
        sa.Column("value", sa.Double),
    )
    op.create_index("ix_metrics_run_key_step", "metrics", ["run_id", "key", "step"])

    op.create_table(
        "summary",
        sa.Column("run_id", sa.String(32), primary_key=True),
        sa.Column("key", sa.String(250), primary_key=True),
        sa.Column("app", sa.String(200), nullable=False),
        sa.Column("value", sa.Double),
    )
    op.create_index("ix_summary_key_value", "summary", ["key", "value"])
    op.create_index("ix_summary_app_key_value", "summary", ["app", "key", "value"])

    op.create_table(
        "artifacts",
        sa.Column("run_id", sa.String(32), primary_key=True),
        sa.Column("direction", sa.String(3), primary_key=True),
        sa.Column("name", sa.String(500), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("uri", sa.Text),
    )
    op.create_index("ix_artifacts_sha256", "artifacts", ["sha256"])


def downgrade() -> None:
    for table in ("artifacts", "summary", "metrics", "runs"):
        op.drop_table(table)
