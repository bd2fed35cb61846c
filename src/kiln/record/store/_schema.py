"""Tables of the SQL store. Migrations under ``migrations/`` create exactly these;
a test compares the two so they cannot drift apart.

Times are Unix seconds (float). There are no foreign keys: metric inserts are the
hot path, and every child row is written after its run row by the same writer.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

metadata = sa.MetaData()


class _JSON(sa.types.TypeDecorator[Any]):
    """JSON, stored as JSONB on PostgreSQL.

    The JSONB type is imported only once a PostgreSQL engine asks for it: importing
    ``sqlalchemy.dialects.postgresql`` loads every PostgreSQL driver's module, which
    every process opening a SQLite store (each start of the CLI, each worker) paid.
    """

    impl = sa.JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(sa.JSON())


JSONType = _JSON()

runs = sa.Table(
    "runs",
    metadata,
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
    sa.Column("attempt", sa.Integer),  # 0002: which try this is, from 1
    sa.Column("resources", JSONType),  # 0002: requested, assigned, limits
    sa.Column("volatile_metrics", JSONType),  # 0009: metric names left out of reproduce verdicts
    sa.Column("project", sa.String(200), nullable=False, server_default="default"),  # 0013
    sa.Column("trace_id", sa.String(32)),  # 0014: the run's OpenTelemetry trace and span
    sa.Column("span_id", sa.String(16)),
    sa.Index("ix_runs_app_created", "app", "created_at"),
    sa.Index("ix_runs_project_created", "project", "created_at"),
    sa.Index("ix_runs_project_app_created", "project", "app", "created_at"),
    sa.Index("ix_runs_created", "created_at"),
    sa.Index("ix_runs_parent", "parent_id"),
    sa.Index("ix_runs_status", "status"),
)

metrics = sa.Table(
    "metrics",
    metadata,
    sa.Column("run_id", sa.String(32), nullable=False),
    sa.Column("key", sa.String(250), nullable=False),
    sa.Column("step", sa.BigInteger, nullable=False),
    sa.Column("time", sa.Double, nullable=False),
    sa.Column("value", sa.Double),  # NULL only where the database cannot hold NaN
    sa.Index("ix_metrics_run_key_step", "run_id", "key", "step"),
)

# 0014: what a run printed (stdout and stderr), in chunks of whole lines as they were
# read, each with the time it was read; ``id`` orders them (and is where a follower of
# ``kiln logs -f`` resumes). ``stream`` "kiln" holds Kiln's own notes (truncation).
run_logs = sa.Table(
    "run_logs",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("run_id", sa.String(32), nullable=False),
    sa.Column("time", sa.Double, nullable=False),
    sa.Column("stream", sa.String(8), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Index("ix_run_logs_run_id", "run_id", "id"),
)  # fmt: skip

# The latest value of every metric of every run, plus the numbers a run returned.
# Indexed by (key, value) so "best runs by accuracy" reads ten index entries.
summary = sa.Table(
    "summary",
    metadata,
    sa.Column("run_id", sa.String(32), primary_key=True),
    sa.Column("key", sa.String(250), primary_key=True),
    sa.Column("app", sa.String(200), nullable=False),
    sa.Column("value", sa.Double),  # NULL stands for NaN, so it sorts last
    sa.Index("ix_summary_key_value", "key", "value"),
    sa.Index("ix_summary_app_key_value", "app", "key", "value"),
)

# 0003: every mutating action, hash-chained (see kiln.record.audit).
audit = sa.Table(
    "audit",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("time", sa.Double, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(200), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # canonical JSON, hashed as it is
    sa.Column("payload_sha256", sa.String(64), nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    # 0013: the project whose event it is (outside default, also in the hashed payload)
    sa.Column("project", sa.String(200), nullable=False, server_default="default"),
    sa.Index("ix_audit_project_seq", "project", "seq"),
    sa.Index("ix_audit_action", "action"),
    sa.Index("ix_audit_target", "target"),
    sa.Index("ix_audit_actor", "actor"),
)

# 0004: the model registry (see kiln.registry).
models = sa.Table(
    "models",
    metadata,
    sa.Column("project", sa.String(200), primary_key=True, server_default="default"),  # 0013
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("app", sa.String(200), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False),
)

model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("project", sa.String(200), primary_key=True, server_default="default"),  # 0013
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("run_id", sa.String(32), nullable=False),
    sa.Column("artifact", sa.String(500), nullable=False),
    sa.Column("artifact_sha256", sa.String(64), nullable=False),
    sa.Column("metrics", JSONType, nullable=False),
    sa.Column("signature", JSONType),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False),
    sa.Index("ix_model_versions_run", "run_id"),
)

aliases = sa.Table(
    "aliases",
    metadata,
    sa.Column("project", sa.String(200), primary_key=True, server_default="default"),  # 0013
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("alias", sa.String(100), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
)

alias_moves = sa.Table(
    "alias_moves",
    metadata,
    sa.Column("project", sa.String(200), nullable=False, server_default="default"),  # 0013
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("alias", sa.String(100), nullable=False),
    sa.Column("from_version", sa.Integer),
    sa.Column("to_version", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("at", sa.Double, nullable=False),
    sa.Index("ix_alias_moves_name_alias", "name", "alias"),
    sa.Index("ix_alias_moves_project", "project", "name", "alias"),
)

# 0005: promotion policies (see kiln.registry.policy).
policies = sa.Table(
    "policies",
    metadata,
    sa.Column("project", sa.String(200), primary_key=True, server_default="default"),  # 0013
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("alias", sa.String(100), primary_key=True),
    sa.Column("policy", JSONType, nullable=False),
    sa.Column("set_by", sa.String(200), nullable=False),
    sa.Column("set_at", sa.Double, nullable=False),
)

# 0006: promotions waiting for approval.
promotion_requests = sa.Table(
    "promotion_requests",
    metadata,
    sa.Column("project", sa.String(200), nullable=False, server_default="default"),  # 0013
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("alias", sa.String(100), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("policy", JSONType, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending, applied, rejected
    sa.Column("approvals", JSONType, nullable=False),  # identities, in order
    sa.Column("requested_by", sa.String(200), nullable=False),
    sa.Column("requested_at", sa.Double, nullable=False),
    sa.Column("decided_at", sa.Double),
    sa.Index("ix_promotion_requests_status", "status"),
)

artifacts = sa.Table(
    "artifacts",
    metadata,
    sa.Column("run_id", sa.String(32), primary_key=True),
    sa.Column("direction", sa.String(3), primary_key=True),
    sa.Column("name", sa.String(500), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("uri", sa.Text),
    sa.Index("ix_artifacts_sha256", "sha256"),
)

# 0007: endpoints and the spans of their inferences (see kiln.serve and kiln.observe).
endpoints = sa.Table(
    "endpoints",
    metadata,
    sa.Column("project", sa.String(200), primary_key=True, server_default="default"),  # 0013
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("app", sa.String(200), nullable=False),
    sa.Column("model", sa.String(300), nullable=False),  # the reference it serves
    sa.Column("spec", JSONType, nullable=False),  # resources, replicas, target concurrency
    sa.Column("traffic", JSONType),  # {"name:7": 90, "name:8": 10}, or null: follow the model
    sa.Column("updated_at", sa.Double, nullable=False),
)

# 0008: each process serving an endpoint (several may serve one), its liveness and figures.
endpoint_servers = sa.Table(
    "endpoint_servers",
    metadata,
    sa.Column("project", sa.String(200), nullable=False, server_default="default"),  # 0013
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("endpoint", sa.String(200), nullable=False),
    sa.Column("url", sa.String(500)),
    sa.Column("host", sa.String(255)),
    sa.Column("pid", sa.Integer),
    sa.Column("status", sa.String(16), nullable=False),  # serving, stopped
    sa.Column("stats", JSONType),  # requests, errors, cpu/gpu seconds, replicas, by version
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),  # its heartbeat: every report
    sa.Index("ix_endpoint_servers_endpoint", "endpoint"),
)

# 0015: what an endpoint's replicas printed, by version (None: a standby, before it
# loaded one), as the serving process read it; ``id`` orders the chunks.
endpoint_logs = sa.Table(
    "endpoint_logs",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("project", sa.String(200), nullable=False, server_default="default"),
    sa.Column("endpoint", sa.String(200), nullable=False),
    sa.Column("version", sa.Integer),
    sa.Column("replica", sa.Integer, nullable=False),  # its process id
    sa.Column("time", sa.Double, nullable=False),
    sa.Column("stream", sa.String(8), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Index("ix_endpoint_logs_endpoint", "project", "endpoint", "id"),
)  # fmt: skip

spans = sa.Table(
    "spans",
    metadata,
    sa.Column("trace_id", sa.String(32), primary_key=True),
    sa.Column("span_id", sa.String(16), primary_key=True),
    sa.Column("parent_id", sa.String(16)),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("endpoint", sa.String(200)),
    sa.Column("model_name", sa.String(200)),
    sa.Column("model_version", sa.Integer),
    sa.Column("run_id", sa.String(32)),
    sa.Column("start_ns", sa.BigInteger, nullable=False),
    sa.Column("duration_ns", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # ok, error
    sa.Column("attributes", JSONType, nullable=False),
    sa.Column("project", sa.String(200), nullable=False, server_default="default"),  # 0013
    sa.Index("ix_spans_endpoint_start", "endpoint", "start_ns"),
    sa.Index("ix_spans_project_start", "project", "start_ns"),
    sa.Index("ix_spans_run", "run_id"),
)
# 0010: the idempotency keys of the batches a server applied (a retried batch is a no-op);
# 0011: with each batch's sha256 (a key reused for another batch is refused).
ingest_keys = sa.Table(
    "ingest_keys",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("applied_at", sa.Double, nullable=False),
    sa.Column("digest", sa.String(64)),  # the batch's sha256, as its sender sent it
)


# 0012: identities: principals and their tokens (a token's secret only as its SHA-256).
principals = sa.Table(
    "principals",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("sponsor", sa.String(200)),
    sa.Column("scopes", sa.JSON),
    sa.Column("budget", sa.Double),
    sa.Column("expires_at", sa.Double),
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False),
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.String(12), primary_key=True),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("principal", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("name", sa.String(200)),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double),
    sa.Column("revoked_at", sa.Double),
    sa.Column("last_used_at", sa.Double),
    sa.Column("project", sa.String(200), nullable=False, server_default="default"),  # 0013
    sa.Index("tokens_principal", "principal"),
)

# 0013: projects as tenants. A principal's role in a project; the blobs a project may
# read (it uploaded them, or its records name them).
projects = sa.Table(
    "projects",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False),
)

memberships = sa.Table(
    "memberships",
    metadata,
    sa.Column("project", sa.String(200), primary_key=True),
    sa.Column("principal", sa.String(200), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("added_at", sa.Double, nullable=False),
    sa.Column("added_by", sa.String(200), nullable=False),
)

blob_refs = sa.Table(
    "blob_refs",
    metadata,
    sa.Column("project", sa.String(200), primary_key=True),
    sa.Column("sha256", sa.String(64), primary_key=True),
)

# 0016: shared hardware: pools, each project's queue on a pool, budgets, and the
# workloads that asked for admission (see kiln.govern.admission).
pools = sa.Table(
    "pools",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("capacity", sa.JSON, nullable=False),
    sa.Column("gpu_type", sa.String(200)),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("updated_by", sa.String(200), nullable=False),
)

queues = sa.Table(
    "queues",
    metadata,
    sa.Column("project", sa.String(200), primary_key=True),
    sa.Column("pool", sa.String(200), primary_key=True),
    sa.Column("nominal", sa.JSON, nullable=False),
    sa.Column("cohort", sa.String(200)),
    sa.Column("borrowing_limit", sa.JSON, nullable=False),
    sa.Column("lending_limit", sa.JSON, nullable=False),
    sa.Column("weight", sa.Double, nullable=False),
    sa.Column("strategy", sa.String(16), nullable=False),
    sa.Column("fair_sharing", sa.Boolean, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("updated_by", sa.String(200), nullable=False),
)

budgets = sa.Table(
    "budgets",
    metadata,
    sa.Column("project", sa.String(200), primary_key=True),
    sa.Column("principal", sa.String(200), primary_key=True),  # "": the whole project
    sa.Column("amount", sa.Double, nullable=False),
    sa.Column("period", sa.String(8), nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("updated_by", sa.String(200), nullable=False),
)

workloads = sa.Table(
    "workloads",
    metadata,
    sa.Column("project", sa.String(200), primary_key=True),
    sa.Column("id", sa.String(32), primary_key=True),  # a run's: its project's
    sa.Column("pool", sa.String(200), nullable=False),
    sa.Column("principal", sa.String(200), nullable=False),
    sa.Column("requests", sa.JSON, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("submitted_at", sa.Double, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("agent", sa.Boolean, nullable=False),
    sa.Column("timeout_s", sa.Double),
    sa.Column("max_cost", sa.Double, nullable=False),
    sa.Column("cost", sa.Double, nullable=False),
    sa.Column("admitted_at", sa.Double),
    sa.Column("ended_at", sa.Double),
    sa.Column("cause", sa.Text),
    sa.Index("ix_workloads_state", "state"),
    sa.Index("ix_workloads_project", "project", "submitted_at"),
)

approvals = sa.Table(
    "approvals",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("project", sa.String(200), nullable=False),
    sa.Column("principal", sa.String(200), nullable=False),  # the agent that asked
    sa.Column("sponsor", sa.String(200)),
    sa.Column("operation", sa.String(100), nullable=False),
    sa.Column("args", sa.JSON, nullable=False),
    sa.Column("args_hash", sa.String(64), nullable=False),
    sa.Column("preview", sa.JSON),  # what it would change, when it was asked
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("decided_by", sa.String(200)),
    sa.Column("decided_at", sa.Double),
    sa.Column("reason", sa.Text),
    sa.Column("used_at", sa.Double),
    sa.Index("ix_approvals_ask", "project", "principal", "operation", "args_hash"),
    sa.Index("ix_approvals_status", "project", "status"),
)
