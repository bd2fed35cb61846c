"""Ingest keys: the idempotency key of every batch a server applied.

A client of ``kiln server`` sends each batch with a key and sends it again when it
does not hear back; the key, written in the batch's own transaction, makes the
second copy a no-op, so a retried batch is applied exactly once.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ingest_keys",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("applied_at", sa.Double, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ingest_keys")
