"""The operations agents may call: one table, from which the MCP tools are made.

Each :class:`Operation` names the permission of :mod:`kiln.govern.rbac` it needs (the
same one its HTTP route declares: a test holds the two together), its effect
(``read``, ``write`` or ``destructive``, which gives the tools' annotations; a test
fails on an operation without one), whether calling it twice does no more than once,
its arguments as a pydantic model, and for every mutating one a preview: the dry run
that says what would change and changes nothing.

The server is the guard, not the client: :func:`execute` checks the caller's role and
scopes on every call (a tool not listed is still refused by name), and an agent's
call of an operation marked ``approval`` (destructive ones, and promotions) becomes an
approval request bound to the SHA-256 of its exact arguments and of what they would
change (its dry run). A human approves it (``kiln approvals approve ID`` or the
dashboard); the agent's next call with the same arguments then runs once, if it would
still change what was approved. A change to any argument, or to what the call would do,
is another hash: another approval.
The HTTP routes of those operations go through :func:`gate` the same way, so an
agent's token cannot step around the tools.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic import ValidationError as PydanticError
from starlette.exceptions import HTTPException

from kiln.config import Settings
from kiln.errors import ValidationError
from kiln.govern import rbac
from kiln.record.model import RunStatus
from kiln.record.store._wire import number
from kiln.record.store.base import ApprovalRow, RunQuery
from kiln.record.store.sql import SqlStore
from kiln.server import schemas
from kiln.server.auth import Caller

Effect = Literal["read", "write", "destructive"]
EFFECTS: tuple[Effect, ...] = ("read", "write", "destructive")
APPROVAL_WAIT_S = 24 * 3600.0  # a request not decided by then expires
APPROVAL_USE_S = 3600.0  # an approval is spent within this, or asked again


@dataclass(frozen=True, slots=True)
class Context:
    """What an operation works with: the store as the caller, seeing its project."""

    store: SqlStore
    caller: Caller
    extra: Mapping[str, Any] = field(default_factory=dict)


class Refused(Exception):
    """The caller may not call this operation (role or scope)."""


class Args(BaseModel):
    """Arguments of an operation: unknown fields are refused, each names its bounds."""

    model_config = ConfigDict(extra="forbid")


class Mutating(Args):
    dry_run: bool = Field(False, description="Say what would change, and change nothing.")


@dataclass(frozen=True, slots=True)
class Operation:
    """One thing an agent (or anyone) may do, with what it needs and what it does."""

    name: str
    summary: str
    permission: tuple[str, str]
    effect: Effect
    idempotent: bool
    args: type[Args]
    call: Callable[[Context, Any], Any]
    preview: Callable[[Context, Any], Any] | None = None
    approval: bool = False  # an agent's call waits for a human's approval
    route: tuple[str, str] | None = None  # the HTTP route that does the same
    # The arguments made exact before they are hashed (a run id prefix: the run's id), so
    # that an approval names what a person saw, whatever the prefix matches later.
    exact: Callable[[Context, Any], Any] | None = None


OPERATIONS: dict[str, Operation] = {}


def operation(
    name: str, summary: str, *, permission: tuple[str, str], effect: Effect,
    idempotent: bool, args: type[Args], approval: bool = False,
    route: tuple[str, str] | None = None,
    preview: Callable[[Context, Any], Any] | None = None,
    exact: Callable[[Context, Any], Any] | None = None,
) -> Callable[[Callable[[Context, Any], Any]], Callable[[Context, Any], Any]]:  # fmt: skip
    """Add the decorated function to :data:`OPERATIONS`."""
    if permission not in rbac.PERMISSIONS:
        raise ValueError(f"{name}: {permission} is not a permission of kiln.govern.rbac")

    def add(call: Callable[[Context, Any], Any]) -> Callable[[Context, Any], Any]:
        OPERATIONS[name] = Operation(name, summary, permission, effect, idempotent, args, call,
                                     preview, approval, route, exact)  # fmt: skip
        return call

    return add


def visible(caller: Caller) -> list[Operation]:
    """The operations the caller may call (the tools it is shown)."""
    return [op for op in OPERATIONS.values() if caller.may(op.permission)]


def args_hash(name: str, args: Args, would: Any = None) -> str:
    """The SHA-256 of an operation's exact arguments (a dry run's flag left out) and of
    what they would change (``would``, its preview: the state a person approves)."""
    data = {"args": args.model_dump(mode="json", exclude={"dry_run"}), "would": would}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{name}\n{canonical}".encode()).hexdigest()


def parse(op: Operation, raw: Mapping[str, Any] | None, ctx: Context | None = None) -> Args:
    """The arguments, checked (a :class:`kiln.errors.ValidationError` names each bad
    field) and, with a context, made exact."""
    try:
        args = op.args.model_validate(dict(raw or {}))
    except PydanticError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "arguments"
        fields = sorted({".".join(str(p) for p in err["loc"]) for err in e.errors()})
        raise ValidationError(where, f"{first['msg']} (fields in error: {', '.join(fields)})",
                              allowed=_allowed(op)) from None  # fmt: skip
    if ctx is not None and op.exact is not None:
        exact: Args = op.exact(ctx, args)
        return exact
    return args


def _allowed(op: Operation) -> str:
    return ", ".join(op.args.model_fields)


def gate(ctx: Context, op: Operation, args: Args) -> ApprovalRow | None:
    """None when the call may go ahead now; else the approval it waits for. An agent's
    call of an operation marked ``approval`` spends an approval of exactly these
    arguments and what they would change now, or asks for one."""
    who = ctx.caller
    if not op.approval or who.kind != "agent":
        return None
    assert op.preview is not None  # noqa: S101  every mutating operation has one (a test)
    # What it would change: shown to the person deciding, and hashed with the arguments,
    # so an approval is spent only while the call would still do what was approved (a
    # rollback approved as 2 -> 1 does not run once 3 was promoted). A call that cannot
    # succeed (no such model, run, endpoint) is refused now, not put before anyone.
    would = json.loads(json.dumps(op.preview(ctx, args), default=str))
    digest = args_hash(op.name, args, would)
    if ctx.store.use_approval(who.name, op.name, digest) is not None:
        return None
    now = time.time()
    row = ApprovalRow(
        id=secrets.token_hex(6), project=who.project, principal=who.name, sponsor=who.sponsor,
        operation=op.name, args=args.model_dump(mode="json", exclude={"dry_run"}),
        args_hash=digest, status="pending", created_at=now, expires_at=now + APPROVAL_WAIT_S,
        preview=would,
    )  # fmt: skip
    return ctx.store.ask_approval(row)


def waiting(row: ApprovalRow) -> dict[str, Any]:
    """What an agent is told while its call waits for a human."""
    return {
        "status": "approval_required", "approval": row.id, "approval_status": row.status,
        "operation": row.operation, "args_hash": row.args_hash,
        "message": f"{row.operation} by an agent needs a human's approval: ask a person to run "
        f"`kiln approvals approve {row.id}` (or approve it on the dashboard), then call again "
        "with exactly the same arguments. Changed arguments need a new approval.",
    }  # fmt: skip


def guard_route(store: SqlStore, who: Caller, name: str, raw: Mapping[str, Any]) -> Any:
    """The gate of an HTTP route doing what operation ``name`` does: an agent's call waits
    for an approval of exactly these arguments (403 naming it), as through the tools.
    The arguments, exact: what the route must then do."""
    op = OPERATIONS[name]
    context = Context(store, who)
    args = parse(op, raw, context)
    row = gate(context, op, args)
    if row is not None:
        raise HTTPException(403, waiting(row)["message"])
    return args


def execute(ctx: Context, name: str, raw: Mapping[str, Any] | None) -> Any:
    """Call the operation ``name`` as ``ctx.caller``: refused without its permission
    (:class:`Refused`), arguments checked, a dry run previewed, an agent's destructive
    call gated by an approval (the answer then says what it waits for)."""
    op = OPERATIONS.get(name)
    if op is None:
        raise Refused(f"no operation {name!r}")
    if not ctx.caller.may(op.permission):
        raise Refused(ctx.caller.refusal(op.permission))
    args = parse(op, raw, ctx)
    if isinstance(args, Mutating) and args.dry_run:
        assert op.preview is not None  # noqa: S101  every mutating operation has one (a test)
        return {"dry_run": True, "operation": op.name, "would": op.preview(ctx, args)}
    row = gate(ctx, op, args)
    if row is not None:
        return waiting(row)
    return op.call(ctx, args)


# -- the operations -------------------------------------------------------------------

RunId = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[0-9a-z]+$")]
Name = Annotated[str, StringConstraints(pattern=schemas.NAME_PATTERN)]
Alias = Annotated[str, StringConstraints(pattern=schemas.ALIAS_PATTERN)]
Ref = Annotated[str, StringConstraints(pattern=schemas.REF_PATTERN)]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=10_000)]  # as the API's
Key = Annotated[str, StringConstraints(min_length=1, max_length=250)]


def _run(record: Any) -> dict[str, Any]:
    """A run as an agent needs it: what it was, how it went, what it gave."""
    return {
        "id": record.id, "app": record.app, "function": record.function, "name": record.name,
        "status": str(record.status), "who": record.actor, "created_at": record.created_at,
        "ended_at": record.ended_at, "params": record.params, "tags": record.tags,
        "summary": {k: number(v) for k, v in record.summary.items()},
        "error": record.error, "parent_id": record.parent_id,
    }  # fmt: skip


class SearchRuns(Args):
    app: Name | None = None
    status: list[Literal["queued", "running", "succeeded", "failed", "cancelled", "lost",
                         "preempted"]] = Field(default_factory=list)  # fmt: skip
    params: dict[str, Any] = Field(default_factory=dict, description="Exact values to match.")
    tags: dict[str, str] = Field(default_factory=dict)
    order_by: Annotated[str, StringConstraints(min_length=1, max_length=260)] = Field(
        "-created", description="A column or metric, '-' first for descending (-accuracy)."
    )
    limit: Annotated[int, Field(ge=1, le=500)] = 20


@operation("runs_search", "Find runs by app, status, params and tags, in an order (a metric "
           "with '-' first: best first).", permission=("runs", "read"), effect="read",
           idempotent=True, args=SearchRuns, route=("POST", "/api/v1/runs:search"))  # fmt: skip
def runs_search(ctx: Context, a: SearchRuns) -> Any:
    status = tuple(RunStatus(x) for x in a.status)
    query = RunQuery(app=a.app, status=status, params=a.params, tags=a.tags,
                     order_by=a.order_by, limit=a.limit)  # fmt: skip
    return {"runs": [_run(r) for r in ctx.store.query_runs(query)]}


class OneRun(Args):
    run_id: RunId = Field(description="A run id or a unique prefix of one.")


@operation("run_get", "One run: params, status, summary metrics, artifacts, code, env.",
           permission=("runs", "read"), effect="read", idempotent=True, args=OneRun,
           route=("GET", "/api/v1/runs/{run_id}"))  # fmt: skip
def run_get(ctx: Context, a: OneRun) -> Any:
    record = ctx.store.get_run(a.run_id)
    return {**_run(record), "artifacts": [{"name": x.name, "sha256": x.sha256, "size": x.size}
                                          for x in record.artifacts],
            "code": asdict(record.code), "environment": asdict(record.environment)}  # fmt: skip


class CompareRuns(Args):
    run_ids: Annotated[list[RunId], Field(min_length=2, max_length=20)]


@operation("runs_compare", "Params and summary metrics of 2 to 20 runs side by side, with "
           "what differs.", permission=("runs", "read"), effect="read", idempotent=True,
           args=CompareRuns)  # fmt: skip
def runs_compare(ctx: Context, a: CompareRuns) -> Any:
    records = [ctx.store.get_run(r) for r in a.run_ids]
    params = sorted({k for r in records for k in r.params})
    metrics = sorted({k for r in records for k in r.summary})
    table = {
        "params": {k: [r.params.get(k) for r in records] for k in params},
        "metrics": {
            k: [number(r.summary[k]) if k in r.summary else None for r in records] for k in metrics
        },
    }
    differ = [k for k, vs in table["params"].items() if len({json.dumps(v) for v in vs}) > 1]
    return {"runs": [r.id for r in records], **table, "params_that_differ": differ}


class History(Args):
    run_id: RunId
    key: Key


@operation("metric_history", "Every point of one metric of one run (step, time, value).",
           permission=("runs", "read"), effect="read", idempotent=True, args=History,
           route=("GET", "/api/v1/runs/{run_id}/metrics/{key}"))  # fmt: skip
def metric_history(ctx: Context, a: History) -> Any:
    points = ctx.store.metric_history(a.run_id, a.key)
    return {"points": [[p.step, p.time, number(p.value)] for p in points[:10_000]]}


class Logs(Args):
    run_id: RunId
    limit: Annotated[int, Field(ge=1, le=1000)] = 200


@operation("run_logs", "What a run printed, oldest first.", permission=("runs", "read"),
           effect="read", idempotent=True, args=Logs,
           route=("GET", "/api/v1/runs/{run_id}/logs"))  # fmt: skip
def run_logs(ctx: Context, a: Logs) -> Any:
    run_id = ctx.store.get_run(a.run_id).id
    return {"logs": [{"stream": c.stream, "text": c.text}
                     for c in ctx.store.run_logs(run_id, after=0, limit=a.limit)]}  # fmt: skip


class LineageOf(Args):
    ref: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        description="A run id or an artifact's sha256."
    )
    depth: Annotated[int, Field(ge=1, le=20)] = 5


@operation("lineage", "What a run or artifact came from and what came of it.",
           permission=("runs", "read"), effect="read", idempotent=True, args=LineageOf,
           route=("GET", "/api/v1/lineage/{ref}"))  # fmt: skip
def lineage(ctx: Context, a: LineageOf) -> Any:
    return ctx.store.lineage(a.ref, depth=a.depth).to_dict()


class Why(Args):
    trace_id: Annotated[str, StringConstraints(min_length=8, max_length=60,
                                               pattern=r"^[0-9a-fA-F-]+$")]  # fmt: skip


@operation("why", "Everything behind one answer of an endpoint (its trace id): model "
           "version, who promoted it, run, code, data, environment.",
           permission=("traces", "read"), effect="read", idempotent=True, args=Why,
           route=("GET", "/api/v1/traces/{trace_id}/why"))  # fmt: skip
def why(ctx: Context, a: Why) -> Any:
    from kiln.observe.why import explain

    return json.loads(json.dumps(explain(ctx.store, a.trace_id), default=str))


class NoArgs(Args):
    pass


def _models(ctx: Context, app: str = "") -> Any:
    from kiln.registry.models import Models

    return Models(ctx.store, app=app, actor=ctx.store.actor)


@operation("models_list", "The registered models, each with its versions and aliases.",
           permission=("models", "read"), effect="read", idempotent=True, args=NoArgs,
           route=("GET", "/api/v1/models"))  # fmt: skip
def models_list(ctx: Context, a: NoArgs) -> Any:
    models = _models(ctx)
    out = []
    for name in models.names():
        versions = models.versions(name)
        shown = [{"version": v.version, "run_id": v.run_id, "signature": v.signature}
                 for v in versions[-20:]]  # fmt: skip
        out.append({"name": name, "aliases": models.aliases(name), "versions": shown})
    return {"models": out}


class Status(Args):
    status: Literal["pending", "approved", "rejected", "used", "all"] = "pending"


@operation("approvals_list", "This project's approval requests (an agent: its own) and "
           "their status.", permission=("account", "self"), effect="read", idempotent=True,
           args=Status, route=("GET", "/api/v1/approvals"))  # fmt: skip
def approvals_list(ctx: Context, a: Status) -> Any:
    mine = ctx.caller.name if ctx.caller.kind == "agent" else None
    found = ctx.store.approvals(None if a.status == "all" else a.status, principal=mine)
    return {"approvals": [asdict(r) for r in found[:200]]}


class NewVersion(Mutating):
    name: Name
    run_id: RunId
    artifact: Annotated[str, StringConstraints(min_length=1, max_length=500)]
    app: Annotated[str, StringConstraints(pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,199})?$")] = ""


def _register_preview(ctx: Context, a: NewVersion) -> Any:
    run = ctx.store.get_run(a.run_id)
    versions = _models(ctx, a.app).versions(a.name) if a.name in _models(ctx).names() else []
    found = [x for x in run.artifacts if x.name == a.artifact and x.direction == "out"]
    return {"model": a.name, "version": (versions[-1].version if versions else 0) + 1,
            "run_id": run.id, "run_status": str(run.status), "artifact": a.artifact,
            "artifact_found": bool(found)}  # fmt: skip


@operation("model_register", "Register an artifact of a succeeded run as a model's next "
           "version.", permission=("models", "write"), effect="write", idempotent=False,
           args=NewVersion, route=("POST", "/api/v1/models/{name}/versions"),
           preview=_register_preview)  # fmt: skip
def model_register(ctx: Context, a: NewVersion) -> Any:
    mv = _models(ctx, a.app).register(a.name, a.run_id, artifact=a.artifact)
    return {"model": mv.name, "version": mv.version, "run_id": mv.run_id}


class Promotion(Mutating):
    name: Name
    version: Annotated[int, Field(ge=1, le=999_999_999)]
    alias: Alias = "production"
    reason: Reason | None = None
    policy: dict[str, Any] | None = Field(None, description="Gates to add for this call.")


def _promote_preview(ctx: Context, a: Promotion) -> Any:
    models = _models(ctx)
    models.get(f"{a.name}:{a.version}")  # raises if unknown
    current = models.aliases(a.name).get(a.alias)
    if current == a.version:
        raise ValidationError("version", f"{a.name}@{a.alias} points at {a.version} already: "
                              "nothing would change")  # fmt: skip
    return {"alias": f"{a.name}@{a.alias}", "from": current, "to": a.version,
            "failing_gates": models.gate_failures(a.name, a.version, a.alias),
            "needs_approval": ctx.caller.kind == "agent"}  # fmt: skip


@operation("model_promote", "Point a model's alias at a version, through its policy's "
           "gates. An agent's promotion waits for a human's approval.",
           permission=("promotions", "request"), effect="write", idempotent=True,
           args=Promotion, approval=True, route=("POST", "/api/v1/models/{name}/promote"),
           preview=_promote_preview)  # fmt: skip
def model_promote(ctx: Context, a: Promotion) -> Any:
    done = _models(ctx).promote(a.name, a.version, alias=a.alias, reason=a.reason,
                                policy=a.policy)  # fmt: skip
    kind = "move" if done.__class__.__name__ == "AliasMove" else "request"
    return {"kind": kind, "value": asdict(done)}


class Back(Mutating):
    name: Name
    alias: Alias = "production"
    reason: Reason | None = None


def _rollback_preview(ctx: Context, a: Back) -> Any:
    models = _models(ctx)
    current = models.aliases(a.name).get(a.alias)
    moves = [m for m in models.history(a.name, a.alias) if m.to_version == current]
    back = moves[-1].from_version if moves else None
    if current is None or back is None:
        from kiln.errors import NotFoundError

        raise NotFoundError(f"{a.name}@{a.alias} has no earlier version to roll back to")
    return {"alias": f"{a.name}@{a.alias}", "from": current, "to": back}


@operation("model_rollback", "Move a model's alias back to the version it held before. "
           "An agent's rollback waits for a human's approval.",
           permission=("models", "rollback"), effect="destructive", idempotent=False,
           args=Back, approval=True, route=("POST", "/api/v1/models/{name}/rollback"),
           preview=_rollback_preview)  # fmt: skip
def model_rollback(ctx: Context, a: Back) -> Any:
    return {"kind": "move", "value": asdict(_models(ctx).rollback(a.name, a.alias,
                                                                  reason=a.reason))}  # fmt: skip


class Split(Mutating):
    endpoint: Name
    traffic: Annotated[dict[Ref, float], Field(min_length=1, max_length=100)] | None = Field(
        description="Model references and their shares (summing to 1); null: follow the "
        "endpoint's declared model again.")  # fmt: skip
    override_reason: Reason | None = Field(None, description="Set it though gates fail.")


def _traffic_preview(ctx: Context, a: Split) -> Any:
    from kiln.errors import NotFoundError

    info = ctx.store.endpoint(a.endpoint)
    if info is None:
        raise NotFoundError(f"no endpoint {a.endpoint!r}")
    if info.traffic == a.traffic:
        raise ValidationError("traffic", f"{a.endpoint}'s split is that already: nothing "
                              "would change")  # fmt: skip
    return {"endpoint": a.endpoint, "from": info.traffic, "to": a.traffic}


@operation("traffic_set", "Set an endpoint's live traffic split. An agent's change waits "
           "for a human's approval.", permission=("endpoints", "write"),
           effect="destructive", idempotent=True, args=Split, approval=True,
           route=("PUT", "/api/v1/endpoints/{name}/traffic"),
           preview=_traffic_preview)  # fmt: skip
def traffic_set(ctx: Context, a: Split) -> Any:
    from kiln.registry import traffic

    return {"traffic": traffic.set_traffic(ctx.store, a.endpoint, a.traffic,
                                           actor=ctx.store.actor,
                                           override_reason=a.override_reason)}  # fmt: skip


# -- registered functions: run on the engine of the server (or of `kiln mcp`) ------------

FunctionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")]
MAX_SWEEP_RUNS = 1000


class Offered(Protocol):
    """A function callers may run through the tools, handed to the server by whoever
    starts it (``kiln server --function``): the server never imports the SDK."""

    def shape(self) -> dict[str, Any]:
        """Its name, parameters, docstring and what each run asks for."""

    def check(self, kwargs: Mapping[str, Any]) -> None:
        """Raise :class:`kiln.errors.ValidationError` unless ``kwargs`` bind to it."""

    def spawn(self, settings: Settings, kwargs: Mapping[str, Any]) -> str:
        """Start one run recording with ``settings``; its id."""

    def sweep(self, settings: Settings, spec: list[dict[str, Any]],
              fixed: Mapping[str, Any]) -> tuple[str, list[str]]:  # fmt: skip
        """Start a sweep; its id and its runs' ids."""


