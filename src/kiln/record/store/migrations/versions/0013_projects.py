"""Projects as tenants: runs, spans, audit events and blobs belong to a project.

Every run, span and audit event has a ``project`` (what was recorded before is in
``default``), and a project sees a blob only if it uploaded it or its records name it
(``blob_refs``), so a content hash cannot tell one project what another holds. Tokens
act in one project; ``memberships`` give a principal a role in a project.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

DEFAULT = "default"


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
    )
    op.create_table(
        "memberships",
        sa.Column("project", sa.String(200), primary_key=True),
        sa.Column("principal", sa.String(200), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("added_at", sa.Double, nullable=False),
        sa.Column("added_by", sa.String(200), nullable=False),
    )
    op.create_table(
        "blob_refs",
        sa.Column("project", sa.String(200), primary_key=True),
        sa.Column("sha256", sa.String(64), primary_key=True),
    )
    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column("project", sa.String(200), nullable=False, server_default=DEFAULT)
        )
    for table in ("spans", "audit"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("project", sa.String(200), nullable=False, server_default=DEFAULT)
            )
    op.create_index("ix_spans_project_start", "spans", ["project", "start_ns"])
    op.create_index("ix_audit_project_seq", "audit", ["project", "seq"])
    op.create_index("ix_runs_project_created", "runs", ["project", "created_at"])
    op.create_index("ix_runs_project_app_created", "runs", ["project", "app", "created_at"])
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(
            sa.Column("project", sa.String(200), nullable=False, server_default=DEFAULT)
        )
    conn = op.get_bind()
    conn.execute(
        sa.text("INSERT INTO projects (name, created_at, created_by) VALUES (:n, :t, 'kiln')"),
        {"n": DEFAULT, "t": time.time()},
    )
    conn.execute(
        sa.text("INSERT INTO memberships (project, principal, role, added_at, added_by) "
                "SELECT :n, name, role, created_at, created_by FROM principals"),
        {"n": DEFAULT},
    )  # fmt: skip
    named: set[str] = set(conn.execute(sa.text("SELECT DISTINCT sha256 FROM artifacts")).scalars())
    for code, env in conn.execute(sa.text("SELECT code, environment FROM runs")):
        named |= _blobs_of(code) | _blobs_of(env)
    if named:
        conn.execute(
            sa.text("INSERT INTO blob_refs (project, sha256) VALUES (:p, :s)"),
            [{"p": DEFAULT, "s": sha} for sha in sorted(named)],
        )


def _blobs_of(value: object) -> set[str]:
    import json

    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        return set()
    keys = ("patch_sha256", "source_blob", "packages_sha256", "lock_sha256")
    return {value[k] for k in keys if isinstance(value.get(k), str)}


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("project")
    op.drop_index("ix_audit_project_seq", table_name="audit")
    op.drop_index("ix_spans_project_start", table_name="spans")
    for table in ("spans", "audit"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("project")
    op.drop_index("ix_runs_project_app_created", table_name="runs")
    op.drop_index("ix_runs_project_created", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("project")
    op.drop_table("blob_refs")
    op.drop_table("memberships")
    op.drop_table("projects")
