"""The SQL side of shared hardware: pools, queues, budgets and workloads. Each change of
a pool, queue or budget is written with its audit event in the same transaction."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, fields
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kiln.errors import NotFoundError
from kiln.record import audit
from kiln.record.store._schema import budgets, pools, queues, workloads
from kiln.record.store.base import BudgetRow, PoolRow, QueueRow, WorkloadRow

LIVE = ("pending", "admitted")
_WORKLOAD_COLUMNS = [f.name for f in fields(WorkloadRow)]


class Quotas:
    """Mixed into :class:`~kiln.record.store.sql.SqlStore`. Pools are the server's (one
    for every project); queues and budgets are the store's project's."""

    if TYPE_CHECKING:  # what SqlStore provides
        actor: str
        project: str
        dialect: str

        def transaction(self) -> AbstractContextManager[Connection]: ...

        def connect(self) -> Connection: ...

        def append_events(self, conn: Connection, events: list[audit.Event]) -> None: ...

        def _upsert(self, conn: Connection, table: sa.Table, rows: list[dict[str, Any]], *,
                    keys: Sequence[str], update: Sequence[str]) -> None: ...  # fmt: skip

    # -- pools ---------------------------------------------------------------------

    def set_pool(self, row: PoolRow) -> None:
        with self.transaction() as conn:
            conn.execute(pools.delete().where(pools.c.name == row.name))
            conn.execute(pools.insert().values(**asdict(row)))
            self.append_events(conn, [audit.Event(
                "pool.set", row.name, {"capacity": row.capacity, "gpu_type": row.gpu_type},
                row.updated_at, self.actor)])  # fmt: skip

    def pools(self) -> list[PoolRow]:
        with self.connect() as conn:
            found = conn.execute(sa.select(pools).order_by(pools.c.name)).mappings().all()
        return [PoolRow(**r) for r in found]

    # -- queues --------------------------------------------------------------------

    def set_queue(self, row: QueueRow) -> None:
        """Set this project's queue on ``row.pool`` (the row's project is replaced)."""
        row = QueueRow(**{**asdict(row), "project": self.project})
        with self.transaction() as conn:
            found = conn.execute(sa.select(pools.c.name).where(pools.c.name == row.pool))
            if found.first() is None:
                raise NotFoundError(f"no pool {row.pool!r}; `kiln pools ls` lists them")
            where = (queues.c.project == row.project, queues.c.pool == row.pool)
            conn.execute(queues.delete().where(*where))
            conn.execute(queues.insert().values(**asdict(row)))
            payload = {k: v for k, v in asdict(row).items()
                       if k not in ("project", "updated_at", "updated_by")}  # fmt: skip
            self.append_events(conn, [audit.Event("queue.set", row.pool, payload,
                                                  row.updated_at, self.actor)])  # fmt: skip

    def remove_queue(self, pool: str) -> None:
        with self.transaction() as conn:
            gone = conn.execute(queues.delete().where(
                queues.c.project == self.project, queues.c.pool == pool)).rowcount  # fmt: skip
            if not gone:
                raise NotFoundError(f"project {self.project!r} has no queue on pool {pool!r}")
            self.append_events(conn, [audit.Event("queue.remove", pool, {}, time.time(),
                                                  self.actor)])  # fmt: skip

    def queues(self, *, every_project: bool = False) -> list[QueueRow]:
        """This project's queues, or (for the server's admission) every project's."""
        query = sa.select(queues).order_by(queues.c.pool, queues.c.project)
        if not every_project:
            query = query.where(queues.c.project == self.project)
        with self.connect() as conn:
            found = conn.execute(query).mappings().all()
        return [QueueRow(**r) for r in found]

    # -- budgets -------------------------------------------------------------------

    def set_budget(self, row: BudgetRow) -> None:
        row = BudgetRow(**{**asdict(row), "project": self.project})
        with self.transaction() as conn:
            where = (budgets.c.project == row.project, budgets.c.principal == row.principal)
            conn.execute(budgets.delete().where(*where))
            conn.execute(budgets.insert().values(**asdict(row)))
            payload = {"amount": row.amount, "period": row.period}
            event = audit.Event("budget.set", row.principal or row.project, payload,
                                row.updated_at, self.actor)  # fmt: skip
            self.append_events(conn, [event])

    def remove_budget(self, principal: str) -> None:
        with self.transaction() as conn:
            where = (budgets.c.project == self.project, budgets.c.principal == principal)
            gone = conn.execute(budgets.delete().where(*where)).rowcount
            if not gone:
                raise NotFoundError(f"no budget for {principal or 'the project'!r}")
            self.append_events(conn, [audit.Event("budget.remove", principal or self.project,
                                                  {}, time.time(), self.actor)])  # fmt: skip

    def budgets(self, *, every_project: bool = False) -> list[BudgetRow]:
        query = sa.select(budgets).order_by(budgets.c.project, budgets.c.principal)
        if not every_project:
            query = query.where(budgets.c.project == self.project)
        with self.connect() as conn:
            found = conn.execute(query).mappings().all()
        return [BudgetRow(**r) for r in found]

    # -- workloads -----------------------------------------------------------------

    def save_workloads(self, rows: list[WorkloadRow], events: Sequence[audit.Event] = ()) -> None:
        """Insert or replace workload rows (the server's admission keeps them), with
        ``events`` (preemptions) in the same transaction."""
        if not rows and not events:
            return
        with self.transaction() as conn:
            if rows:
                self._upsert(conn, workloads, [asdict(r) for r in rows], keys=["project", "id"],
                             update=[c for c in _WORKLOAD_COLUMNS
                                     if c not in ("project", "id")])  # fmt: skip
            if events:
                self.append_events(conn, list(events))

    def workloads(
        self, *, states: Sequence[str] = LIVE, every_project: bool = False,
        ids: Sequence[str] | None = None,
    ) -> list[WorkloadRow]:  # fmt: skip
        query = sa.select(workloads).where(workloads.c.state.in_(list(states)))
        if not every_project:
            query = query.where(workloads.c.project == self.project)
        if ids is not None:
            query = query.where(workloads.c.id.in_(list(ids)))
        with self.connect() as conn:
            found = conn.execute(query.order_by(workloads.c.submitted_at)).mappings().all()
        return [WorkloadRow(**r) for r in found]

    def spent(self, project: str | None, principal: str | None, since: float) -> float:
        """Dollars charged to ``project`` (None: every project), or to one principal of
        it, by workloads submitted since ``since``: what ended ones cost, and the most
        live ones may still cost."""
        live = workloads.c.state.in_(LIVE)
        most = sa.func.max if self.dialect == "sqlite" else sa.func.greatest  # of two values
        charge = sa.case((live, most(workloads.c.cost, workloads.c.max_cost)),
                         else_=workloads.c.cost)  # fmt: skip
        query = sa.select(sa.func.coalesce(sa.func.sum(charge), 0.0))
        query = query.where(workloads.c.submitted_at >= since)
        if project is not None:
            query = query.where(workloads.c.project == project)
        if principal:
            query = query.where(workloads.c.principal == principal)
        with self.connect() as conn:
            return float(conn.execute(query).scalar_one())