def _function(ctx: Context, name: str) -> Offered:
    from kiln.errors import NotFoundError

    functions = ctx.extra.get("functions") or {}
    if name not in functions:
        known = ", ".join(sorted(functions)) or "none: the server was started without --function"
        raise NotFoundError(f"no registered function {name!r} (registered: {known})")
    found: Offered = functions[name]
    return found


def _settings(ctx: Context) -> Settings:
    """The engine's settings for the caller's runs: the caller's token (its own rights,
    its project's quota and budget where the server has a pool) and, for an agent,
    always a sandbox."""
    base: Settings = ctx.extra["settings"]
    who = ctx.caller
    for needed in (("blobs", "read"), ("blobs", "write")):  # its code and artifacts
        if not who.may(needed):
            why = who.refusal(needed)
            raise Refused(f"a function's runs record through the server as their caller, who "
                          f"needs blobs:read and blobs:write too: {why}")  # fmt: skip
    if who.kind == "agent" and base.pool is None:
        raise ValidationError("function", "an agent's runs need a pool, where its quota and "
                              "budget hold: start the server with --pool POOL")  # fmt: skip
    return dataclasses.replace(
        base, token=ctx.extra.get("token") or base.token, actor=who.name or base.actor,
        project=who.project if base.server_url else base.project,
        sandbox=base.sandbox or who.kind == "agent",
    )  # fmt: skip


