"""The local engine: the scheduler in front of warm worker processes on this machine.

One loop thread owns all state. Everything else (submits, cancels, replies read
from workers) reaches it as messages on one queue, so no state is shared
between threads. Each iteration drains the queue, carries out the scheduler's
decisions and reports the resulting events in one batch.

Workers are kept warm between tasks, keyed by interpreter, GPU assignment
(``CUDA_VISIBLE_DEVICES``) and thread settings (``OMP_NUM_THREADS`` and the like,
from the CPU request: libraries read them once, when they load), so a repeated
small call pays no interpreter start. Each worker leads its own process group: a
timeout or a cancel kills the whole tree, and the next task gets a fresh worker.

A timeout counts from the moment the worker calls the task's function (it says so
on its pipe), so time spent queued, or waiting for a fresh worker to start, never
counts against it.

Its figures (:meth:`LocalBackend.figures`: queue, running tasks, resources, worker
starts, endings) are made by the loop thread too, on a message like any other, so a
reader in another thread never sees its state half changed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kiln.compute import _threads, _worker
from kiln.compute.backends.base import (
    Finished,
    Grant,
    Outcome,
    Report,
    Started,
    TaskEvent,
    TaskSpec,
)
from kiln.compute.figures import FailureCause, Figures, Tally, scheduler_pools
from kiln.compute.resources import Inventory, Resources
from kiln.compute.scheduler import Allocation, Cancel, Release, Scheduler, Submit, Task

MAX_IDLE_WORKERS = 8
FIGURES_TIMEOUT_S = 10.0  # a loop this late to answer is stuck: the scrape fails
# What a warm worker is kept for: its interpreter, its CUDA_VISIBLE_DEVICES and its
# thread variables.
WorkerKey = tuple[str, str, tuple[tuple[str, str], ...]]


class _Worker:
    """One warm worker process and the thread that reads its replies."""

    def __init__(
        self,
        key: WorkerKey,
        inbox: queue.SimpleQueue[Any],
        env: dict[str, str],
        runner: str,
        code_paths: list[str],
    ) -> None:
        self.key = key
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        self.proc = subprocess.Popen(
            [key[0], "-m", "kiln.compute._worker", str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w),
            start_new_session=True,  # its own process group: killed as a tree
            env=env,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.pid = self.proc.pid
        self.task: str | None = None
        self.environment: dict[str, Any] | None = None  # sent with its first reply
        init = {"sys_path": code_paths, "cwd": str(Path.cwd()), "runner": runner}
        _worker.send(self._to_child, init)
        threading.Thread(target=self._read, args=(inbox,), daemon=True, name="kiln-worker").start()

    def run(self, task: TaskSpec) -> None:
        self.task = task.run_id
        _worker.send(self._to_child, task)

    def _read(self, inbox: queue.SimpleQueue[Any]) -> None:
        try:
            while (message := _worker.recv(self._from_child)) is not None:
                if "clock" in message:
                    inbox.put(("clock", self, message["clock"]))
                elif "ready" not in message:
                    inbox.put(("done", self, message))
        except OSError:
            pass
        code = self.proc.wait()
        os.close(self._from_child)
        inbox.put(("died", self, code))

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM to the task's process tree: the worker raises kiln.Preempted in it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)

    def stop(self) -> None:
        """Ask an idle worker to exit (closing its pipe ends its loop)."""
        with contextlib.suppress(OSError):
            os.close(self._to_child)


@dataclass
class _Slot:
    spec: TaskSpec
    threads: dict[str, str]  # its thread variables: its worker is started with them
    worker: _Worker | None = None
    deadline: float | None = None
    stop_cause: str | None = None  # why we killed it, if we did
    stop_status: Literal["failed", "cancelled", "preempted"] = "failed"


@dataclass
class LocalBackend:
    """Runs tasks in warm worker processes on this machine. See the module docstring."""

    inventory: Inventory
    report: Report
    runner: str  # "module:function" that runs one task inside a worker
    python: str = sys.executable
    _inbox: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    _slots: dict[str, _Slot] = field(default_factory=dict)
    _idle: list[_Worker] = field(default_factory=list)
    _timed: dict[str, _Slot] = field(default_factory=dict)  # running slots with a deadline
    _leases: dict[str, Grant] = field(default_factory=dict)  # reservations not yet admitted
    _thread: threading.Thread | None = None
    _tally: Tally = field(default_factory=Tally)  # the loop thread's counters

    def __post_init__(self) -> None:
        self._scheduler = Scheduler(self.inventory)
        self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
        self._thread.start()

    # -- the interface ---------------------------------------------------------------

    def submit(self, tasks: Sequence[TaskSpec]) -> None:
        self._inbox.put(("submit", list(tasks)))

    def cancel(self, run_id: str) -> None:
        self._inbox.put(("cancel", run_id))

    def preempt(self, run_id: str, cause: str, grace_s: float) -> None:
        self._inbox.put(("preempt", run_id, cause, grace_s))

    def reserve(self, lease_id: str, resources: Resources, priority: int, granted: Grant) -> None:
        """Queue a long-lived holder (a serving replica) with the tasks: ``granted`` is
        called with its allocation, from the loop thread, once the scheduler admits it."""
        self._inbox.put(("reserve", Task(lease_id, resources, priority), granted))

    def release(self, lease_id: str) -> None:
        """Give back what ``lease_id`` holds, or withdraw it if it is still queued."""
        self._inbox.put(("release", lease_id))

    def figures(self) -> Figures:
        """Queue, running tasks, resources and counters, made by the loop thread (from
        any thread; at once if the engine has stopped). Raises TimeoutError if the loop
        does not answer within FIGURES_TIMEOUT_S."""
        answer: Future[Figures] = Future()
        self._inbox.put(("figures", answer))
        deadline = time.monotonic() + FIGURES_TIMEOUT_S
        while True:
            try:
                return answer.result(timeout=0.5)
            except TimeoutError:
                if self._thread is None or not self._thread.is_alive():
                    return self._figures()  # stopped: nothing changes its state any more
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"the local engine's loop did not answer in {FIGURES_TIMEOUT_S:g}s"
                    ) from None

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(("close",))
            self._thread.join(timeout=10)

    # -- the loop --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            messages = []
            with contextlib.suppress(queue.Empty):  # on Empty a deadline came due
                messages.append(self._inbox.get(timeout=self._until_deadline()))
            while True:
                try:
                    messages.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            events: list[TaskEvent] = []
            closing = False
            for message in messages:
                if message[0] == "close":
                    closing = True
                else:
                    self._handle(message, events)
            self._enforce_deadlines()
            if closing:
                self._shutdown(events)
            if events:
                self.report(events)
            if closing:
                return

    def _until_deadline(self) -> float | None:
        deadlines = [s.deadline for s in self._timed.values() if s.deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _handle(self, message: tuple[Any, ...], events: list[TaskEvent]) -> None:
        kind = message[0]
        if kind == "submit":
            self._on_submit(message[1], events)
        elif kind == "reserve":
            self._leases[message[1].id] = message[2]
            for alloc in self._scheduler.handle(Submit(message[1])):
                self._dispatch(alloc, events)
        elif kind == "release":
            if self._leases.pop(message[1], None) is not None:
                self._scheduler.handle(Cancel(message[1]))
            for alloc in self._scheduler.handle(Release(message[1])):
                self._dispatch(alloc, events)
        elif kind == "cancel":
            self._on_cancel(message[1], events)
        elif kind == "preempt":
            self._on_preempt(message[1], message[2], message[3], events)
        elif kind == "figures":
            message[1].set_result(self._figures())
        else:
            self._from_worker(kind, message[1], message[2], events)

    def _on_submit(self, specs: list[TaskSpec], events: list[TaskEvent]) -> None:
        threads: dict[float, dict[str, str]] = {}  # by CPU request, for this batch
        for spec in specs:
            if spec.threads:  # as recorded (kiln reproduce)
                self._slots[spec.run_id] = _Slot(spec, spec.threads)
            else:  # from the request, unless the user set them in this environment
                cpu = spec.resources.cpu
                if cpu not in threads:
                    threads[cpu] = _threads.thread_env(cpu)
                self._slots[spec.run_id] = _Slot(spec, threads[cpu])
            task = Task(spec.run_id, spec.resources, spec.priority)
            for alloc in self._scheduler.handle(Submit(task)):
                self._dispatch(alloc, events)

    def _from_worker(
        self, kind: str, worker: _Worker, payload: Any, events: list[TaskEvent]
    ) -> None:
        if kind == "clock":
            self._on_clock(worker, payload)
        elif kind == "done":
            self._on_done(worker, payload, events)
        elif kind == "died":
            self._on_died(worker, payload, events)

    def _on_cancel(self, run_id: str, events: list[TaskEvent]) -> None:
        slot = self._slots.get(run_id)
        if slot is None:
            return
        if slot.worker is None:  # still queued
            self._scheduler.handle(Cancel(run_id))
            self._end(slot, Outcome("cancelled", cause="cancelled before it started"), events)
        else:
            slot.stop_cause, slot.stop_status = "cancelled while running", "cancelled"
            slot.worker.kill()

    def _on_preempt(self, run_id: str, cause: str, grace_s: float, events: list[TaskEvent]) -> None:
        slot = self._slots.get(run_id)
        if slot is None or slot.stop_cause is not None:
            return
        if slot.worker is None:  # still queued here
            self._scheduler.handle(Cancel(run_id))
            self._end(slot, Outcome("preempted", cause=cause), events)
            return
        slot.stop_cause, slot.stop_status = cause, "preempted"
        slot.deadline = time.monotonic() + grace_s  # then it is killed
        self._timed[run_id] = slot
        slot.worker.terminate()

    def _on_clock(self, worker: _Worker, run_id: str) -> None:
        """The task's function was called: its timeout runs from now."""
        slot = self._slots.get(run_id)
        if slot is None or slot.worker is not worker or slot.spec.timeout_s is None:
            return  # it ended (or was killed) meanwhile
        if slot.stop_cause is not None:
            return  # being stopped: its grace period, if any, is its deadline
        slot.deadline = time.monotonic() + slot.spec.timeout_s
        self._timed[run_id] = slot

    def _on_done(self, worker: _Worker, reply: dict[str, Any], events: list[TaskEvent]) -> None:
        slot = self._slots.get(reply["run_id"])
        worker.task = None
        if "environment" in reply:
            worker.environment = reply["environment"]
        environment = worker.environment
        if "sandbox" in reply:  # this run's own, never the worker's next run's
            environment = {**(environment or {}), "sandbox": reply["sandbox"]}
        if slot is None or slot.stop_cause is None:
            self._park(worker)  # a worker we are killing is not reused
        elif slot.stop_status == "preempted":
            worker.kill()  # it took a SIGTERM: not reused either
        if slot is not None:
            status = reply["status"]
            if slot.stop_status == "preempted" and status != "succeeded":
                status = "preempted"  # it saved what it could in its grace period
            outcome = Outcome(
                status,
                result=reply.get("result"),
                error=reply.get("error"),
                cause=slot.stop_cause if status == "preempted" else reply.get("cause"),
                usage={**reply.get("usage", {}), "worker_pid": worker.pid},
                environment=environment,
            )
            self._end(slot, outcome, events)

    def _on_died(self, worker: _Worker, code: int, events: list[TaskEvent]) -> None:
        if worker in self._idle:
            self._idle.remove(worker)
        slot = self._slots.get(worker.task) if worker.task else None
        if slot is None:
            return
        failure: FailureCause = "timeout"  # the one failure we kill a worker for
        if slot.stop_cause:
            cause, status = slot.stop_cause, slot.stop_status
        else:
            cause = (
                f"worker died: signal {-code}" if code < 0 else f"worker exited with code {code}"
            )
            status, failure = "failed", "worker_died"
        outcome = Outcome(status, cause=cause, usage={"worker_pid": worker.pid})
        self._end(slot, outcome, events, failure)

    def _dispatch(self, alloc: Allocation, events: list[TaskEvent]) -> None:
        granted = self._leases.pop(alloc.task_id, None)
        if granted is not None:
            try:
                granted(alloc)
            except Exception:  # its holder is gone: the resources are free again
                for follow in self._scheduler.handle(Release(alloc.task_id)):
                    self._dispatch(follow, events)
            return
        slot = self._slots[alloc.task_id]
        cuda = alloc.cuda_visible_devices if self.inventory.gpus else None
        spec = slot.spec
        key = (spec.python or self.python, cuda or "", tuple(slot.threads.items()))
        worker = self._worker_for(key, cuda, spec, slot.threads)
        worker.run(spec)
        slot.worker = worker
        assigned: dict[str, Any] = {"worker_pid": worker.pid}
        if alloc.gpus:
            assigned["gpus"] = {str(i): share / 1000 for i, share in alloc.gpus}
        if cuda is not None:
            assigned["cuda_visible_devices"] = cuda
        events.append(Started(slot.spec.run_id, slot.spec.attempt, assigned))

    def _worker_for(
        self, key: WorkerKey, cuda: str | None, spec: TaskSpec, threads: dict[str, str]
    ) -> _Worker:
        for i, worker in enumerate(self._idle):
            if worker.key == key:
                return self._idle.pop(i)
        env = dict(os.environ)
        env.pop("VIRTUAL_ENV", None)
        # The driver's metrics port is its own: an engine of a run started inside this
        # task (in the worker) must not try to serve on it too.
        env.pop("KILN_METRICS_PORT", None)
        env.update(threads)  # read by OpenMP, BLAS and torch as they load; kept for its life
        if cuda is not None:
            env["CUDA_VISIBLE_DEVICES"] = cuda
        if spec.env_lock:
            env["KILN_ENV_LOCK"] = spec.env_lock
        self._tally.worker_starts += 1
        return _Worker(key, self._inbox, env, self.runner, list(spec.sys_path))

    def _park(self, worker: _Worker) -> None:
        self._idle.append(worker)
        if len(self._idle) > MAX_IDLE_WORKERS:
            self._idle.pop(0).stop()

    def _end(
        self,
        slot: _Slot,
        outcome: Outcome,
        events: list[TaskEvent],
        failure: FailureCause = "error",
    ) -> None:
        """``failure``: why, if it failed (its function raised unless said otherwise)."""
        self._tally.ended(outcome.status, failure)
        del self._slots[slot.spec.run_id]
        self._timed.pop(slot.spec.run_id, None)
        events.append(Finished(slot.spec.run_id, slot.spec.attempt, outcome))
        if slot.worker is not None:
            for alloc in self._scheduler.handle(Release(slot.spec.run_id)):
                self._dispatch(alloc, events)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for slot in list(self._timed.values()):
            if slot.deadline is None or now < slot.deadline:
                continue
            slot.deadline = None
            if slot.stop_cause is None:
                slot.stop_cause = f"timed out after {slot.spec.timeout_s:g}s"
            elif slot.stop_status == "preempted":  # its grace period is over
                slot.stop_cause += " (killed at the end of its grace period)"
            else:
                continue
            if slot.worker is not None:
                slot.worker.kill()

    def _shutdown(self, events: list[TaskEvent]) -> None:
        for slot in list(self._slots.values()):
            if slot.worker is not None:
                slot.worker.kill()
            else:
                self._scheduler.handle(Cancel(slot.spec.run_id))
            self._tally.ended("cancelled")
            events.append(
                Finished(
                    slot.spec.run_id,
                    slot.spec.attempt,
                    Outcome("cancelled", cause="the engine shut down"),
                )
            )
        self._slots.clear()
        for worker in self._idle:
            worker.stop()
        self._idle.clear()

    def _figures(self) -> Figures:
        """The figures now; only the loop thread (or anyone once it has stopped)."""
        scheduler = self._scheduler
        tasks = sum(1 for task_id in scheduler.running if task_id in self._slots)
        tally = self._tally
        return Figures(
            queued=scheduler.queued - len(self._leases),
            running=tasks,
            resources=scheduler_pools(scheduler),
            worker_starts=tally.worker_starts,
            finished=dict(tally.finished),
            failures=dict(tally.failures),
            reservations_queued=len(self._leases),
            reservations_held=len(scheduler.running) - tasks,
        )
