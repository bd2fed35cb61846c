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
  preempts a human's. No workload is stopped and started, or started and stopped,
  by one event (what it preempted waits for the next). The set preempted is
  minimal: no workload in it could be spared. Every preemption lowers a quantity
  that never rises again for the same workloads (priority, then reclaimed nominal
  quota, then strictly lower share), so there are no cycles.
"""

from __future__ import annotations

import bisect
import copy
import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

Amounts = Mapping[str, int]
Shape = tuple[tuple[str, int], ...]
Freed = dict[str, dict[str, int]]  # queue: resource: what preempted workloads give back
Kind = tuple[Shape, int, bool]  # shape, priority, agent: who may preempt the same
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
    seq: int = 0  # arrival order, given by Admission (what a caller sets is replaced)


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
        # kept up to date so that a check costs per resource, not per workload
        self._waiting: dict[str, str] = {}  # pending id: its queue
        self._running: dict[str, dict[str, Workload]] = {q: {} for q in self.queues}
        self._kinds: dict[str, dict[Kind, list[Workload]]] = {q: {} for q in self.queues}
        self._kind_of: dict[str, Kind] = {}  # pending id: its kind
        self._memo: dict[tuple[object, ...], object] = {}  # what one pass found, for it
        self._unfit: set[tuple[str, Shape]] = set()  # what one event's passes found
        self._fresh: set[str] = set()  # what one event admitted or preempted
        # scopes whose last event decided nothing: a submission behind one like it
        # there changes nothing either
        self._settled: set[str] = set()
        self._kept = {q.name: {r: q.nominal.get(r, 0) - q.lendable(r) for r in q.nominal}
                      for q in self.queues.values()}  # fmt: skip
        self._over = dict.fromkeys(self.queues, 0)  # resources each uses beyond its nominal
        self._beyond: dict[tuple[str | None, str], int] = defaultdict(int)
        self._pools: dict[tuple[str | None, str], int] = defaultdict(int)
        for cohort, members in self.cohorts.items():  # what each cohort lends, by resource
            for r in {r for m in members for r in m.nominal}:
                self._pools[(cohort, r)] = sum(m.lendable(r) for m in members)

    # -- events ---------------------------------------------------------------

    def handle(self, event: Event) -> list[Decision]:
        if isinstance(event, Submit):
            w = event.workload
            if w.queue not in self.queues:
                raise KeyError(f"no queue {w.queue!r}")
            if w.id in self.admitted or w.id in self._waiting:
                return []
            w = replace(w, seq=next(self._seq))  # arrival order: ours to give
            self._enqueue(w)
            queue = w.queue
            if self._scope_key(queue) in self._settled and not self._in_front(w):
                return []  # behind one like it that can neither go nor preempt: nor can it
        elif event.id in self.admitted:
            queue = self.admitted[event.id].queue
            self._release(self.admitted[event.id])
        elif event.id in self._waiting:  # (one that waits gives nothing back)
            queue = self._waiting[event.id]
            self._unqueue(next(p for p in self.pending[queue] if p.id == event.id))
        else:
            return []
        return self._schedule(queue)

    def adopt(self, w: Workload) -> None:
        """Count ``w`` as admitted without a check: it already runs (restored after a
        restart of the server, or a change of the queues), even if its queue is now over
        its quota; it gives its share back when it finishes."""
        if w.queue not in self.queues:
            raise KeyError(f"no queue {w.queue!r}")
        w = replace(w, seq=next(self._seq))
        self._settled.discard(self._scope_key(w.queue))
        self.admitted[w.id] = w
        self._running[w.queue][w.id] = w
        self._use(w, +1)

    def _schedule(self, queue: str) -> list[Decision]:
        """The decisions an event in ``queue`` makes possible: in its cohort only (one
        cohort's quota and usage are no other's concern)."""
        cohort = self.queues[queue].cohort
        scope = [m.name for m in self.cohorts[cohort]] if cohort is not None else [queue]
        decisions: list[Decision] = []
        self._unfit, self._fresh = set(), set()
        while True:
            made = self._one_pass(scope)
            if not made:
                self._memo = {}  # what the passes found holds no longer
                if decisions:  # what it preempted or admitted was spared this time
                    self._settled.discard(self._scope_key(queue))
                else:  # nothing can go or preempt until something changes
                    self._settled.add(self._scope_key(queue))
                return decisions
            decisions += made

    def _scope_key(self, queue: str) -> str:
        """Its cohort's, or (a queue of no cohort) its own: what one event's passes see."""
        cohort = self.queues[queue].cohort
        return f"cohort:{cohort}" if cohort is not None else f"queue:{queue}"

    def _in_front(self, w: Workload) -> bool:
        """Whether a pass would try ``w`` itself: a strict queue's head, or the first of
        its kind in a best-effort one (any later one fares exactly as that first)."""
        if self.queues[w.queue].strategy == "strict":
            return self.pending[w.queue][0] is w
        return self._kinds[w.queue][self._kind_of[w.id]][0] is w

    def _one_pass(self, scope: list[str]) -> list[Decision]:
        """One admission, or one preemption and its admission; [] when nothing can go.
        Queues go in order of their heads (least borrowed, priority, arrival); within a
        queue, a strict one tries its head only, a best-effort one each request shape
        in order (a shape that does not fit stops the others of that shape). Preemption
        is tried after every admission without it (see :meth:`_preemptor`)."""
        self._memo = {}
        order = sorted((n for n in scope if self.pending[n]),
                       key=lambda n: self._order(self.pending[n][0]))  # fmt: skip
        unfit = self._unfit  # (queue, shape): admissions alone never make it fit again
        for name in order:
            for w in self._tries(name):
                shape = self._kind_of[w.id][0]
                if (name, shape) in unfit or w.id in self._fresh:
                    continue
                if self._fits_now(w):
                    self._take(w)
                    return [Admit(w.id, self._borrowing(w.queue))]
                unfit.add((name, shape))
        for name in order:
            victims, cause, w = self._preemptor(name)
            if victims:
                unfit.clear()  # what the victims give back may fit
                out: list[Decision] = []
                for v in victims:  # one of its own queue yields to priority
                    self._fresh.add(v.id)
                    self._release(v)
                    self._enqueue(v)
                    out.append(Preempt(v.id, w.id, "priority" if v.queue == w.queue else cause))
                self._take(w)
                return [*out, Admit(w.id, self._borrowing(w.queue))]
        return []

    def _preemptor(self, queue: str) -> tuple[list[Workload], str, Workload]:
        """The first pending workload of ``queue`` that can preempt, with its victims: a
        strict queue's head only; in a best-effort queue, one of each kind (shape,
        priority, agent or not) in order, so an agent's head does not hold up a human."""
        lowest, others = self._prospects(queue)
        top = max(kind[1] for kind in self._kinds[queue])
        if (lowest is None or top <= lowest) and not others:
            return [], "", self.pending[queue][0]  # nobody here or around to preempt
        for w in self._tries(queue):
            if w.id in self._fresh:  # preempted by this event: it waits for the next
                continue
            victims, cause = self._victims(w)
            if victims:
                return victims, cause, w
        return [], "", self.pending[queue][0]

    def _prospects(self, queue: str) -> tuple[int | None, list[float]]:
        """The lowest priority running in ``queue``, and the shares of the other queues
        of its cohort that borrow (memoized for the pass)."""
        key = ("prospects", queue)
        if key not in self._memo:
            q = self.queues[queue]
            lowest = min((v.priority for v in self._running[queue].values()), default=None)
            others = [] if q.cohort is None else [
                self.share(m.name) for m in self.cohorts[q.cohort]
                if m.name != queue and self._borrowing(m.name)]  # fmt: skip
            self._memo[key] = (lowest, others)
        found: tuple[int | None, list[float]] = self._memo[key]  # type: ignore[assignment]
        return found

    def _tries(self, queue: str) -> list[Workload]:
        """What may go from ``queue``, in its order: a strict queue's head; in a
        best-effort one, the first of each kind (a later one of the same shape,
        priority and kind of principal fits, or preempts, only if the first does)."""
        if self.queues[queue].strategy == "strict":
            return self.pending[queue][:1]
        key = ("tries", queue)  # the same for the pass's admissions and preemptions
        if key not in self._memo:
            self._memo[key] = sorted((same[0] for same in self._kinds[queue].values()),
                                     key=_place)  # fmt: skip
        found: list[Workload] = self._memo[key]  # type: ignore[assignment]
        return found

    def _order(self, w: Workload) -> tuple[float, int, int]:
        """Who goes first: the queue that borrows least for its weight, then priority,
        then arrival (Kueue's order; with requests of mixed sizes a greedy order by
        share lets the lighter weight gain a little: see the fairness test)."""
        return (self.share(w.queue), -w.priority, w.seq)

    # -- quota ----------------------------------------------------------------

    def _fits(self, w: Workload, without: Iterable[Workload] = ()) -> bool:
        """Whether ``w`` fits its queue (and cohort) now, with ``without`` gone."""
        freed = _freed(without)
        return self._fits_freed(w, freed) if freed else self._fits_now(w)

    def _fits_now(self, w: Workload) -> bool:
        """:meth:`_fits_freed` with nothing freed: the check every pass makes most."""
        q = self.queues[w.queue]
        usage, nominal = self.usage[q.name], q.nominal
        if q.cohort is None:
            return all(usage.get(r, 0) + n <= nominal.get(r, 0)
                       for r, n in w.requests.items() if n > 0)  # fmt: skip
        kept, limit = self._kept[q.name], q.borrowing_limit
        for r, n in w.requests.items():
            if n <= 0:
                continue
            now = usage.get(r, 0)
            after = now + n
            if after > nominal.get(r, 0) + limit.get(r, 1 << 62):
                return False
            k, key = kept.get(r, 0), (q.cohort, r)
            grows = after - k - max(0, now - k) if after > k else 0  # what it borrows more
            if self._beyond[key] + grows > self._pools[key]:
                return False
        return True

    def _fits_freed(self, w: Workload, freed: Freed) -> bool:
        q = self.queues[w.queue]
        usage, mine = self.usage[q.name], freed.get(q.name, {})
        for r, n in w.requests.items():
            if n <= 0:
                continue
            now = usage.get(r, 0)
            after = now - mine.get(r, 0) + n
            if q.cohort is None:
                if after > q.nominal.get(r, 0):
                    return False
                continue
            if after > q.nominal.get(r, 0) + q.borrowing_limit.get(r, 1 << 62):
                return False
            # what the cohort lends, against what its members use beyond what they keep
            # (a queue's own nominal quota is its own only once borrowers give it back)
            kept = self._kept[q.name].get(r, 0)
            beyond = self._beyond[(q.cohort, r)] + max(0, after - kept) - max(0, now - kept)
            for name, given in freed.items():
                if name != q.name and r in given:
                    other, kept = self.usage[name].get(r, 0), self._kept[name].get(r, 0)
                    beyond += max(0, other - given[r] - kept) - max(0, other - kept)
            if beyond > self._pools[(q.cohort, r)]:
                return False
        return True

    def _borrowing(self, queue: str) -> bool:
        return self._over[queue] > 0

    def share(self, queue: str, usage: Amounts | None = None) -> float:
        """The queue's dominant share of what it borrows over the cohort's lendable
        quota, divided by its weight (0 while within nominal), with its usage now or
        as ``usage`` says."""
        q = self.queues[queue]
        if q.cohort is None or (usage is None and not self._over[queue]):
            return 0.0
        if usage is None:
            key = ("share", queue)
            if key not in self._memo:
                self._memo[key] = self.share(queue, self.usage[queue])
            found: float = self._memo[key]  # type: ignore[assignment]
            return found
        best = 0.0
        for r, n in usage.items():
            pool, over = self._pools[(q.cohort, r)], n - q.nominal.get(r, 0)
            if pool > 0 and over > 0:
                best = max(best, over / pool)
        return best / q.weight

    def _take(self, w: Workload) -> None:
        self._fresh.add(w.id)
        self._unqueue(w)
        self.admitted[w.id] = w
        self._running[w.queue][w.id] = w
        self._use(w, +1)

    def _release(self, w: Workload) -> None:
        del self.admitted[w.id]
        del self._running[w.queue][w.id]
        self._use(w, -1)

    def _use(self, w: Workload, sign: int) -> None:
        q = self.queues[w.queue]
        for r, n in w.requests.items():
            now = self.usage[q.name].get(r, 0)
            self.usage[q.name][r] = now + sign * n
            nominal = q.nominal.get(r, 0)
            self._over[q.name] += (now + sign * n > nominal) - (now > nominal)
            kept = self._kept[q.name].get(r, 0)
            self._beyond[(q.cohort, r)] += max(0, now + sign * n - kept) - max(0, now - kept)

    def _enqueue(self, w: Workload) -> None:
        bisect.insort(self.pending[w.queue], w, key=_place)
        self._waiting[w.id] = w.queue
        self._kind_of[w.id] = kind = _kind(w)
        bisect.insort(self._kinds[w.queue].setdefault(kind, []), w, key=lambda p: p.seq)

    def _unqueue(self, w: Workload) -> None:
        pending = self.pending[w.queue]  # sorted by (-priority, seq), which is unique
        del pending[bisect.bisect_left(pending, (-w.priority, w.seq), key=_place)]
        del self._waiting[w.id]
        kinds, kind = self._kinds[w.queue], self._kind_of.pop(w.id)
        same = kinds[kind]
        del same[bisect.bisect_left(same, w.seq, key=lambda p: p.seq)]
        if not same:
            del kinds[kind]

    # -- preemption -----------------------------------------------------------

    def _hopeless(self, w: Workload) -> bool:
        """True where ``w`` can preempt nobody, found cheaply: nothing of lower priority
        runs in its queue, and no other queue of its cohort borrows (or, for fair
        sharing, none has a share above what ``w``'s queue would have)."""
        q = self.queues[w.queue]
        lowest, others = self._prospects(q.name)
        if lowest is not None and w.priority > lowest:
            return False
        if not others:
            return True
        within = all(self.usage[q.name].get(r, 0) + n <= q.nominal.get(r, 0)
                     for r, n in w.requests.items())  # fmt: skip
        if within:
            return False
        if not q.fair_sharing:
            return True
        key = ("after", q.name, self._kind_of[w.id][0])  # its share with a shape like w's
        if key not in self._memo:
            self._memo[key] = self._share_after(q.name, add=[w], remove=[])
        return max(others) <= self._memo[key]  # type: ignore[operator]

    def _candidates(self, w: Workload) -> tuple[list[Workload], str, Freed]:
        """Who ``w`` may preempt, cheapest first (lowest priority, then the most recently
        admitted), why, and what they hold together (memoized for the pass: the state
        does not change within one)."""
        q = self.queues[w.queue]
        within_nominal = all(
            self.usage[q.name].get(r, 0) + n <= q.nominal.get(r, 0) for r, n in w.requests.items()
        )
        key = ("candidates", q.name, w.priority, w.agent, within_nominal)
        if key not in self._memo:
            candidates, cause = self._find_candidates(w, within_nominal)
            candidates.sort(key=lambda v: (v.priority, -v.seq))
            self._memo[key] = (candidates, cause, _freed(candidates))
        found: tuple[list[Workload], str, Freed] = self._memo[key]  # type: ignore[assignment]
        return found

    def _find_candidates(self, w: Workload, within_nominal: bool) -> tuple[list[Workload], str]:
        q = self.queues[w.queue]
        fresh = self._fresh  # admitted by this event: not preempted by it too
        lower = [v for v in self._running[q.name].values() if v.priority < w.priority
                 and not (w.agent and not v.agent) and v.id not in fresh]  # fmt: skip
        if q.cohort is None:
            return lower, "priority"
        if not within_nominal and not q.fair_sharing:
            return lower, "priority"
        borrowed = [v for m in self.cohorts[q.cohort] if m.name != q.name
                    and self._borrowing(m.name) for v in self._running[m.name].values()
                    if not (w.agent and not v.agent) and v.id not in fresh]  # fmt: skip
        return lower + borrowed, "reclaim" if within_nominal else "fair-share"

    def _victims(self, w: Workload) -> tuple[list[Workload], str]:
        """A minimal set of admitted workloads whose preemption lets ``w`` fit, or []."""
        if self._hopeless(w):
            return [], ""
        candidates, cause, everyone = self._candidates(w)
        if not candidates or not self._fits_freed(w, everyone):  # not even with them all
            return [], cause
        # The shortest prefix of the candidates (cheapest first) that lets w fit, found by
        # halving (more freed never fits less), then grown until fair sharing allows it.
        low, high = 1, len(candidates)
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if self._fits_freed(w, _freed(candidates[:mid])) else (
                mid + 1, high)  # fmt: skip
        chosen = candidates[:low]
        freed = _freed(chosen)
        while not self._allowed(w, chosen, cause):
            if len(chosen) == len(candidates):
                return [], cause
            chosen.append(candidates[len(chosen)])
            _add(freed, chosen[-1], +1)
        spared = True
        while spared:  # give back whoever is not needed, until nobody more can be (a
            spared = False  # victim sparing another may be spared once it is gone)
            for v in list(reversed(chosen)):
                _add(freed, v, -1)
                rest = [c for c in chosen if c is not v]
                if self._fits_freed(w, freed) and self._allowed(w, rest, cause):
                    chosen, spared = rest, True
                else:
                    _add(freed, v, +1)
        return chosen, cause

    def _allowed(self, w: Workload, victims: list[Workload], cause: str) -> bool:
        """Fair sharing preempts a borrower only while its queue's share, with the
        victims gone, stays strictly above the preemptor's with ``w`` admitted."""
        if cause != "fair-share":
            return True
        mine = self._share_after(w.queue, add=[w], remove=victims)
        return all(self._share_after(name, add=[], remove=victims) > mine
                   for name in {v.queue for v in victims} - {w.queue})  # fmt: skip

    def _share_after(self, queue: str, *, add: list[Workload], remove: list[Workload]) -> float:
        """:meth:`share` with ``add`` admitted and ``remove`` gone (those of this queue)."""
        delta: dict[str, int] = {}
        for v, sign in [*((v, 1) for v in add), *((v, -1) for v in remove)]:
            if v.queue == queue:
                for r, n in v.requests.items():
                    delta[r] = delta.get(r, 0) + sign * n
        if not delta:
            return self.share(queue)
        q, usage = self.queues[queue], self.usage[queue]
        if q.cohort is None:
            return 0.0
        best = 0.0
        for r in usage.keys() | delta.keys():
            over = usage.get(r, 0) + delta.get(r, 0) - q.nominal.get(r, 0)
            pool = self._pools.get((q.cohort, r), 0)
            if over > 0 and pool > 0:
                best = max(best, over / pool)
        return best / q.weight

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
        trial = copy.deepcopy(self)
        decisions = trial.handle(Submit(w))
        admitted = any(isinstance(d, Admit) and d.id == w.id for d in decisions)
        return {"admitted": admitted,
                "preempted": [d.id for d in decisions if isinstance(d, Preempt)],
                "reason": None if admitted else trial.why(w.id)}  # fmt: skip


def _shape(w: Workload) -> Shape:
    return tuple(sorted(w.requests.items()))


def _kind(w: Workload) -> Kind:
    return (_shape(w), w.priority, w.agent)


def _freed(workloads: Iterable[Workload]) -> Freed:
    freed: Freed = {}
    for v in workloads:
        _add(freed, v, +1)
    return freed


def _add(freed: Freed, w: Workload, sign: int) -> None:
    mine = freed.setdefault(w.queue, {})
    for r, n in w.requests.items():
        mine[r] = mine.get(r, 0) + sign * n


def _place(w: Workload) -> tuple[int, int]:
    """A pending workload's place in its queue: priority, then arrival."""
    return (-w.priority, w.seq)
