"""Admission of workloads to queues with quotas: Kueue's model, as a pure state machine.

A *queue* belongs to a project on a pool and holds a nominal quota per resource
(``cpu`` in thousandths of a core, ``memory`` in MiB, ``gpu`` or ``gpu:TYPE`` in
thousandths of a device: fractions are counted exactly). Queues of a *cohort* share
what they do not use: a queue may borrow up to its borrowing limit from the cohort,
and lends at most its lending limit of its own nominal quota.

:meth:`Admission.handle` takes one event (a workload submitted, or one that finished
or lost its lease) and returns the decisions it makes: workloads admitted and
workloads preempted (each preempted one goes back to its queue). It reads no clock
and does no I/O, so the same events give the same decisions.

Rules, as Kueue's:

- A workload is admitted when its queue's usage plus its request stays within the
  nominal quota, or within nominal plus borrowing limit where the cohort has the
  unused lendable quota to cover the excess.
- Each queue orders its pending workloads by priority (higher first), then arrival.
  A ``strict`` queue admits only its head; a ``best-effort`` one lets later
  workloads pass a head that does not fit (and preempt, where the head cannot: an
  agent's head does not hold up a human's workload). Across queues, heads go in order of
  who would borrow least with the head admitted (dominant share over weight), then
  priority, then arrival.
- A head that does not fit may preempt: in its own queue, admitted workloads of
  lower priority; in its cohort, when it would then fit its queue's nominal quota,
  workloads of other queues that borrow; with fair sharing, workloads of a
  queue whose share would stay above the preemptor's. An agent's workload never
  preempts a human's. The set preempted is minimal: no workload in it could be
  spared. Every preemption lowers a quantity that never rises again for the same
  workloads (priority, then reclaimed nominal quota, then strictly lower share),
  so there are no cycles.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

Amounts = Mapping[str, int]
Strategy = Literal["strict", "best-effort"]


@dataclass(frozen=True, slots=True)
class Queue:
    """A project's quota on a pool. ``borrowing_limit`` and ``lending_limit`` are per
    resource; a resource not named there may borrow without limit, or lend all of
    its nominal quota."""

    name: str
    nominal: Amounts
    cohort: str | None = None
    borrowing_limit: Amounts = field(default_factory=dict)
    lending_limit: Amounts = field(default_factory=dict)
    weight: float = 1.0
    strategy: Strategy = "best-effort"
    fair_sharing: bool = False

    def lendable(self, resource: str) -> int:
        nominal = self.nominal.get(resource, 0)
        return min(nominal, self.lending_limit.get(resource, nominal))


@dataclass(frozen=True, slots=True)
class Workload:
    """What asks for admission: a run, or one run of a sweep."""

    id: str
    queue: str
    requests: Amounts
    priority: int = 0
    agent: bool = False  # an agent's workload never preempts a human's
    seq: int = 0  # arrival order, given by Admission


@dataclass(frozen=True, slots=True)
class Submit:
    workload: Workload


@dataclass(frozen=True, slots=True)
class Finish:
    """A workload ended, or its lease was not renewed and is reclaimed."""

    id: str


Event = Submit | Finish


@dataclass(frozen=True, slots=True)
class Admit:
    id: str
    borrowing: bool


@dataclass(frozen=True, slots=True)
class Preempt:
    id: str
    by: str
    cause: str  # "priority", "reclaim" or "fair-share"


Decision = Admit | Preempt


class Admission:
    """The queues, what they run and what waits (see the module)."""

    def __init__(self, queues: Iterable[Queue]) -> None:
        self.queues = {q.name: q for q in queues}
        self.cohorts: dict[str | None, list[Queue]] = {}
        for q in self.queues.values():
            self.cohorts.setdefault(q.cohort, []).append(q)
        self.usage: dict[str, dict[str, int]] = {q: {} for q in self.queues}
        self.admitted: dict[str, Workload] = {}
        self.pending: dict[str, list[Workload]] = {q: [] for q in self.queues}
        self._seq = itertools.count(1)

    # -- events ---------------------------------------------------------------

    def handle(self, event: Event) -> list[Decision]:
        if isinstance(event, Submit):
            w = event.workload
            if w.queue not in self.queues:
                raise KeyError(f"no queue {w.queue!r}")
            if w.id in self.admitted or any(p.id == w.id for p in self.pending[w.queue]):
                return []
            self._enqueue(replace(w, seq=w.seq or next(self._seq)))
        elif event.id in self.admitted:
            self._release(self.admitted.pop(event.id))
        else:
            for queue in self.pending.values():
                queue[:] = [p for p in queue if p.id != event.id]
        return self._schedule()

    def _schedule(self) -> list[Decision]:
        decisions: list[Decision] = []
        while True:
            made = self._one_pass()
            if not made:
                return decisions
            decisions += made

    def _one_pass(self) -> list[Decision]:
        """One admission, or one preemption and its admission; [] when nothing can go.
        Queues go in order of their heads (least borrowed, priority, arrival); within a
        queue, a strict one tries its head only, a best-effort one each request shape
        in order (a shape that does not fit stops the others of that shape). Preemption
        is tried after every admission without it (see :meth:`_preemptor`)."""
        order = sorted((n for n, ps in self.pending.items() if ps),
                       key=lambda n: self._order(self.pending[n][0]))  # fmt: skip
        for name in order:
            pending = self.pending[name]
            failed: set[tuple[tuple[str, int], ...]] = set()
            for w in pending[:1] if self.queues[name].strategy == "strict" else pending:
                shape = tuple(sorted(w.requests.items()))
                if shape in failed:
                    continue
                if self._fits(w):
                    self._take(w)
                    return [Admit(w.id, self._borrowing(w.queue))]
                failed.add(shape)
        for name in order:
            victims, cause, w = self._preemptor(name)
            if victims:
                out: list[Decision] = []
                for v in victims:
                    self._release(self.admitted.pop(v.id))
                    self._enqueue(v)
                    out.append(Preempt(v.id, w.id, cause))
                self._take(w)
                return [*out, Admit(w.id, self._borrowing(w.queue))]
        return []

    def _preemptor(self, queue: str) -> tuple[list[Workload], str, Workload]:
        """The first pending workload of ``queue`` that can preempt, with its victims: a
        strict queue's head only; in a best-effort queue, one of each kind (shape,
        priority, agent or not) in order, so an agent's head does not hold up a human."""
        pending = self.pending[queue]
        tried: set[tuple[object, ...]] = set()
        for w in pending[:1] if self.queues[queue].strategy == "strict" else pending:
            kind = (tuple(sorted(w.requests.items())), w.priority, w.agent)
            if kind in tried:
                continue
            tried.add(kind)
            victims, cause = self._victims(w)
            if victims:
                return victims, cause, w
        return [], "", pending[0]

    def _order(self, w: Workload) -> tuple[float, int, int]:
        """Who goes first: the queue that borrows least for its weight, then priority,
        then arrival (Kueue's order; with requests of mixed sizes a greedy order by
        share lets the lighter weight gain a little: see the fairness test)."""
        return (self.share(w.queue), -w.priority, w.seq)

    # -- quota ----------------------------------------------------------------

    def _fits(self, w: Workload, without: Iterable[Workload] = ()) -> bool:
        q = self.queues[w.queue]
        freed: dict[str, dict[str, int]] = {}
        for v in without:
            for r, n in v.requests.items():
                freed.setdefault(v.queue, {}).setdefault(r, 0)
                freed[v.queue][r] += n

        def used(queue: str, resource: str) -> int:
            return self.usage[queue].get(resource, 0) - freed.get(queue, {}).get(resource, 0)

        members = self.cohorts[q.cohort] if q.cohort is not None else [q]
        for r, n in w.requests.items():
            if n <= 0:
                continue
            mine = used(q.name, r) + n
            nominal = q.nominal.get(r, 0)
            if q.cohort is None:
                if mine > nominal:
                    return False
                continue
            if mine > nominal + q.borrowing_limit.get(r, 1 << 62):
                return False
            # what the cohort lends, against what its members use beyond what they keep
            # (a queue's own nominal quota is its own only once borrowers give it back)
            pool = sum(m.lendable(r) for m in members)
            kept = {m.name: m.nominal.get(r, 0) - m.lendable(r) for m in members}
            beyond = sum(max(0, (mine if m is q else used(m.name, r)) - kept[m.name])
                         for m in members)  # fmt: skip
            if beyond > pool:
                return False
        return True

    def _borrowing(self, queue: str) -> bool:
        q = self.queues[queue]
        return any(n > q.nominal.get(r, 0) for r, n in self.usage[queue].items())

    def share(self, queue: str) -> float:
        """The queue's dominant share of what it borrows over the cohort's lendable
        quota, divided by its weight (0 while within nominal)."""
        q = self.queues[queue]
        if q.cohort is None:
            return 0.0
        members = self.cohorts[q.cohort]
        best = 0.0
        for r, n in self.usage[queue].items():
            pool = sum(m.lendable(r) for m in members)
            over = n - q.nominal.get(r, 0)
            if pool > 0 and over > 0:
                best = max(best, over / pool)
        return best / q.weight

    def _take(self, w: Workload) -> None:
        self.pending[w.queue] = [p for p in self.pending[w.queue] if p.id != w.id]
        self.admitted[w.id] = w
        for r, n in w.requests.items():
            self.usage[w.queue][r] = self.usage[w.queue].get(r, 0) + n

    def _release(self, w: Workload) -> None:
        for r, n in w.requests.items():
            self.usage[w.queue][r] -= n

    def _enqueue(self, w: Workload) -> None:
        pending = self.pending[w.queue]
        pending.append(w)
        pending.sort(key=lambda p: (-p.priority, p.seq))

    # -- preemption -----------------------------------------------------------

    def _candidates(self, w: Workload) -> tuple[list[Workload], str]:
        q = self.queues[w.queue]
        eligible = [v for v in self.admitted.values() if not (w.agent and not v.agent)]
        lower = [v for v in eligible if v.queue == q.name and v.priority < w.priority]
        if q.cohort is None:
            return lower, "priority"
        within_nominal = all(
            self.usage[q.name].get(r, 0) + n <= q.nominal.get(r, 0) for r, n in w.requests.items()
        )
        borrowers = {m.name for m in self.cohorts[q.cohort] if m.name != q.name
                     and self._borrowing(m.name)}  # fmt: skip
        if within_nominal:
            return lower + [v for v in eligible if v.queue in borrowers], "reclaim"
        if q.fair_sharing:
            return lower + [v for v in eligible if v.queue in borrowers], "fair-share"
        return lower, "priority"

    def _victims(self, w: Workload) -> tuple[list[Workload], str]:
        """A minimal set of admitted workloads whose preemption lets ``w`` fit, or []."""
        candidates, cause = self._candidates(w)
        if not candidates:
            return [], cause
        # cheapest first: lowest priority, then the most recently admitted
        candidates.sort(key=lambda v: (v.priority, -v.seq))
        chosen: list[Workload] = []
        for v in candidates:
            chosen.append(v)
            if self._fits(w, chosen) and self._allowed(w, chosen, cause):
                break
        else:
            return [], cause
        for v in list(reversed(chosen)):  # give back whoever is not needed
            rest = [c for c in chosen if c is not v]
            if self._fits(w, rest) and self._allowed(w, rest, cause):
                chosen = rest
        return chosen, cause if all(v.queue != w.queue for v in chosen) else "priority"

    def _allowed(self, w: Workload, victims: list[Workload], cause: str) -> bool:
        """Fair sharing preempts a borrower only while its queue's share, with the
        victims gone, stays strictly above the preemptor's with ``w`` admitted."""
        if cause != "fair-share":
            return True
        mine = self._share_after(w.queue, add=[w], remove=victims)
        return all(self._share_after(v.queue, add=[], remove=victims) > mine
                   for v in victims if v.queue != w.queue)  # fmt: skip

    def _share_after(self, queue: str, *, add: list[Workload], remove: list[Workload]) -> float:
        saved = dict(self.usage[queue])
        for v in add:
            if v.queue == queue:
                for r, n in v.requests.items():
                    self.usage[queue][r] = self.usage[queue].get(r, 0) + n
        for v in remove:
            if v.queue == queue:
                for r, n in v.requests.items():
                    self.usage[queue][r] -= n
        try:
            return self.share(queue)
        finally:
            self.usage[queue] = saved

    # -- explain --------------------------------------------------------------

    def why(self, workload_id: str) -> dict[str, object]:
        """Why a pending workload waits: the first resource it lacks, how much, and who
        holds that resource in its queue and cohort."""
        w = next((p for ps in self.pending.values() for p in ps if p.id == workload_id), None)
        if w is None:
            state = "admitted" if workload_id in self.admitted else "unknown"
            return {"id": workload_id, "state": state}
        q = self.queues[w.queue]
        for r, n in w.requests.items():
            one = replace(w, requests={r: n})
            if self._fits(one):
                continue
            low, high = 0, n  # the most of ``r`` that would fit now: low fits, high not
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (mid, high) if self._fits(replace(w, requests={r: mid})) else (low, mid)
            holders = sorted((v for v in self.admitted.values() if v.requests.get(r)
                              and (v.queue == q.name or (q.cohort is not None and
                                                         self.queues[v.queue].cohort == q.cohort))),
                             key=lambda v: (-v.requests[r], v.id))  # fmt: skip
            return {"id": w.id, "state": "pending", "queue": q.name, "resource": r,
                    "requested": n, "missing": n - low,
                    "held_by": [{"id": v.id, "queue": v.queue, "amount": v.requests[r]}
                                for v in holders[:10]]}  # fmt: skip
        ahead = [p.id for p in self.pending[w.queue] if (-p.priority, p.seq) < (-w.priority, w.seq)]
        return {"id": w.id, "state": "pending", "queue": q.name, "behind": ahead[:10]}

    def what_if(self, w: Workload) -> dict[str, object]:
        """What submitting ``w`` now would do, changing nothing."""
        trial = Admission(self.queues.values())
        trial.usage = {k: dict(v) for k, v in self.usage.items()}
        trial.admitted = dict(self.admitted)
        trial.pending = {k: list(v) for k, v in self.pending.items()}
        trial._seq = itertools.count(max([0, *(v.seq for v in self.admitted.values()),
                                          *(p.seq for ps in self.pending.values() for p in ps)])
                                     + 1)  # fmt: skip
        decisions = trial.handle(Submit(w))
        admitted = any(isinstance(d, Admit) and d.id == w.id for d in decisions)
        return {"admitted": admitted,
                "preempted": [d.id for d in decisions if isinstance(d, Preempt)],
                "reason": None if admitted else trial.why(w.id)}  # fmt: skip
