"""Admission on the server: engines ask it before they start work on a shared pool.

Pools, queues and budgets come from the store; each pool's queues run the state
machine of :mod:`kiln.govern.admission` (a project's queue on a pool is named after
the project). Every workload is a run asking a pool for its resources. The engine that
asked holds a **lease**, renewed by its syncs; a lease not renewed within
``lease_s`` is reclaimed, as if the run had finished. The state lives in memory and
in the ``workloads`` table: a restarted server takes the admitted ones back as they
are and queues the pending ones again, in their order.

Budgets hold before work starts: a workload is admitted only if its *most possible*
cost (its requests for its whole timeout, at the server's prices) fits what is left of
every budget that applies (its project's, its principal's), counting the most that
live workloads may still cost. So a budget is never overshot; a function without a
timeout under a budget is refused, with the reason.
"""

from __future__ import annotations

import calendar
import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from kiln.errors import NotFoundError, ValidationError
from kiln.govern.admission import Admission, Admit, Preempt, Queue, Submit, Workload
from kiln.govern.admission import Finish as Done
from kiln.observe.cost import Prices, Usage
from kiln.record import audit
from kiln.record.store.base import BudgetRow, PoolRow, QueueRow, WorkloadRow
from kiln.record.store.sql import SqlStore

LEASE_S = 30.0
_log = logging.getLogger("kiln")
Note = tuple[str, audit.Event]  # an audit event and the project it belongs to
AGENT_PRIORITY = -1000  # added to an agent's priority: a human's work always ranks above
RESOURCES = ("cpu", "memory", "gpu")
PERIODS = ("day", "week", "month", "total")


def amounts(cpu: float, memory_bytes: int, gpu: float) -> dict[str, int]:
    """A request in admission units: thousandths of a core, MiB, thousandths of a GPU
    (rounded up: a request of anything is never counted as nothing)."""
    out = {"cpu": math.ceil(round(cpu * 1000, 6)), "memory": math.ceil(memory_bytes / 2**20),
           "gpu": math.ceil(round(gpu * 1000, 6))}  # fmt: skip
    return {k: v for k, v in out.items() if v > 0}


def shown(values: dict[str, int]) -> dict[str, float]:
    """Admission units as people count them: cores, GiB, GPUs."""
    scale = {"cpu": 1000, "memory": 1024, "gpu": 1000}
    return {k: v / scale.get(k, 1) for k, v in values.items()}


def period_start(period: str, now: float) -> float:
    """When the budget period holding ``now`` began (UTC; weeks start on Monday)."""
    if period == "total":
        return 0.0
    day = now - now % 86400
    if period == "day":
        return day
    if period == "week":
        return day - time.gmtime(now).tm_wday * 86400
    t = time.gmtime(now)
    return float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))


@dataclass
class _Live:
    row: WorkloadRow
    deadline: float  # of its lease, on the monotonic clock
    notices: list[dict[str, str]] = field(default_factory=list)  # preemptions not yet told


