"""Runs on engines: the attempt number and the resources requested and assigned.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer))
        batch.add_column(sa.Column("resources", JSONType))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("resources")
        batch.drop_column("attempt")
