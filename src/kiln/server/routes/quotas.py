"""Shared hardware: pools, queues, budgets, and admission of workloads (see
:mod:`kiln.server.quotas`). Pools are the server's, set by admins of the default
project; queues and budgets are a project's, set by its admins; members submit."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field, StringConstraints
from starlette.exceptions import HTTPException

from kiln.config import DEFAULT_PROJECT
from kiln.record.store.base import BudgetRow, PoolRow, QueueRow
from kiln.server import schemas
from kiln.server.auth import Authenticated, need
from kiln.server.deps import Store
from kiln.server.quotas import Admissions, amounts

router = APIRouter(prefix="/api/v1", tags=["quotas"])
PoolName = Annotated[str, Path(pattern=schemas.NAME_PATTERN)]
Cores = Annotated[float, Field(ge=0, le=1_000_000)]
Bytes = Annotated[int, Field(ge=0, le=1 << 60)]
Gpus = Annotated[float, Field(ge=0, le=100_000)]
MAX_BATCH = 1000  # workloads in one request


class Amount(schemas.Strict):
    """Resources: cores, bytes of memory, GPUs (fractions of one device allowed)."""

    cpu: Cores = 0.0
    memory_bytes: Bytes = 0
    gpu: Gpus = 0.0

    def units(self) -> dict[str, int]:
        return amounts(self.cpu, self.memory_bytes, self.gpu)


class NewPool(Amount):
    gpu_type: Annotated[str, StringConstraints(pattern=schemas.NAME_PATTERN)] | None = None


class NewQueue(Amount):
    """A project's nominal quota on a pool, its cohort, limits and how it queues."""

    cohort: Annotated[str, StringConstraints(pattern=schemas.NAME_PATTERN)] | None = None
    borrowing_limit: Amount | None = None  # None: may borrow whatever its cohort lends
    lending_limit: Amount | None = None  # None: lends all of its nominal quota
    weight: Annotated[float, Field(gt=0, le=1000)] = 1.0
    strategy: Literal["strict", "best-effort"] = "best-effort"
    fair_sharing: bool = False


class NewBudget(schemas.Strict):
    principal: Annotated[str, StringConstraints(pattern=schemas.NAME_PATTERN)] | None = None
    amount: Annotated[float, Field(ge=0, le=1e12)]
    period: Literal["day", "week", "month", "total"] = "month"


class Ask(Amount):
    """One run asking for admission."""

    id: schemas.RunId
    timeout_s: Annotated[float, Field(gt=0, le=10 * 365 * 86400)] | None = None
    priority: Annotated[int, Field(ge=-100, le=100)] = 0


class Submission(schemas.Strict):
    pool: Annotated[str, StringConstraints(pattern=schemas.NAME_PATTERN)]
    workloads: Annotated[list[Ask], Field(min_length=1, max_length=MAX_BATCH)]
    # the engine's workloads that ended since it last said (so it needs no sync for them)
    ended: Annotated[list[schemas.RunId], Field(max_length=100_000)] = Field(default_factory=list)


class Sync(schemas.Strict):
    held: Annotated[list[schemas.RunId], Field(max_length=100_000)] = Field(default_factory=list)
    # those of ``held`` the engine runs now (the rest wait)
    running: Annotated[list[schemas.RunId], Field(max_length=100_000)] = Field(default_factory=list)
    ended: Annotated[list[schemas.RunId], Field(max_length=100_000)] = Field(default_factory=list)


class WhatIf(Amount):
    pool: Annotated[str, StringConstraints(pattern=schemas.NAME_PATTERN)]
    timeout_s: Annotated[float, Field(gt=0, le=10 * 365 * 86400)] | None = None
    priority: Annotated[int, Field(ge=-100, le=100)] = 0


class Listing(BaseModel):
    items: list[dict[str, Any]]


class Answers(BaseModel):
    workloads: list[dict[str, Any]]
    lease_s: float  # sync within this, or the workloads are reclaimed


class Synced(BaseModel):
    admitted: list[str]
    preempt: list[dict[str, str]]
    unknown: list[str]
    lease_s: float


def admissions(request: Request) -> Admissions:
    found: Admissions = request.app.state.admissions
    return found


@router.get("/pools", response_model=Listing, dependencies=[need("runs", "read")])
def list_pools(request: Request) -> Any:
    """Every pool: capacity, what its queues hold now, and how much waits."""
    return {"items": admissions(request).pools()}


@router.put("/pools/{name}", status_code=204, dependencies=[need("pools", "admin")])
def set_pool(name: PoolName, body: NewPool, request: Request, store: Store,
             who: Authenticated) -> None:  # fmt: skip
    """Register or change a pool and its capacity (admins of the default project)."""
    if who.project != DEFAULT_PROJECT:
        raise HTTPException(403, "only an admin of the default project sets pools")
    row = PoolRow(name=name, capacity=body.units(), gpu_type=body.gpu_type,
                  updated_at=time.time(), updated_by=store.actor)  # fmt: skip
    admissions(request).set_pool(store, row)


