"""What an engine can say of itself at any moment: its queue, its running tasks, its
resources and how its tasks ended.

A backend keeps the figures that change with every task as plain counters (a
:class:`Tally`, changed only by the thread that ends tasks, so the hot path pays an
integer increment) and makes a :class:`Figures` snapshot when asked, where its state
lives: the local engine's loop thread, or under the Ray engine's lock. So a reader
in another thread (a Prometheus scrape, see :mod:`kiln.compute.metrics`) never reads
state while it changes, and nothing is computed between two reads.

Counts are of attempts: a run retried twice is three tasks to its engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol, get_args, runtime_checkable

from kiln.compute.resources import Inventory
from kiln.compute.scheduler import MILLI, Scheduler

Status = Literal["succeeded", "failed", "cancelled"]
# Why a task did not succeed, from a bounded set (never its message): its function
# raised or could not be loaded; it ran out of time; its worker (or node) died under
# it; it was cancelled, by its caller or by the engine shutting down.
FailureCause = Literal["error", "timeout", "worker_died", "cancelled"]
STATUSES: tuple[Status, ...] = get_args(Status)
FAILURE_CAUSES: tuple[FailureCause, ...] = get_args(FailureCause)
# The names Kiln gives GPUs it does not know the model of: one type, not one per index.
_MADE_UP = re.compile(r"(virtual|ray)-\d+")


class Tally:
    """Counters of one engine, changed by the one thread that starts workers and ends
    tasks (or under the engine's lock), read into a :class:`Figures` the same way."""

    __slots__ = ("failures", "finished", "worker_starts")

    def __init__(self) -> None:
        self.worker_starts = 0
        self.finished: dict[str, int] = dict.fromkeys(STATUSES, 0)
        self.failures: dict[str, int] = dict.fromkeys(FAILURE_CAUSES, 0)

    def ended(self, status: str, failure: FailureCause = "error") -> None:
        """A task ended with ``status``; ``failure`` says why, if it failed (a
        cancelled task's cause is always ``cancelled``)."""
        if status not in self.finished:  # never raise in an engine's loop: count it failed
            status = "failed"
        self.finished[status] += 1
        if status == "cancelled":
            self.failures["cancelled"] += 1
        elif status != "succeeded":
            self.failures[failure] += 1


@dataclass(frozen=True, slots=True)
class Pool:
    """One resource of an engine: ``capacity`` = ``admitted`` + ``free``. CPUs in cores,
    memory in bytes, GPUs in devices (a fractional share counts as that fraction)."""

    resource: Literal["cpu", "memory_bytes", "gpu"]
    gpu_type: str  # the GPUs' model ("NVIDIA H100 80GB HBM3"); "" for CPUs and memory
    capacity: float
    admitted: float

    @property
    def free(self) -> float:
        return self.capacity - self.admitted


@dataclass(frozen=True, slots=True)
class Figures:
    """An engine's state at one moment and its counters since it started."""

    queued: int  # tasks waiting for admission
    running: int  # tasks admitted and running
    resources: tuple[Pool, ...]
    worker_starts: int
    finished: dict[str, int]  # by status
    failures: dict[str, int]  # by FailureCause
    reservations_queued: int = 0  # serving replicas waiting for resources
    reservations_held: int = 0  # serving replicas holding resources


@runtime_checkable
class Measured(Protocol):
    """A backend that can say its figures (the local and Ray engines)."""

    def figures(self) -> Figures:
        """A snapshot, safe to take from any thread."""


def gpu_type(name: str) -> str:
    """The model of a GPU named ``name``; GPUs Kiln named itself (``virtual-0``, the
    Ray cluster's ``ray-3``) are one type each, ``virtual`` and ``ray``."""
    made_up = _MADE_UP.fullmatch(name)
    return made_up.group(1) if made_up else name


def scheduler_pools(scheduler: Scheduler) -> tuple[Pool, ...]:
    """Capacity and admitted shares per resource, as the scheduler counts them
    (thousandths of a core and of a GPU), with GPUs per type. Only the thread that
    drives ``scheduler`` may call this."""
    inventory = scheduler.inventory
    cpu = round(inventory.cpu * MILLI)
    pools = [
        Pool("cpu", "", cpu / MILLI, (cpu - scheduler.free_cpu) / MILLI),
        Pool("memory_bytes", "", inventory.memory_bytes,
             inventory.memory_bytes - scheduler.free_memory),
    ]  # fmt: skip
    taken: dict[str, list[int]] = {}  # type -> [devices, thousandths admitted]
    for index, free in enumerate(scheduler.free_gpu):
        name = inventory.gpu_names[index] if index < len(inventory.gpu_names) else ""
        counts = taken.setdefault(gpu_type(name), [0, 0])
        counts[0] += 1
        counts[1] += MILLI - free
    pools += [Pool("gpu", kind, n, milli / MILLI) for kind, (n, milli) in taken.items()]
    return tuple(pools) if taken else (*pools, Pool("gpu", "", 0, 0))


def inventory_pools(
    inventory: Inventory, cpu: float, memory_bytes: int, gpu: float
) -> tuple[Pool, ...]:
    """Pools of an engine that admits nothing itself (Ray): ``inventory``'s totals, and
    what its running tasks asked for as admitted, GPUs as one type per kind of name."""
    kinds = {gpu_type(name) for name in inventory.gpu_names} or {""}
    kind = kinds.pop() if len(kinds) == 1 else ""
    return (
        Pool("cpu", "", inventory.cpu, cpu),
        Pool("memory_bytes", "", inventory.memory_bytes, memory_bytes),
        Pool("gpu", kind, len(inventory.gpus), gpu),
    )
