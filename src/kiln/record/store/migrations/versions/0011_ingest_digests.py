"""Ingest digests: the sha256 of the batch each idempotency key was applied for.

A key sent again with the same batch is a retry (a no-op); sent with another batch it
is a client's mistake, refused rather than answered as if that batch were stored.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ingest_keys") as batch:
        batch.add_column(sa.Column("digest", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ingest_keys") as batch:
        batch.drop_column("digest")