def _shape(ctx: Context, fn: Offered, runs: int) -> dict[str, Any]:
    shape = fn.shape()
    settings = _settings(ctx)
    return {**shape, "runs": runs, "pool": settings.pool,
            "sandboxed": shape["sandboxed"] or settings.sandbox}  # fmt: skip


class FunctionCall(Mutating):
    function: FunctionName = Field(description="A registered function (functions_list).")
    args: dict[str, Any] = Field(default_factory=dict, description="Its keyword arguments.")


@operation("functions_list", "The functions registered to be run through these tools, with "
           "their parameters and what each run asks for.", permission=("runs", "read"),
           effect="read", idempotent=True, args=NoArgs)  # fmt: skip
def functions_list(ctx: Context, a: NoArgs) -> Any:
    found = sorted((ctx.extra.get("functions") or {}).items())
    return {"functions": [{"name": name, **_shape(ctx, fn, 1)} for name, fn in found]}


def _run_preview(ctx: Context, a: FunctionCall) -> Any:
    fn = _function(ctx, a.function)
    fn.check(a.args)
    return _shape(ctx, fn, 1)


@operation("function_run", "Start one run of a registered function with these arguments "
           "(within the project's quota and budget); returns its run id at once.",
           permission=("runs", "write"), effect="write", idempotent=False, args=FunctionCall,
           preview=_run_preview)  # fmt: skip
