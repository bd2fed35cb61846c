"""Admission of tasks against an inventory: a deterministic state machine.

:meth:`Scheduler.handle` takes one event (a task submitted, released or cancelled)
and returns the admissions it makes possible. It does no I/O and reads no clock,
so the same events always give the same decisions; the engine feeds it events
and carries out its decisions.

Policy:

- A task is admitted only when its CPU, memory and GPU request fits what is free:
  nothing is ever oversubscribed.
- Order is priority (higher first), then submission order.
- Tasks behind a head that does not fit may be admitted past it ("backfill"),
  but only ``max_bypass`` times: after that nothing passes the head until it
  fits, so a large request cannot starve behind a stream of small ones.
- A fractional GPU request goes to the device with the least free share that
  still fits (best fit), so fractions pack onto as few devices as possible; a
  whole-number request takes that many entirely free devices.

CPU and GPU shares are counted in thousandths, so fractions never drift. Each
priority's queue is kept per request shape, so a pass looks only at the first
task of each shape that can still fit: its cost grows with the number of
distinct shapes, not with the length of the queue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kiln.compute.resources import Inventory, Resources

MILLI = 1000


@dataclass(frozen=True, slots=True)
class Task:
    """What the scheduler knows of a task."""

    id: str
    resources: Resources
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Allocation:
    """An admission: what the task holds until it is released."""

    task_id: str
    cpu_milli: int
    memory_bytes: int
    gpus: tuple[tuple[int, int], ...] = ()  # (device index, thousandths of it)

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(str(index) for index, _ in self.gpus)


@dataclass(frozen=True, slots=True)
class Submit:
    task: Task


@dataclass(frozen=True, slots=True)
class Release:
    """A running task ended (any way); its resources are free again."""

    task_id: str


@dataclass(frozen=True, slots=True)
class Cancel:
    """Withdraw a queued task. (A running one is stopped by the engine, then released.)"""

    task_id: str


Event = Submit | Release | Cancel


@dataclass(slots=True, eq=False)  # compared by identity when removed from its queue
class _Entry:
    task: Task
    seq: int
    shape: tuple[int, int, int]  # (cpu thousandths, memory bytes, gpu thousandths)
    bypassed: int = 0


Shape = tuple[int, int, int]


@dataclass
class Scheduler:
    """Admits queued tasks as resources allow. See the module docstring for the policy."""

    inventory: Inventory
    max_bypass: int = 256
    free_cpu: int = field(init=False)
    free_memory: int = field(init=False)
    free_gpu: list[int] = field(init=False)
    running: dict[str, Allocation] = field(init=False, default_factory=dict)
    # priority -> shape -> entries in submission order
    _queues: dict[int, dict[Shape, deque[_Entry]]] = field(init=False, default_factory=dict)
    _queued: dict[str, _Entry] = field(init=False, default_factory=dict)
    _seq: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.free_cpu = round(self.inventory.cpu * MILLI)
        self.free_memory = self.inventory.memory_bytes
        self.free_gpu = [MILLI] * len(self.inventory.gpus)

    @property
    def queued(self) -> int:
        return len(self._queued)

    def handle(self, event: Event) -> list[Allocation]:
        """Apply ``event``; return the tasks admitted as a result, in admission order."""
        if isinstance(event, Submit):
            return self._submit(event.task)
        if isinstance(event, Release):
            alloc = self.running.pop(event.task_id, None)
            if alloc is None:
                return []
            self.free_cpu += alloc.cpu_milli
            self.free_memory += alloc.memory_bytes
            for index, share in alloc.gpus:
                self.free_gpu[index] += share
            return self._admit()
        entry = self._queued.pop(event.task_id, None)
        if entry is not None:
            by_shape = self._queues[entry.task.priority]
            by_shape[entry.shape].remove(entry)
            self._prune(entry.task.priority, entry.shape)
        return []

    def _submit(self, task: Task) -> list[Allocation]:
        if task.id in self._queued or task.id in self.running:
            raise ValueError(f"task {task.id} was already submitted")
        self.inventory.check(task.resources)
        r = task.resources
        shape = (round(r.cpu * MILLI), r.memory_bytes, round(r.gpu * MILLI))
        self._seq += 1
        entry = _Entry(task, self._seq, shape)
        self._queues.setdefault(task.priority, {}).setdefault(shape, deque()).append(entry)
        self._queued[task.id] = entry
        return self._admit()

    def _prune(self, priority: int, shape: Shape) -> None:
        by_shape = self._queues[priority]
        if not by_shape[shape]:
            del by_shape[shape]
            if not by_shape:
                del self._queues[priority]

    def _admit(self) -> list[Allocation]:
        if self.free_cpu <= 0 and not self._free_lunch():
            return []
        admitted: list[Allocation] = []
        head: _Entry | None = None
        # Free capacity only shrinks during a pass: a shape that did not fit once will
        # not fit again, so its queue is not looked at again in this pass.
        failed: set[Shape] = set()
        for priority in sorted(self._queues, reverse=True):
            by_shape = self._queues[priority]
            while by_shape:
                entry: _Entry | None = None
                for shape, queue in by_shape.items():
                    if shape not in failed and (entry is None or queue[0].seq < entry.seq):
                        entry = queue[0]
                if entry is None:
                    break
                alloc = self._fit(entry)
                if alloc is None:
                    failed.add(entry.shape)
                    if head is None:
                        head = entry
                        if head.bypassed >= self.max_bypass:
                            return admitted  # hold everything for the head
                    continue
                if head is not None:
                    head.bypassed += 1
                by_shape[entry.shape].popleft()
                self._prune(priority, entry.shape)
                del self._queued[entry.task.id]
                self._take(alloc)
                admitted.append(alloc)
                if self.free_cpu <= 0 and not self._free_lunch():
                    return admitted
        return admitted

    def _free_lunch(self) -> bool:
        """Whether a task asking for no CPU is queued (only those fit once CPUs are gone)."""
        return any(shape[0] == 0 for q in self._queues.values() for shape in q)

    def _fit(self, entry: _Entry) -> Allocation | None:
        cpu, memory, gpu = entry.shape
        if cpu > self.free_cpu or memory > self.free_memory:
            return None
        gpus: tuple[tuple[int, int], ...] = ()
        if 0 < gpu < MILLI:
            best = -1
            for index, free in enumerate(self.free_gpu):
                if free >= gpu and (best < 0 or free < self.free_gpu[best]):
                    best = index
            if best < 0:
                return None
            gpus = ((best, gpu),)
        elif gpu >= MILLI:
            need = gpu // MILLI
            if self.free_gpu.count(MILLI) < need:
                return None
            whole = [i for i, free in enumerate(self.free_gpu) if free == MILLI]
            gpus = tuple((i, MILLI) for i in whole[:need])
        return Allocation(entry.task.id, cpu, memory, gpus)

    def _take(self, alloc: Allocation) -> None:
        self.free_cpu -= alloc.cpu_milli
        self.free_memory -= alloc.memory_bytes
        for index, share in alloc.gpus:
            self.free_gpu[index] -= share
        self.running[alloc.task_id] = alloc
