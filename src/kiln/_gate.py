"""The engine's side of admission: nothing starts on a shared pool until the team
server admits it (``KILN_POOL``; see :mod:`kiln.server.quotas`).

The gate asks the server to admit each run as it is submitted: an admitted run goes
to the backend at once, a pending one waits here, a refused one ends as failed with
the server's reason. A thread syncs with the server (every second while something
waits, else a third of the lease): it renews the leases of the runs the engine holds,
reports those that ended, starts those admitted since, and preempts those the server
took back. A preempted run's next attempt waits here again until it is readmitted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kiln.compute.backends.base import TaskSpec
from kiln.errors import KilnError

SYNC_WAITING_S = 1.0  # how often to ask while a run waits for admission
GRACE_S = 30.0  # a preempted function's time to save a checkpoint
ENDED_WAIT_S = 0.05  # how long an ended run waits for a submission to tell the server
_log = logging.getLogger("kiln")

Start = Callable[[list[TaskSpec]], None]
Refuse = Callable[[TaskSpec, str], None]
Stop = Callable[[str, str, float], None]


class Gate:
    """Admission through the team server, for one engine and pool."""

    def __init__(
        self, client: Any, pool: str, *, start: Start, refuse: Refuse, preempt: Stop,
        grace_s: float = GRACE_S,
    ) -> None:  # fmt: skip
        self.client = client  # kiln.record.store.http.Client
        self.pool = pool
        self.grace_s = grace_s
        self._start, self._refuse, self._preempt = start, refuse, preempt
        self._waiting: dict[str, TaskSpec] = {}  # not (or no longer) admitted
        self._running: set[str] = set()  # handed to the backend
        self._stopping: set[str] = set()  # told to stop, not yet ended
        self._ended: list[str] = []  # to tell the server at the next sync
        self._ended_at = 0.0  # when the first of them ended
        self._lease_s = 30.0
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="kiln-admission", daemon=True)
        self._thread.start()

    def submit(self, specs: list[TaskSpec]) -> None:
        """Ask for admission of each run; start the admitted ones, end the refused."""
        with self._lock:  # what ended since the last sync goes with it: no sync for it
            ended, self._ended = self._ended, []
        body = {"pool": self.pool, "workloads": [_ask(s) for s in specs], "ended": ended}
        try:
            answered = self.client.call("POST", "/workloads", json=body)
        except BaseException:
            with self._lock:
                self._ended = ended + self._ended
            raise
        answers = answered["workloads"]
        by_id = {s.run_id: s for s in specs}
        start: list[TaskSpec] = []
        with self._lock:
            lease_s = float(answered.get("lease_s") or self._lease_s)
            if lease_s != self._lease_s:  # the sync thread waits by it: wake it
                self._lease_s = lease_s
                self._lock.notify()
            for answer in answers:
                spec = by_id[answer["id"]]
                if answer["state"] == "admitted":
                    self._running.add(spec.run_id)
                    start.append(spec)
                elif answer["state"] == "pending":
                    self._waiting[spec.run_id] = spec
                    self._lock.notify()
        if start:
            self._start(start)
        for answer in answers:
            if answer["state"] == "refused":
                self._refuse(by_id[answer["id"]], answer.get("reason") or "refused")

    def requeue(self, spec: TaskSpec) -> None:
        """A preempted attempt ended: ``spec`` (its next attempt) waits for readmission."""
        with self._lock:
            self._running.discard(spec.run_id)
            self._stopping.discard(spec.run_id)
            self._waiting[spec.run_id] = spec
            self._lock.notify()

    def ended(self, run_id: str) -> None:
        """The run ended for good: its quota goes back with the next submission or sync,
        within ENDED_WAIT_S (a sequence of calls tells the server with its next call)."""
        with self._lock:
            self._running.discard(run_id)
            self._stopping.discard(run_id)
            self._waiting.pop(run_id, None)
            if not self._ended:
                self._ended_at = time.monotonic()
            self._ended.append(run_id)
            self._lock.notify()

    def withdraw(self, run_id: str) -> TaskSpec | None:
        """Take back a run still waiting for admission (it was cancelled); None if it
        is not waiting here."""
        with self._lock:
            spec = self._waiting.pop(run_id, None)
            if spec is not None:
                if not self._ended:
                    self._ended_at = time.monotonic()
                self._ended.append(run_id)
                self._lock.notify()
            return spec

    def waiting(self) -> list[TaskSpec]:
        with self._lock:
            return list(self._waiting.values())

    def close(self) -> None:
        """Stop syncing, after telling the server every run this engine held ended."""
        with self._lock:
            self._closed = True
            self._ended += [*self._waiting, *self._running]
            self._waiting.clear()
            self._running.clear()
            self._lock.notify()
        self._thread.join(timeout=10)

    # -- the sync thread -------------------------------------------------------------

    def _due(self, last: float) -> float | None:
        """When the next sync is due (the lock held), or None if it is due now: at once
        on close; ENDED_WAIT_S after a run ended (unless a submission took it along);
        every second while a run waits; a third of the lease otherwise."""
        if self._closed:
            return None
        due = last + (SYNC_WAITING_S if self._waiting else self._lease_s / 3)
        if self._ended:
            due = min(due, self._ended_at + ENDED_WAIT_S)
        return None if due <= time.monotonic() else due

    def _loop(self) -> None:
        last = time.monotonic()
        while True:
            with self._lock:
                while (due := self._due(last)) is not None:
                    self._lock.wait(timeout=due - time.monotonic())
                closed = self._closed
                ended, self._ended = self._ended, []
                running = list(self._running)
                held = [*self._waiting, *running]
            last = time.monotonic()
            if not held and not ended:
                if closed:
                    return
                continue
            try:
                body = {"held": held, "ended": ended, "running": running}
                answer = self.client.call("POST", "/workloads:sync", json=body)
            except KilnError as exc:
                _log.warning("kiln: admission sync with %s failed: %s", self.client.url, exc)
                with self._lock:
                    self._ended = ended + self._ended  # told next time
                    if not closed:
                        self._lock.wait(timeout=SYNC_WAITING_S)
                if closed:
                    return
                continue
            if closed:
                return
            self._apply(answer)

    def _apply(self, answer: dict[str, Any]) -> None:
        self._lease_s = float(answer.get("lease_s") or self._lease_s)
        start: list[TaskSpec] = []
        lost: list[TaskSpec] = []
        with self._lock:
            for wid in answer["admitted"]:
                spec = self._waiting.pop(wid, None)
                if spec is not None:
                    self._running.add(wid)
                    start.append(spec)
            stop = self._to_stop(answer, {s.run_id for s in start})
            for wid in answer["unknown"]:  # its lease ran out (this engine was stalled)
                spec = self._waiting.pop(wid, None)
                if spec is not None:  # asked again below
                    lost.append(spec)
                elif wid in self._running and wid not in self._stopping:  # its quota is gone
                    self._stopping.add(wid)
                    stop.append((wid, "its lease ran out, so its quota was reclaimed"))
        if start:
            self._start(start)
        for wid, cause in stop:
            self._preempt(wid, cause, self.grace_s)
        if lost:
            try:
                self.submit(lost)
            except KilnError as exc:
                for spec in lost:
                    self._refuse(spec, f"its lease was lost and asking again failed: {exc}")

    def _to_stop(self, answer: dict[str, Any], started: set[str]) -> list[tuple[str, str]]:
        """The runs to preempt, with why (those readmitted meanwhile go on)."""
        stop: list[tuple[str, str]] = []
        for notice in answer["preempt"]:
            wid = notice["id"]
            if wid in self._running and wid not in self._stopping and wid not in started:
                self._stopping.add(wid)
                stop.append((wid, notice["cause"]))
        return stop


def _ask(spec: TaskSpec) -> dict[str, Any]:
    r = spec.resources
    priority = max(-100, min(100, spec.priority))
    return {"id": spec.run_id, "cpu": r.cpu, "memory_bytes": r.memory_bytes, "gpu": r.gpu,
            "timeout_s": spec.timeout_s, "priority": priority}  # fmt: skip
