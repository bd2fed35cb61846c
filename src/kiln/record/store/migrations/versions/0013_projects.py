"""Projects as tenants: runs, models, endpoints, spans, audit events and blobs belong
to a project.

Every run, model (its versions, aliases, moves, policies and promotion requests),
endpoint (and its servers), span and audit event has a ``project`` (what was recorded
before is in ``default``); model and endpoint names are unique per project. A project
sees a blob only if it uploaded it or its records name it (``blob_refs``), so a
content hash cannot tell one project what another holds. Tokens act in one project;
``memberships`` give a principal a role in a project.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import time
import warnings

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

DEFAULT = "default"
# Tables whose key now starts with the project: names are unique per project.
KEYED = {
    "models": ["project", "name"],
    "model_versions": ["project", "name", "version"],
    "aliases": ["project", "name", "alias"],
    "policies": ["project", "name", "alias"],
    "endpoints": ["project", "name"],
}
PLAIN = ("spans", "audit", "alias_moves", "promotion_requests", "endpoint_servers")


def _project(primary_key: bool = False) -> sa.Column[str]:
    return sa.Column("project", sa.String(200), nullable=False, server_default=DEFAULT,
                     primary_key=primary_key)  # fmt: skip


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
    for table in PLAIN:
        with op.batch_alter_table(table) as batch:
            batch.add_column(_project())
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table, key in KEYED.items():
        if sqlite:  # SQLite cannot change a key: the table is copied with the new one
            with warnings.catch_warnings():  # SQLAlchemy notes the key changes: it is meant to
                warnings.simplefilter("ignore", sa.exc.SAWarning)
                with op.batch_alter_table(table, recreate="always") as batch:
                    batch.add_column(_project())
                    batch.create_primary_key(f"pk_{table}", key)
        else:
            op.add_column(table, _project())
            op.drop_constraint(f"{table}_pkey", table, type_="primary")
            op.create_primary_key(f"{table}_pkey", table, key)
    op.create_index("ix_alias_moves_project", "alias_moves", ["project", "name", "alias"])
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
    op.drop_index("ix_alias_moves_project", table_name="alias_moves")
    for table, key in KEYED.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sa.exc.SAWarning)
            with op.batch_alter_table(table, recreate="always") as batch:
                batch.create_primary_key(f"pk_{table}", key[1:])
                batch.drop_column("project")
    for table in PLAIN:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("project")
    op.drop_index("ix_runs_project_app_created", table_name="runs")
    op.drop_index("ix_runs_project_created", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("project")
    op.drop_table("blob_refs")
    op.drop_table("memberships")
    op.drop_table("projects")