def function_run(ctx: Context, a: FunctionCall) -> Any:
    return {"run_id": _function(ctx, a.function).spawn(_settings(ctx), a.args)}


class FunctionSweep(Mutating):
    function: FunctionName
    grid: Annotated[dict[str, Annotated[list[Any], Field(min_length=1, max_length=1000)]],
                    Field(min_length=1, max_length=20)] = Field(
        description="Each parameter's values: one run per combination.")  # fmt: skip
    fixed: dict[str, Any] = Field(default_factory=dict, description="Arguments of every run.")


def _combinations(a: FunctionSweep) -> list[dict[str, Any]]:
    count = math.prod(len(v) for v in a.grid.values())
    if count > MAX_SWEEP_RUNS:
        raise ValidationError("grid", f"makes {count} runs", allowed=f"at most {MAX_SWEEP_RUNS}")
    keys = list(a.grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*a.grid.values())]


def _sweep_preview(ctx: Context, a: FunctionSweep) -> Any:
    fn = _function(ctx, a.function)
    spec = _combinations(a)
    fn.check({**a.fixed, **spec[0]})
    return _shape(ctx, fn, len(spec))


@operation("function_sweep", "Start a sweep of a registered function over a grid of "
           "arguments (within the project's quota and budget); returns its id at once.",
           permission=("runs", "write"), effect="write", idempotent=False, args=FunctionSweep,
           preview=_sweep_preview)  # fmt: skip
