"""Approvals of agents' actions: listed for the project (an agent sees its own), decided
by a human with ``approvals:decide``. An agent never decides one, nor does a service."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, StringConstraints
from starlette.exceptions import HTTPException

from kiln.server import schemas
from kiln.server.auth import Authenticated, need
from kiln.server.deps import Store
from kiln.server.operations import APPROVAL_USE_S

router = APIRouter(prefix="/api/v1", tags=["approvals"])
ApprovalId = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$")]


class ApprovalsOut(BaseModel):
    approvals: list[dict[str, Any]]


class Decision(schemas.Strict):
    reason: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = None


@router.get("/approvals", response_model=ApprovalsOut, dependencies=[need("account", "self")])
def list_approvals(
    store: Store, who: Authenticated,
    status: Annotated[Literal["pending", "approved", "rejected", "used", "all"],
                      Query()] = "pending",
) -> Any:  # fmt: skip
    """This project's approval requests, newest first (an agent's token: its own)."""
    mine = who.name if who.kind == "agent" else None
    found = store.approvals(None if status == "all" else status, principal=mine)
    return {"approvals": [asdict(r) for r in found]}


@router.get("/approvals/{approval_id}", response_model=ApprovalsOut,
            dependencies=[need("account", "self")])  # fmt: skip
def get_approval(approval_id: ApprovalId, store: Store, who: Authenticated) -> Any:
    """One approval request, with the exact arguments it is bound to."""
    found = store.approval(approval_id)
    if who.kind == "agent" and found.principal != who.name:
        from kiln.errors import NotFoundError

        raise NotFoundError(f"no approval {approval_id!r}; `kiln approvals ls` lists them")
    return {"approvals": [asdict(found)]}


def _decide(approval_id: str, body: Decision, store: Any, who: Any, approve: bool) -> Any:
    if who.kind != "user":
        who_is = "an agent" if who.kind == "agent" else f"a {who.kind} account"
        raise HTTPException(403, f"{who_is} may not decide approvals: a person does")
    found = store.approval(approval_id)
    if found.principal == who.name:
        raise HTTPException(403, "nobody approves their own request")
    done = store.decide_approval(approval_id, approve=approve, reason=body.reason,
                                 use_within_s=APPROVAL_USE_S)  # fmt: skip
    return {"approvals": [asdict(done)]}


@router.post("/approvals/{approval_id}/approve", response_model=ApprovalsOut,
             dependencies=[need("approvals", "decide")])  # fmt: skip
def approve(approval_id: ApprovalId, body: Decision, store: Store, who: Authenticated) -> Any:
    """Approve a pending request: the agent's next call with exactly its arguments runs,
    once, within the hour."""
    return _decide(approval_id, body, store, who, True)


@router.post("/approvals/{approval_id}/reject", response_model=ApprovalsOut,
             dependencies=[need("approvals", "decide")])  # fmt: skip
def reject(approval_id: ApprovalId, body: Decision, store: Store, who: Authenticated) -> Any:
    """Reject a pending request."""
    return _decide(approval_id, body, store, who, False)
