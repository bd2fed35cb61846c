"""``RegistryStore`` over HTTP. Every gate, approval rule and audit append runs here, in
the server's transaction (:class:`kiln.registry.models.Models` over its SQL store): a
client asks for a promotion, it never decides one."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from kiln.registry.models import AliasMove, Models, ModelVersion, PromotionRequest
from kiln.server import schemas
from kiln.server.auth import Authenticated, need
from kiln.server.deps import Store
from kiln.server.operations import guard_route

router = APIRouter(prefix="/api/v1", tags=["registry"])
Name = Annotated[str, Path(pattern=schemas.NAME_PATTERN)]
Alias = Annotated[str, Path(pattern=schemas.ALIAS_PATTERN)]


def _models(store: Any, app: str = "") -> Models:
    return Models(store, app=app, actor=store.actor)


def _version(mv: ModelVersion) -> dict[str, Any]:
    return asdict(mv)


def _outcome(done: AliasMove | PromotionRequest) -> dict[str, Any]:
    kind = "move" if isinstance(done, AliasMove) else "request"
    return {"kind": kind, "value": asdict(done)}


@router.get("/models", dependencies=[need("models", "read")], response_model=schemas.Names)
def names(store: Store) -> Any:
    return {"items": _models(store).names()}


@router.get(
    "/models/resolve",
    dependencies=[need("models", "read")],
)
def resolve(store: Store, ref: Annotated[str, Query(pattern=schemas.REF_PATTERN)]) -> Any:
    """The version a reference (``name:3`` or ``name@alias``) points at now."""
    return _version(_models(store).get(ref))


@router.post(
    "/models/{name}/versions",
    dependencies=[need("models", "write")],
)
def register(name: Name, body: schemas.Register, store: Store) -> Any:
    """Register an artifact of a succeeded run as the model's next version."""
    models = _models(store, body.app)
    return _version(models.register(name, body.run_id, artifact=body.artifact,
                                    signature=body.signature))  # fmt: skip


@router.get(
    "/models/{name}/versions",
    dependencies=[need("models", "read")],
)
def versions(name: Name, store: Store) -> Any:
    return {"versions": [_version(v) for v in _models(store).versions(name)]}


@router.get(
    "/models/{name}/aliases",
    dependencies=[need("models", "read")],
)
def aliases(name: Name, store: Store) -> dict[str, int]:
    return _models(store).aliases(name)


@router.get(
    "/models/{name}/history",
    dependencies=[need("models", "read")],
)
def history(
    name: Name,
    store: Store,
    alias: Annotated[str | None, Query(pattern=schemas.ALIAS_PATTERN)] = None,
) -> Any:
    return {"moves": [asdict(m) for m in _models(store).history(name, alias)]}


@router.post(
    "/models/{name}/promote",
    dependencies=[need("promotions", "request")],
    response_model=schemas.Outcome,
)
def promote(name: Name, body: schemas.Promote, store: Store, who: Authenticated) -> Any:
    """Move an alias to a version, through its policy's gates (or open a request). An
    agent's promotion waits for a human's approval of exactly these arguments."""
    if who.kind == "agent":
        guard_route(store, who, "model_promote", {"name": name, **body.model_dump()})
    return _outcome(_models(store).promote(name, body.version, alias=body.alias,
                                           reason=body.reason, policy=body.policy))  # fmt: skip


@router.post(
    "/models/{name}/rollback",
    dependencies=[need("models", "rollback")],
    response_model=schemas.Outcome,
)
def rollback(name: Name, body: schemas.Rollback, store: Store, who: Authenticated) -> Any:
    """Move an alias back to the version it held before (an agent's: once approved)."""
    if who.kind == "agent":
        guard_route(store, who, "model_rollback", {"name": name, **body.model_dump()})
    return _outcome(_models(store).rollback(name, body.alias, reason=body.reason))


@router.get(
    "/models/{name}/policies/{alias}",
    dependencies=[need("models", "read")],
)
def policy(name: Name, alias: Alias, store: Store) -> Any:
    return {"policy": _models(store).policy(name, alias)}


@router.put(
    "/models/{name}/policies/{alias}", dependencies=[need("policies", "write")], status_code=204
)
def set_policy(name: Name, alias: Alias, body: schemas.SetPolicy, store: Store) -> None:
    _models(store).set_policy(name, alias, body.policy, weaken=body.weaken, reason=body.reason)


@router.get(
    "/models/{name}/versions/{version}/gates",
    dependencies=[need("models", "read")],
)
def gate_failures(
    name: Name, version: Annotated[int, Path(ge=1, le=999_999_999)], store: Store,
    alias: Annotated[str, Query(pattern=schemas.ALIAS_PATTERN)] = "production",
) -> Any:  # fmt: skip
    """Every gate of ``name@alias``'s stored policy that the version fails."""
    return {"items": _models(store).gate_failures(name, version, alias)}


@router.get(
    "/promotion-requests",
    dependencies=[need("models", "read")],
)
def requests(
    store: Store,
    status: Annotated[str | None, Query(pattern="^(pending|applied|rejected|failed|all)$")] = (
        "pending"
    ),
) -> Any:
    found = _models(store).requests(status=None if status == "all" else status)
    return {"requests": [asdict(r) for r in found]}


@router.post(
    "/promotion-requests/{request_id}/approve",
    dependencies=[need("promotions", "approve")],
)
def approve(request_id: Annotated[str, Path(min_length=1, max_length=32)], store: Store) -> Any:
    return asdict(_models(store).approve(request_id))


@router.post(
    "/promotion-requests/{request_id}/reject",
    dependencies=[need("promotions", "approve")],
)
def reject(
    request_id: Annotated[str, Path(min_length=1, max_length=32)], body: schemas.Reject,
    store: Store,
) -> Any:  # fmt: skip
    return asdict(_models(store).reject(request_id, reason=body.reason))
