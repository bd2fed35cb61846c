"""Identities: principals (users, service accounts, agents) and their tokens.

A token is stored as its id and the SHA-256 of its secret, never the secret. Each
token carries the role its holder acts with; ``kind`` ``enrol`` is the one-time
token a server prints at its first start, exchanged once for the first admin's.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "principals",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),  # user, service, agent
        sa.Column("role", sa.String(16), nullable=False),  # the widest it may act with
        sa.Column("sponsor", sa.String(200)),  # an agent's human
        sa.Column("scopes", sa.JSON),
        sa.Column("budget", sa.Double),
        sa.Column("expires_at", sa.Double),
        sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(12), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("principal", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),  # access, enrol
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200)),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double),
        sa.Column("revoked_at", sa.Double),
        sa.Column("last_used_at", sa.Double),
    )
    op.create_index("tokens_principal", "tokens", ["principal"])


def downgrade() -> None:
    op.drop_index("tokens_principal", table_name="tokens")
    op.drop_table("tokens")
    op.drop_table("principals")
