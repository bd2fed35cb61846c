"""``AuditLog`` over HTTP, and garbage collection run by the server on its own blobs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from starlette.exceptions import HTTPException

from kiln.config import DEFAULT_PROJECT
from kiln.record.audit import Problem
from kiln.server import schemas
from kiln.server.auth import Authenticated, need
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
    """The newest event's number and hash. The chain is one for the server (its hashes
    say nothing of what the events hold), so that it can be anchored as a whole."""
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
def verify(store: Store, who: Authenticated) -> Any:
    """Check the whole chain, every seal against its data and every referenced blob. The
    chain is one for the server: outside the default project, problems in other
    projects' records are counted, not described."""
    problems = list(store.verify())
    if who.project != DEFAULT_PROJECT:
        mine = store.events_of_project([p.seq for p in problems if p.seq is not None])
        elsewhere = [p for p in problems if p.seq not in mine]
        problems = [p for p in problems if p.seq in mine]
        if elsewhere:
            problems.append(
                Problem(
                    None,
                    f"{len(elsewhere)} problems in other projects' "
                    "records (an admin of the default project sees them)",
                )
            )
    return {"problems": [{"seq": p.seq, "message": p.message} for p in problems]}


@router.post("/gc", dependencies=[need("store", "gc")], response_model=schemas.GcDone)
def gc(
    body: schemas.GcRequest, request: Request, store: Store, blobs: Blobs, who: Authenticated
) -> Any:
    """Remove the server's blobs that no record names and that are older than
    ``min_age_s`` (``dry_run``: only say which). The blobs are every project's: only an
    admin of the default project may."""
    from kiln.record.gc import collect

    if who.project != DEFAULT_PROJECT:
        raise HTTPException(403, "only an admin of the default project collects garbage")
    removed, kept = collect(store, blobs, request.app.state.home, min_age_s=body.min_age_s,
                            dry_run=body.dry_run)  # fmt: skip
    return {"removed": removed, "kept": kept}
