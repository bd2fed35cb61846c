"""One row per serving process of an endpoint (several may serve one endpoint).

The endpoint's own row keeps what is declared (model, spec, live split); where it
is served, by which process, its status and its figures move to
``endpoint_servers``, so that one process stopping or dying says nothing about
another serving the same endpoint.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_MOVED = ("url", "host", "pid", "status", "stats", "started_at")


def upgrade() -> None:
    op.create_table(
        "endpoint_servers",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("endpoint", sa.String(200), nullable=False),
        sa.Column("url", sa.String(500)),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stats", JSONType),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_index("ix_endpoint_servers_endpoint", "endpoint_servers", ["endpoint"])
    with op.batch_alter_table("endpoints") as batch:
        for column in _MOVED:
            batch.drop_column(column)


def downgrade() -> None:
    with op.batch_alter_table("endpoints") as batch:
        batch.add_column(sa.Column("url", sa.String(500)))
        batch.add_column(sa.Column("host", sa.String(255)))
        batch.add_column(sa.Column("pid", sa.Integer))
        batch.add_column(
            sa.Column("status", sa.String(16), nullable=False, server_default="stopped")
        )
        batch.add_column(sa.Column("stats", JSONType))
        batch.add_column(sa.Column("started_at", sa.Double))
    op.drop_table("endpoint_servers")
