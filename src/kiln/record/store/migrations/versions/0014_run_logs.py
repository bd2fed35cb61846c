"""Run logs: what each run printed on stdout and stderr, time-stamped, in order; and
the OpenTelemetry trace and span of each run.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_logs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("time", sa.Double, nullable=False),
        sa.Column("stream", sa.String(8), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
    )  # fmt: skip
    op.create_index("ix_run_logs_run_id", "run_logs", ["run_id", "id"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("trace_id", sa.String(32)))
        batch.add_column(sa.Column("span_id", sa.String(16)))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("span_id")
        batch.drop_column("trace_id")
    op.drop_table("run_logs")
