"""Volatile metrics: the metric names a run declared not part of its result.

``kiln.log({...}, volatile=True)`` marks its keys (a timing, a throughput) so that
``kiln reproduce`` shows them but leaves them out of its verdict.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("volatile_metrics", JSONType))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("volatile_metrics")
