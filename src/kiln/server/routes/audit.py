"""``AuditLog`` over HTTP, and garbage collection run by the server on its own blobs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from kiln.server import schemas
from kiln.server.auth import need
from kiln.server.deps import Blobs, Store

router = APIRouter(prefix="/api/v1", tags=["audit"])


@router.get("/audit/events", dependencies=[need("audit", "read")], response_model=schemas.Events)
def events(
    store: Store,
    actor: Annotated[str | None, Query(max_length=200)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    target: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 100,
) -> Any:
    """Audit events, newest first, filtered by actor, action and target (a prefix)."""
    return {"events": store.audit_events(actor=actor, action=action, target=target,
                                         limit=limit)}  # fmt: skip


@router.get("/audit/head", dependencies=[need("audit", "read")], response_model=schemas.Head)
def head(store: Store) -> Any:
    """The newest event's number and hash."""
    seq, digest = store.chain_head()
    return {"seq": seq, "hash": digest}


@router.get(
    "/audit/events/{seq}", dependencies=[need("audit", "read")], response_model=schemas.Head
)
def event_hash(seq: Annotated[int, Path(ge=1, le=2**63 - 1)], store: Store) -> Any:
    """The hash of event ``seq``."""
    from kiln.errors import NotFoundError

    digest = store.event_hash(seq)
    if digest is None:
        raise NotFoundError(f"there is no audit event {seq}")
    return {"seq": seq, "hash": digest}


@router.post("/audit/verify", dependencies=[need("audit", "read")], response_model=schemas.Verdict)
def verify(store: Store) -> Any:
    """Check the whole chain, every seal against its data and every referenced blob."""
    return {"problems": [{"seq": p.seq, "message": p.message} for p in store.verify()]}


@router.post("/gc", dependencies=[need("store", "gc")], response_model=schemas.GcDone)
def gc(body: schemas.GcRequest, request: Request, store: Store, blobs: Blobs) -> Any:
    """Remove the server's blobs that no record names and that are older than
    ``min_age_s`` (``dry_run``: only say which)."""
    from kiln.record.gc import collect

    removed, kept = collect(store, blobs, request.app.state.home, min_age_s=body.min_age_s,
                            dry_run=body.dry_run)  # fmt: skip
    return {"removed": removed, "kept": kept}