@router.get("/queues", response_model=Listing, dependencies=[need("runs", "read")])
def list_queues(request: Request, store: Store) -> Any:
    """The project's queues: quota, limits, what they hold and what waits."""
    return {"items": admissions(request).queues(store.project)}


@router.put("/queues/{pool}", status_code=204, dependencies=[need("quotas", "admin")])
def set_queue(pool: PoolName, body: NewQueue, request: Request, store: Store) -> None:
    """Set the project's queue on ``pool`` (project admins)."""
    row = QueueRow(
        project=store.project, pool=pool, nominal=body.units(), cohort=body.cohort,
        borrowing_limit={} if body.borrowing_limit is None else _limits(body.borrowing_limit),
        lending_limit={} if body.lending_limit is None else _limits(body.lending_limit),
        weight=body.weight, strategy=body.strategy, fair_sharing=body.fair_sharing,
        updated_at=time.time(), updated_by=store.actor,
    )  # fmt: skip
    admissions(request).set_queue(store, row)


def _limits(amount: Amount) -> dict[str, int]:
    """Limits name every resource: one left at 0 is a limit of 0, not "no limit"."""
    units = amount.units()
    return {r: units.get(r, 0) for r in ("cpu", "memory", "gpu")}


@router.delete("/queues/{pool}", status_code=204, dependencies=[need("quotas", "admin")])
def remove_queue(pool: PoolName, request: Request, store: Store) -> None:
    admissions(request).remove_queue(store, pool)


@router.get("/budgets", response_model=Listing, dependencies=[need("runs", "read")])
def list_budgets(request: Request, store: Store) -> Any:
    """The project's budgets, with what is spent this period (the most live runs may
    still cost counted in) and what is left."""
    return {"items": admissions(request).budgets(store)}


@router.put("/budgets", status_code=204, dependencies=[need("quotas", "admin")])
def set_budget(body: NewBudget, request: Request, store: Store) -> None:
    """Set the project's budget, or one principal's (project admins)."""
    row = BudgetRow(project=store.project, principal=body.principal or "", amount=body.amount,
                    period=body.period, updated_at=time.time(),
                    updated_by=store.actor)  # fmt: skip
    admissions(request).set_budget(store, row)


@router.delete("/budgets", status_code=204, dependencies=[need("quotas", "admin")])
def remove_budget(
    request: Request,
    store: Store,
    principal: Annotated[str | None, Query(pattern=schemas.NAME_PATTERN)] = None,
) -> None:  # fmt: skip
    admissions(request).remove_budget(store, principal or "")


@router.post("/workloads", response_model=Answers, dependencies=[need("runs", "write")])
def submit(body: Submission, request: Request, store: Store, who: Authenticated) -> Any:
    """Ask a pool to admit runs: each is ``admitted``, ``pending`` (with the reason) or
    ``refused`` (with the reason: a budget, or more than the queue could ever have)."""
    items = [w.model_dump() for w in body.workloads]
    principal = who.name or store.actor
    found = admissions(request).submit(store, principal, who.kind == "agent", body.pool, items,
                                       list(body.ended))  # fmt: skip
    return {"workloads": found, "lease_s": admissions(request).lease_s}


@router.post("/workloads:sync", response_model=Synced, dependencies=[need("runs", "write")])
def sync(body: Sync, request: Request, store: Store) -> Any:
    """An engine's heartbeat: renew the leases of ``held``, end ``ended``; the answer
    says which are admitted, which to preempt, which the server does not know."""
    return admissions(request).sync(store, list(body.held), list(body.ended), list(body.running))


@router.get("/workloads", response_model=Listing, dependencies=[need("runs", "read")])
def list_workloads(request: Request, store: Store) -> Any:
    """The project's live workloads; a pending one says why it waits."""
    return {"items": admissions(request).listing(store)}


@router.get("/workloads/{run_id}", dependencies=[need("runs", "read")])
def explain(run_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")], request: Request,
            store: Store) -> dict[str, Any]:  # fmt: skip
    """Why a run waits, was preempted or refused: its workload, and for a pending one
    the resource it lacks, how much, and who holds it."""
    return admissions(request).explain(store, run_id)


@router.post("/workloads:what-if", dependencies=[need("runs", "read")])
def what_if(body: WhatIf, request: Request, store: Store, who: Authenticated) -> dict[str, Any]:
    """What a run of this shape would meet now: admitted or not, why, and whom it would
    preempt. Nothing changes."""
    principal = who.name or store.actor
    return admissions(request).what_if(store, principal, who.kind == "agent", body.pool,
                                       body.model_dump(exclude={"pool"}))  # fmt: skip