class Admissions:
    """The server's admission: one state machine per pool, the live workloads and their
    leases. Every method takes the lock: decisions are made one at a time."""

    def __init__(self, store: SqlStore, prices: Prices | None, lease_s: float = LEASE_S) -> None:
        self.store = store
        self.prices = prices
        self.lease_s = lease_s
        self._lock = threading.RLock()
        self._pools: dict[str, PoolRow] = {}
        self._queues: dict[tuple[str, str], QueueRow] = {}  # (pool, project)
        self._machines: dict[str, Admission] = {}
        self._live: dict[str, _Live] = {}  # by project/id (see _key)
        self._budgets: list[BudgetRow] = []
        self._stop = threading.Event()
        with self._lock:
            self._load()
        self._reaper = threading.Thread(target=self._reap_loop, name="kiln-leases", daemon=True)
        self._reaper.start()

    def close(self) -> None:
        self._stop.set()

    def _reap_loop(self) -> None:
        """Reclaim what engines stopped holding, even while no engine calls."""
        while not self._stop.wait(max(0.2, self.lease_s / 4)):
            try:
                with self._lock:
                    self._reap()
            except Exception as exc:  # the database is away: the next round tries again
                _log.warning("kiln: reclaiming expired leases failed: %s", exc)

    # -- configuration ---------------------------------------------------------------

    def _load(self) -> None:
        """Pools, queues and live workloads from the store (at start)."""
        self._pools = {p.name: p for p in self.store.pools()}
        self._queues = {(q.pool, q.project): q for q in self.store.queues(every_project=True)}
        rows = self.store.workloads(every_project=True)
        deadline = time.monotonic() + self.lease_s  # engines get a lease's time to sync
        self._live = {_key(r): _Live(r, deadline) for r in rows}
        self._budgets = self.store.budgets(every_project=True)
        for pool in self._pools:
            self._rebuild(pool)

    def _rebuild(self, pool: str) -> None:
        """A new state machine for ``pool``'s queues: admitted workloads adopted as they
        are, pending ones queued again in their order of arrival."""
        queues = [_queue(q) for (p, _), q in self._queues.items() if p == pool]
        machine = self._machines[pool] = Admission(queues)
        live = [w for w in self._live.values() if w.row.pool == pool]
        changed: list[WorkloadRow] = []
        for w in live:
            if w.row.state == "admitted" and w.row.project in machine.queues:
                machine.adopt(_workload(w.row))
        for w in sorted(live, key=lambda w: w.row.submitted_at):
            if w.row.state == "pending" and w.row.project in machine.queues:
                changed += self._apply(machine.handle(Submit(_workload(w.row))))
        self._save(self.store, changed, [])

    def set_pool(self, store: SqlStore, row: PoolRow) -> None:
        with self._lock:
            queues = [q for (p, _), q in self._queues.items() if p == row.name]
            for r in {r for q in queues for r in q.nominal}:
                held = sum(q.nominal.get(r, 0) for q in queues)
                if held > row.capacity.get(r, 0):
                    raise ValidationError(
                        r if r != "memory" else "memory_bytes",
                        f"pool {row.name!r} would have {shown({r: row.capacity.get(r, 0)})[r]:g} "
                        f"and its queues' nominal quotas hold {shown({r: held})[r]:g}: lower "
                        "them first (`kiln queues set`)")  # fmt: skip
            store.set_pool(row)
            self._pools[row.name] = row
            self._rebuild(row.name)

    def set_queue(self, store: SqlStore, row: QueueRow) -> None:
        with self._lock:
            pool = self._pools.get(row.pool)
            if pool is None:
                raise NotFoundError(f"no pool {row.pool!r}; `kiln pools ls` lists them")
            others = [q for (p, project), q in self._queues.items()
                      if p == row.pool and project != row.project]  # fmt: skip
            for r, n in row.nominal.items():
                held = sum(q.nominal.get(r, 0) for q in others)
                has = pool.capacity.get(r, 0)
                if held + n > has:
                    left, total = shown({r: max(0, has - held)})[r], shown({r: has})[r]
                    extra = f"; the other queues hold {shown({r: held})[r]:g}" if held else ""
                    raise ValidationError(
                        f"nominal.{r}", f"{shown({r: n})[r]:g} is more than pool {row.pool!r} "
                        f"can give: {left:g} of its {total:g}{extra}")  # fmt: skip
            store.set_queue(row)
            self._queues[(row.pool, store.project)] = replace(row, project=store.project)
            self._rebuild(row.pool)

    def remove_queue(self, store: SqlStore, pool: str) -> None:
        with self._lock:
            busy = [w for w in self._live.values()
                    if w.row.pool == pool and w.row.project == store.project]  # fmt: skip
            if busy:
                raise ValidationError("pool", f"the queue on {pool!r} has {len(busy)} live "
                                      "workloads; remove it once they have ended")  # fmt: skip
            store.remove_queue(pool)
            self._queues.pop((pool, store.project), None)
            self._rebuild(pool)

    def pools(self) -> list[dict[str, Any]]:
        with self._lock:
            out = []
            for p in self._pools.values():
                machine = self._machines[p.name]
                used: dict[str, int] = {}
                for usage in machine.usage.values():
                    for r, n in usage.items():
                        used[r] = used.get(r, 0) + n
                out.append({"name": p.name, "capacity": shown(p.capacity),
                            "gpu_type": p.gpu_type, "in_use": shown(used),
                            "queues": sorted(machine.queues),
                            "pending": sum(len(v) for v in machine.pending.values())})  # fmt: skip
            return out

    def queues(self, project: str) -> list[dict[str, Any]]:
        with self._lock:
            out = []
            for (pool, owner), q in sorted(self._queues.items()):
                if owner != project:
                    continue
                machine = self._machines[pool]
                out.append({"pool": pool, "cohort": q.cohort, "nominal": shown(q.nominal),
                            "borrowing_limit": shown(q.borrowing_limit),
                            "lending_limit": shown(q.lending_limit), "weight": q.weight,
                            "strategy": q.strategy, "fair_sharing": q.fair_sharing,
                            "in_use": shown(machine.usage[project]),
                            "admitted": len([w for w in machine.admitted.values()
                                             if w.queue == project]),
                            "pending": len(machine.pending[project])})  # fmt: skip
            return out

    # -- workloads -------------------------------------------------------------------

    def submit(
        self, store: SqlStore, principal: str, agent: bool, pool: str,
        items: list[dict[str, Any]], ended: list[str] = (),  # type: ignore[assignment]
    ) -> list[dict[str, Any]]:  # fmt: skip
        """Ask ``pool`` to admit each item (a run: id, cpu, memory_bytes, gpu, timeout_s,
        priority); each answer says ``admitted``, ``pending`` (with why) or ``refused``.
        ``ended``: the engine's workloads that finished since it last said."""
        project = store.project
        with self._lock:
            self._reap()
            machine = self._machines.get(pool)
            if machine is None:
                raise NotFoundError(f"no pool {pool!r} on this server; `kiln pools ls` lists "
                                    "them (KILN_POOL)")  # fmt: skip
            if project not in machine.queues:
                raise ValidationError("pool", f"project {project!r} has no queue on pool "
                                      f"{pool!r}; a project admin sets one with `kiln queues "
                                      f"set {pool} --cpu N ...`")  # fmt: skip
            answers: list[dict[str, Any]] = []
            changed: list[WorkloadRow] = []
            events: list[Note] = []
            for wid in ended:  # what ended since the engine last said (saves it a sync)
                gone = self._live.get(f"{project}/{wid}")
                if gone is not None:
                    changed += self._end(gone, "finished", None, events)
            before = {r.id: r for r in store.workloads(
                states=("finished", "refused"), ids=[i["id"] for i in items])}  # fmt: skip
            budgeted = agent or any(b.project == project for b in self._budgets)
            now = time.time()
            for item in items:
                wid = item["id"]
                key = f"{project}/{wid}"
                live = self._live.get(key)
                if live is not None:  # sent again (a retry): the same answer
                    answers.append(self._answer(live.row, machine))
                    continue
                requests = amounts(item["cpu"], item["memory_bytes"], item["gpu"])
                row = WorkloadRow(
                    id=wid, project=project, pool=pool, principal=principal,
                    requests=requests, state="pending", submitted_at=now,
                    priority=int(item.get("priority", 0)) + (AGENT_PRIORITY if agent else 0),
                    agent=agent, timeout_s=item.get("timeout_s"),
                    max_cost=self._max_cost(requests, item.get("timeout_s"), pool),
                )  # fmt: skip
                old = before.get(wid)
                if old is not None:  # it asks again (preempted, or its lease ran out): what
                    # it cost goes on with it, charged to this period (never to an older one)
                    row = replace(row, cost=old.cost, max_cost=old.cost + row.max_cost)
                reason = (self._reused(old) or self._unfit(machine, row)
                          or self._over_budget(store, row, now))  # fmt: skip
                if reason:
                    row = replace(row, state="refused", ended_at=now, cause=reason)
                    if old is None or old.state == "refused":  # what ran keeps its row
                        changed.append(row)
                    events.append((project, audit.Event("workload.refuse", wid,
                                                        {"pool": pool, "reason": reason}, now,
                                                        principal)))  # fmt: skip
                    answers.append({"id": wid, "state": "refused", "reason": reason})
                    continue
                self._live[key] = _Live(row, time.monotonic() + self.lease_s)
                changed.append(row)
                changed += self._apply(machine.handle(Submit(_workload(row))), events)
                answers.append(self._answer(self._live[key].row, machine))
                if budgeted:  # the next item's budget check counts this one
                    self._save(store, changed, events)
                    changed, events = [], []
            self._save(store, changed, events)
            return answers

    @staticmethod
    def _reused(old: WorkloadRow | None) -> str | None:
        """Why a run id that already ended may not ask again, or None: only one whose
        lease ran out, or that was preempted under a budget, continues (its cost too)."""
        if old is None or old.state == "refused":
            return None
        if old.cause and (old.cause.startswith("lease not renewed")
                          or old.cause.startswith("preempted")):  # fmt: skip
            return None
        return "this run already ran to its end; a new run has a new id"

    def sync(
        self, store: SqlStore, held: list[str], ended: list[str], running: list[str] = (),  # type: ignore[assignment]
    ) -> dict[str, Any]:  # fmt: skip
        """An engine's heartbeat: ``held`` are the workloads it still has (their leases
        are renewed), ``running`` those of them it runs, ``ended`` those that finished.
        The answer: which of ``held`` are admitted, which to preempt, and which the
        server does not know. A run the engine runs that is not admitted (a notice lost
        to a restart of the server, or a run ended for its budget) is to be preempted."""
        with self._lock:
            changed: list[WorkloadRow] = []
            events: list[Note] = []
            for wid in ended:
                live = self._live.get(f"{store.project}/{wid}")
                if live is not None:
                    changed += self._end(live, "finished", None, events)
            self._reap(changed, events)
            deadline = time.monotonic() + self.lease_s
            admitted: list[str] = []
            preempt: list[dict[str, str]] = []
            unknown: list[str] = []
            runs = set(running)
            for wid in held:
                live = self._live.get(f"{store.project}/{wid}")
                if live is None:
                    unknown.append(wid)
                    continue
                live.deadline = deadline
                if live.row.state == "admitted":
                    admitted.append(wid)
                elif wid in runs and not live.notices:  # it runs, unadmitted: stop it
                    live.notices.append({"id": wid, "cause": live.row.cause or "not admitted"})
                preempt += live.notices
                live.notices = []
            gone = [w for w in unknown if w in runs]
            if gone:  # ended here while its engine ran it: say why, for it to stop
                for row in store.workloads(states=("finished", "refused"), ids=gone):
                    unknown.remove(row.id)
                    preempt.append({"id": row.id, "cause": row.cause or "its workload ended"})
            self._save(store, changed, events)
            return {"admitted": admitted, "preempt": preempt, "unknown": unknown,
                    "lease_s": self.lease_s}  # fmt: skip

    def _reap(
        self, changed: list[WorkloadRow] | None = None, events: list[Note] | None = None
    ) -> None:
        """Reclaim the workloads whose lease ran out (their engine stopped syncing)."""
        now = time.monotonic()
        expired = [w for w in self._live.values() if w.deadline < now]
        if not expired:
            return
        out: list[WorkloadRow] = [] if changed is None else changed
        notes: list[Note] = [] if events is None else events
        for live in expired:  # charged until its lease ran out, not until now
            at = time.time() - (now - live.deadline)
            out += self._end(live, "finished", f"lease not renewed within {self.lease_s:g}s; "
                             "its quota was reclaimed", notes, at=at)  # fmt: skip
        if changed is None:
            self._save(self.store, out, notes)

    def _end(
        self, live: _Live, state: str, cause: str | None, events: list[Note],
        at: float | None = None,
    ) -> list[WorkloadRow]:  # fmt: skip
        now = time.time() if at is None else at
        row = live.row
        live.row = replace(row, state=state, ended_at=now, cost=self._cost_so_far(row, now),
                           cause=cause or row.cause)  # fmt: skip
        del self._live[_key(row)]
        machine = self._machines.get(row.pool)
        decisions = []
        if machine is not None and row.project in machine.queues:
            decisions = machine.handle(Done(_key(row)))
        return [live.row, *self._apply(decisions, events)]

    def _apply(
        self, decisions: list[Admit | Preempt], events: list[Note] | None = None
    ) -> list[WorkloadRow]:
        """Carry decisions into the live rows; the rows changed."""
        now = time.time()
        out: list[WorkloadRow] = []
        for d in decisions:
            live = self._live.get(d.id)  # the machine's ids are project/id
            if live is None:
                continue
            row = live.row
            if isinstance(d, Admit):
                live.row = replace(row, state="admitted", admitted_at=now)
            else:
                by = self._live.get(d.by)
                who = f"a run of project {by.row.project}" if by else "another run"
                cause = f"preempted by {who} ({d.cause})"
                if events is not None:
                    events.append((row.project, audit.Event(
                        "workload.preempt", row.id, {"by": who, "cause": d.cause}, now,
                        "kiln")))  # fmt: skip
                if self._budgeted(row):  # its next attempt asks again, within its budget
                    out += self._end(live, "finished", cause, events or [])
                    continue
                live.row = replace(row, state="pending", admitted_at=None,
                                   cost=self._cost_so_far(row, now), cause=cause)  # fmt: skip
                live.notices.append({"id": row.id, "cause": cause})
            out.append(live.row)
        return out

    def _budgeted(self, row: WorkloadRow) -> bool:
        """Whether a budget may apply to ``row`` (its project's, or it is an agent's)."""
        return row.agent or any(b.project == row.project for b in self._budgets)

    def _answer(self, row: WorkloadRow, machine: Admission) -> dict[str, Any]:
        if row.state == "pending":
            return {"id": row.id, "state": "pending", "reason": self._why(machine, _key(row))}
        return {"id": row.id, "state": row.state}

    # -- budgets ---------------------------------------------------------------------

    def _max_cost(self, requests: dict[str, int], timeout_s: float | None, pool: str) -> float:
        if self.prices is None or timeout_s is None:
            return 0.0
        return self._price(requests, timeout_s, pool)

    def _price(self, requests: dict[str, int], seconds: float, pool: str) -> float:
        if self.prices is None:
            return 0.0
        gpu_type = self._pools[pool].gpu_type if pool in self._pools else None
        usage = Usage(1, requests.get("cpu", 0) / 1000 * seconds,
                      requests.get("gpu", 0) / 1000 * seconds,
                      requests.get("memory", 0) * 2**20 / 1e9 * seconds)  # fmt: skip
        return self.prices.cost(usage, gpu_type)

    def _cost_so_far(self, row: WorkloadRow, now: float) -> float:
        if row.state != "admitted" or row.admitted_at is None:
            return row.cost
        held = max(0.0, now - row.admitted_at)
        if row.timeout_s is not None:
            held = min(held, row.timeout_s)
        return row.cost + self._price(row.requests, held, row.pool)

    def _over_budget(self, store: SqlStore, row: WorkloadRow, now: float) -> str | None:
        """Why ``row`` would break a budget that applies to it, or None: its project's,
        its principal's in the project, and an agent's own (over every project)."""
        budgets: list[tuple[BudgetRow, str | None]] = [
            (b, row.project) for b in self._budgets
            if b.project == row.project and b.principal in ("", row.principal)]  # fmt: skip
        principal = store.principal(row.principal) if row.agent else None
        if principal is not None and principal.budget is not None:
            own = BudgetRow(project=row.project, principal=row.principal,
                            amount=principal.budget, period="total")  # fmt: skip
            budgets.append((own, None))
        for budget, project in budgets:
            whose = f"{row.principal}'s" if budget.principal else f"project {row.project}'s"
            per = "" if budget.period == "total" else f" per {budget.period}"
            if self.prices is None:
                return (f"{whose} budget (${budget.amount:g}{per}) cannot be held: this "
                        "server has no price table (KILN_PRICES)")  # fmt: skip
            if row.timeout_s is None:
                return (f"{whose} budget (${budget.amount:g}{per}) needs the most a run may "
                        "cost: give the function a timeout")  # fmt: skip
            since = period_start(budget.period, now)
            spent = store.spent(project, budget.principal or None, since)
            if spent + row.max_cost > budget.amount + 1e-12:
                return (f"over {whose} budget: this run may cost up to ${row.max_cost:.4g} "
                        f"({_listed(row.requests)} for {row.timeout_s:g} s) and "
                        f"${max(0.0, budget.amount - spent):.4g} of ${budget.amount:g}{per} "
                        "is left")  # fmt: skip
        return None

    def budgets(self, store: SqlStore) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for b in store.budgets():
            spent = store.spent(b.project, b.principal or None, period_start(b.period, now))
            out.append({"principal": b.principal or None, "amount": b.amount,
                        "period": b.period, "spent": spent,
                        "left": max(0.0, b.amount - spent)})  # fmt: skip
        return out

    def set_budget(self, store: SqlStore, row: BudgetRow) -> None:
        if self.prices is None:
            raise ValidationError("amount", "this server has no price table, so nothing to "
                                  "count a budget in; start it with KILN_PRICES")  # fmt: skip
        if row.principal and store.principal(row.principal) is None:
            raise NotFoundError(f"no principal {row.principal!r}; `kiln users ls` lists them")
        with self._lock:
            store.set_budget(row)
            self._budgets = self.store.budgets(every_project=True)

    def remove_budget(self, store: SqlStore, principal: str) -> None:
        with self._lock:
            store.remove_budget(principal)
            self._budgets = self.store.budgets(every_project=True)

    # -- explain ---------------------------------------------------------------------

    def _unfit(self, machine: Admission, row: WorkloadRow) -> str | None:
        """Why ``row`` could never be admitted on its queue, or None."""
        q = machine.queues[row.project]
        pool = self._pools[row.pool]
        for r, n in row.requests.items():
            cap = min(pool.capacity.get(r, 0), q.nominal.get(r, 0) + (
                q.borrowing_limit.get(r, 1 << 62) if q.cohort else 0))  # fmt: skip
            if q.cohort:
                cap = min(
                    cap,
                    q.nominal.get(r, 0)
                    + sum(m.lendable(r) for m in machine.cohorts[q.cohort] if m.name != q.name),
                )
            if n > cap:
                unit = {"cpu": " cpu", "memory": " GiB of memory", "gpu": " gpu"}.get(r, f" {r}")
                return (f"it asks for {shown({r: n})[r]:g}{unit} and project {row.project!r} "
                        f"can have at most {shown({r: cap})[r]:g} on pool {row.pool!r}"
                        + (" (its queue's quota has none: `kiln queues set POOL --memory "
                           "SIZE`)" if r == "memory" and not cap else ""))  # fmt: skip
        return None

    def _why(self, machine: Admission, wid: str) -> dict[str, Any]:
        return _readable(machine.why(wid), wid.partition("/")[0])

    def listing(self, store: SqlStore) -> list[dict[str, Any]]:
        """The project's live workloads, each pending one with why it waits."""
        with self._lock:
            out = []
            for live in self._live.values():
                row = live.row
                if row.project != store.project:
                    continue
                entry = self._row_json(row)
                if row.state == "pending":
                    entry["reason"] = self._why(self._machines[row.pool], _key(row))
                out.append(entry)
            return sorted(out, key=lambda e: (e["pool"], e["state"], e["submitted_at"]))

    def explain(self, store: SqlStore, wid: str) -> dict[str, Any]:
        with self._lock:
            live = self._live.get(f"{store.project}/{wid}")
            if live is not None:
                entry = self._row_json(live.row)
                if live.row.state == "pending":
                    entry["reason"] = self._why(self._machines[live.row.pool], _key(live.row))
                return entry
            rows = store.workloads(states=("finished", "refused"), ids=[wid])
            if not rows:
                raise NotFoundError(f"run {wid} never asked a pool for admission")
            return self._row_json(rows[0])

    def what_if(
        self, store: SqlStore, principal: str, agent: bool, pool: str, item: dict[str, Any]
    ) -> dict[str, Any]:
        """What submitting ``item`` now would do: admitted or not (and why), whom it
        would preempt. Nothing changes."""
        with self._lock:
            machine = self._machines.get(pool)
            if machine is None:
                raise NotFoundError(f"no pool {pool!r} on this server; `kiln pools ls`")
            if store.project not in machine.queues:
                raise ValidationError("pool", f"project {store.project!r} has no queue on "
                                      f"pool {pool!r}")  # fmt: skip
            requests = amounts(item["cpu"], item["memory_bytes"], item["gpu"])
            row = WorkloadRow(
                id="what-if", project=store.project, pool=pool, principal=principal,
                requests=requests, state="pending", submitted_at=time.time(),
                priority=int(item.get("priority", 0)) + (AGENT_PRIORITY if agent else 0),
                agent=agent, timeout_s=item.get("timeout_s"),
                max_cost=self._max_cost(requests, item.get("timeout_s"), pool),
            )  # fmt: skip
            refused = self._unfit(machine, row) or self._over_budget(store, row, time.time())
            if refused:
                return {"admitted": False, "refused": refused, "preempted": []}
            found: dict[str, Any] = machine.what_if(_workload(row))
            victims = [self._row_json(self._live[v].row) if v.startswith(f"{store.project}/")
                       else {"project": self._live[v].row.project,
                             "requests": shown(self._live[v].row.requests)}
                       for v in found["preempted"] if v in self._live]  # fmt: skip
            reason = found["reason"]
            if isinstance(reason, dict):
                reason = _readable(reason, store.project)
            return {"admitted": found["admitted"], "preempted": victims, "reason": reason,
                    "max_cost": row.max_cost}  # fmt: skip

    @staticmethod
    def _row_json(row: WorkloadRow) -> dict[str, Any]:
        return {"id": row.id, "pool": row.pool, "project": row.project,
                "principal": row.principal, "state": row.state,
                "requests": shown(row.requests), "priority": row.priority,
                "agent": row.agent, "timeout_s": row.timeout_s, "max_cost": row.max_cost,
                "cost": row.cost, "submitted_at": row.submitted_at,
                "admitted_at": row.admitted_at, "ended_at": row.ended_at,
                "cause": row.cause}  # fmt: skip

    def _save(self, store: SqlStore, rows: list[WorkloadRow], notes: list[Note]) -> None:
        """The last change of each workload, with the audit events of the caller's
        project; each other project's events (its runs preempted) in that project."""
        latest = list({_key(r): r for r in rows}.values())
        store.save_workloads(latest, [e for p, e in notes if p == store.project])
        for project in sorted({p for p, _ in notes if p != store.project}):
            theirs = [e for p, e in notes if p == project]
            self.store.in_project(project).save_workloads([], theirs)