def function_sweep(ctx: Context, a: FunctionSweep) -> Any:
    sweep_id, runs = _function(ctx, a.function).sweep(_settings(ctx), _combinations(a), a.fixed)
    return {"sweep_id": sweep_id, "runs": runs}


class Removal(Mutating):
    run_id: RunId
    with_runs: bool = False
    force: bool = Field(False, description="Remove it even while it is recording.")


def _delete_preview(ctx: Context, a: Removal) -> Any:
    from kiln.errors import DependencyError

    run = ctx.store.get_run(a.run_id)
    dependants = ctx.store.dependants(run.id)
    if dependants and not a.with_runs:  # it could not be removed: nothing to approve
        raise DependencyError(f"run {run.id}", dependants)
    return {"run": run.id, "status": str(run.status), "dependants": dependants}


def _exact_run(ctx: Context, a: Removal) -> Removal:
    return a.model_copy(update={"run_id": ctx.store.get_run(a.run_id).id})


@operation("run_delete", "Remove a run's record (not while anything depends on it). An "
           "agent's removal waits for a human's approval.", permission=("runs", "delete"),
           effect="destructive", idempotent=False, args=Removal, approval=True,
           route=("DELETE", "/api/v1/runs/{run_id}"), preview=_delete_preview,
           exact=_exact_run)  # fmt: skip
def run_delete(ctx: Context, a: Removal) -> Any:
    return {"removed": ctx.store.delete_run(a.run_id, with_runs=a.with_runs, force=a.force)}
