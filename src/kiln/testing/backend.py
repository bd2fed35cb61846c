"""A backend that runs tasks in threads of this process: no workers, no scheduler.

It honours the :class:`~kiln.compute.backends.base.Backend` contract (every task
is reported Started, then Finished exactly once), so the engine's bookkeeping,
retries and futures can be tested without starting processes. Resources are
ignored and timeouts are not enforced.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from kiln.compute.backends.base import Finished, Grant, Outcome, Report, Started, TaskSpec
from kiln.compute.resources import Inventory, Resources
from kiln.compute.scheduler import Allocation


@dataclass
class FakeBackend:
    inventory: Inventory
    report: Report
    workers: int = 2
    submitted: list[TaskSpec] = field(default_factory=list)
    _cancelled: set[str] = field(default_factory=set)
    _preempted: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kiln-fake")

    def submit(self, tasks: Sequence[TaskSpec]) -> None:
        with self._lock:
            self.submitted.extend(tasks)
        for task in tasks:
            self._pool.submit(self._run, task)

    def cancel(self, run_id: str) -> None:
        with self._lock:
            self._cancelled.add(run_id)

    def preempt(self, run_id: str, cause: str, grace_s: float) -> None:
        """A task not yet started ends as preempted; a running one (a thread cannot be
        interrupted) runs to its end, as if it finished within its grace period."""
        with self._lock:
            self._preempted[run_id] = cause

    def reserve(self, lease_id: str, resources: Resources, priority: int, granted: Grant) -> None:
        """Granted at once, with no devices: this backend does not schedule."""
        granted(Allocation(lease_id, round(resources.cpu * 1000), resources.memory_bytes))

    def release(self, lease_id: str) -> None:
        """Nothing is held."""

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _run(self, task: TaskSpec) -> None:
        from kiln._runner import run_task  # the same code a real worker runs

        with self._lock:
            cancelled = task.run_id in self._cancelled
            preempted = self._preempted.pop(task.run_id, None)
        if cancelled or preempted:
            outcome = Outcome("cancelled", cause="cancelled before it started")
            if preempted:
                outcome = Outcome("preempted", cause=preempted)
            self.report([Finished(task.run_id, task.attempt, outcome)])
            return
        self.report([Started(task.run_id, task.attempt, {"thread": threading.get_ident()})])
        reply = run_task(task, _load(task.fn_payload))
        outcome = Outcome(
            reply["status"],
            result=reply.get("result"),
            error=reply.get("error"),
            cause=reply.get("cause"),
            usage=reply.get("usage", {}),
            environment=reply.get("environment"),
        )
        self.report([Finished(task.run_id, task.attempt, outcome)])


def _load(payload: bytes) -> Callable[..., Any]:
    spec = cloudpickle.loads(payload)
    if not (isinstance(spec, tuple) and spec[0] == "ref"):
        return spec  # type: ignore[no-any-return]
    obj: Any = importlib.import_module(spec[1])
    for part in spec[2].split("."):
        obj = getattr(obj, part)
    return getattr(obj, "__wrapped__", obj)  # type: ignore[no-any-return]