def _readable(why: dict[str, Any], viewer: str) -> dict[str, Any]:
    """A reason from :meth:`Admission.why` in people's units, with projects named; the
    runs of projects other than ``viewer``'s are counted, never named."""
    found = dict(why)
    found["id"] = _run_id(str(found["id"]))
    if "behind" in found:
        found["behind"] = [_run_id(i) for i in found["behind"]]
    if "resource" in found:
        r = str(found["resource"])
        found["requested"] = shown({r: int(found["requested"])})[r]
        found["missing"] = shown({r: int(found["missing"])})[r]
        found["held_by"] = [{"project": h["queue"], "amount": shown({r: h["amount"]})[r],
                             **({"id": _run_id(h["id"])} if h["queue"] == viewer else {})}
                            for h in found["held_by"]]  # fmt: skip
    if "queue" in found:
        found["project"] = found.pop("queue")
    return found


def _queue(q: QueueRow) -> Queue:
    return Queue(name=q.project, nominal=q.nominal, cohort=q.cohort,
                 borrowing_limit=q.borrowing_limit, lending_limit=q.lending_limit,
                 weight=q.weight, strategy=q.strategy,  # type: ignore[arg-type]
                 fair_sharing=q.fair_sharing)  # fmt: skip


def _listed(requests: dict[str, int]) -> str:
    """A request as people read it: ``1 cpu, 2 gpu, 4 GiB``."""
    units = {"memory": "GiB"}
    return ", ".join(f"{v:g} {units.get(k, k)}" for k, v in shown(requests).items())


def _run_id(key: str) -> str:
    return key.partition("/")[2] or key


def _key(row: WorkloadRow) -> str:
    """A workload's id in memory and in the state machines: a run id is its project's."""
    return f"{row.project}/{row.id}"


def _workload(row: WorkloadRow) -> Workload:
    return Workload(id=_key(row), queue=row.project, requests=row.requests,
                    priority=row.priority, agent=row.agent)  # fmt: skip
