"""The engine: runs calls on a backend and keeps their run records.

It writes each batch of calls as queued runs in one transaction, hands them to
the backend, and turns the backend's Started/Finished events into record
updates (again one transaction per batch of events). A failed attempt with
retries left goes back to the backend after a backoff, as the same run with the
next attempt number. A call's future resolves only after its final state is
written, so a caller that sees the result also sees the finished record.

With ``KILN_METRICS_PORT`` set, the engine serves its backend's figures (queue,
running tasks, resources, worker starts, failures; see :mod:`kiln.compute.metrics`)
at ``http://KILN_METRICS_HOST:PORT/metrics`` from the moment it starts until it closes.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import cloudpickle

from kiln._gate import Gate
from kiln._runner import RUNNER
from kiln.compute.backends.base import (
    Backend,
    Finished,
    Outcome,
    Report,
    Started,
    TaskEvent,
    TaskSpec,
)
from kiln.compute.resources import Inventory, detect_inventory
from kiln.config import Settings
from kiln.errors import ConfigError, KilnError
from kiln.record.model import RunStatus
from kiln.record.recorder import Recorder, recorder_for
from kiln.record.runs import TRACE_FIELDS
from kiln.record.store.base import WriteBatch
from kiln.record.store.rows import ArtifactRow, RunRow, RunUpdate
from kiln.record.values import result_json, summary_of, unrecorded_message

if TYPE_CHECKING:
    from kiln.compute.metrics import Served

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
# A run's "running" state reaches the store about this late (the engine's own handles
# know at once); a run that ends sooner has it written together with its end.
STARTED_DELAY_S = 0.05
# Rows of runs submitted without waiting (``remote()``, ``map``) linger this long
# before they are written, so that a fast run's row and its end are one transaction.
CREATED_DELAY_S = 0.01
# Runs this engine owns get a fresh heartbeat this often, so that other hosts sharing
# the store can tell them from runs whose driver died (see mark_lost_runs).
HEARTBEAT_S = 10.0
_log = logging.getLogger("kiln")


@dataclass(frozen=True, slots=True)
class _Created:
    """Rows of runs submitted without waiting for them to be written."""

    batch: WriteBatch


@dataclass
class Call:
    """One run to execute: its record row, its task and what to do when it ends."""

    row: RunRow
    spec: TaskSpec
    retries: int = 0
    inputs: list[ArtifactRow] = field(default_factory=list)  # dataset artifact rows
    future: Future[Outcome] = field(default_factory=Future)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    assigned: dict[str, Any] = field(default_factory=dict)
    on_done: list[Any] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)  # env id and lock, if declared


class Engine:
    """One per process and store: the backend and the bookkeeping around it."""

    def __init__(self, settings: Settings, *, backend: BackendFactory | None = None) -> None:
        self.settings = settings
        self.recorder: Recorder = recorder_for(settings)
        self._calls: dict[str, Call] = {}
        self._lock = threading.Lock()
        self._started: dict[str, RunUpdate] = {}  # "running" updates not yet written
        self._unwritten: set[str] = set()  # runs submitted without waiting, rows not yet in
        self._written = threading.Condition(self._lock)
        self._events: queue.SimpleQueue[list[TaskEvent | _Created] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="kiln-record", daemon=True)
        make = backend or _make_backend(settings)
        self.backend = make(detect_inventory(), self.report)  # may refuse the settings
        self.gate: Gate | None = None
        if settings.pool is not None:  # nothing starts before the team server admits it
            self.gate = Gate(self.recorder.store.client, settings.pool,  # type: ignore[attr-defined]
                             start=self.backend.submit, refuse=self._refused,
                             preempt=self.backend.preempt)  # fmt: skip
        self._metrics: Served | None = None
        if settings.metrics_port is not None:
            try:
                self._metrics = _serve_metrics(
                    self.backend, settings.metrics_host, settings.metrics_port
                )
            except BaseException:
                self.backend.close()
                raise
        self._writer.start()

    @property
    def inventory(self) -> Inventory:
        return self.backend.inventory

    def submit(self, calls: list[Call], *, parent: RunRow | None = None, wait: bool = True) -> None:
        """Record ``calls`` as queued (with ``parent`` first, if given), then run them.

        With ``wait=False`` the records are written by the writer thread while the
        tasks already run (``remote()``, which waits for the result anyway, uses it):
        the writer takes events in order, so a run's row is always written before, or
        in the same transaction as, its end.
        """
        batch = WriteBatch(new_runs=[parent] if parent else [])
        for call in calls:
            batch.new_runs.append(call.row)
            batch.artifacts.extend(call.inputs)
        if wait:
            self.recorder.store.write(batch)
        with self._lock:
            for call in calls:
                self._calls[call.spec.run_id] = call
            if not wait:
                self._unwritten.update(c.spec.run_id for c in calls)
        if not wait:
            self._events.put([_Created(batch)])
        specs = [c.spec for c in calls]
        if self.gate is None:
            self.backend.submit(specs)
            return
        try:
            self.gate.submit(specs)
        except KilnError as exc:
            for spec in specs:
                self._refused(spec, f"asking for admission failed: {exc}")

    def _refused(self, spec: TaskSpec, reason: str) -> None:
        """The server would not admit the run: it ends failed with the reason, no retry."""
        with self._lock:
            call = self._calls.get(spec.run_id)
            if call is not None:
                call.retries = 0
        cause = f"not admitted to pool {self.settings.pool}: {reason}"
        self.report([Finished(spec.run_id, spec.attempt, Outcome("failed", cause=cause))])

    def cancel(self, run_id: str) -> None:
        spec = self.gate.withdraw(run_id) if self.gate is not None else None
        if spec is None:
            self.backend.cancel(run_id)
            return
        outcome = Outcome("cancelled", cause="cancelled while waiting for admission")
        self.report([Finished(run_id, spec.attempt, outcome)])

    def wait_recorded(self, run_id: str, timeout: float = 30.0) -> None:
        """Return once the run's row is in the store (at once for most runs)."""
        with self._written:
            self._written.wait_for(lambda: run_id not in self._unwritten, timeout)

    def status(self, run_id: str) -> RunStatus | None:
        """The live status of a run this engine owns, or None if it is not (or no longer) here."""
        with self._lock:
            call = self._calls.get(run_id)
        if call is None:
            return None
        return RunStatus.RUNNING if call.assigned else RunStatus.QUEUED

    def report(self, events: list[TaskEvent]) -> None:
        """Called by the backend with a batch of events; the writer thread records them."""
        self._events.put(list[TaskEvent | _Created](events))

    def _write_loop(self) -> None:
        # Group commit: while one batch is written, the next events queue up behind
        # it, so under load each transaction carries many runs' changes.
        last_beat = time.monotonic()
        while True:
            wait = STARTED_DELAY_S if self._started else HEARTBEAT_S
            events: list[TaskEvent | _Created] = []
            stop = False
            try:
                first = self._events.get(timeout=wait)
                while True:
                    if first is None:
                        stop = True
                    else:
                        events.extend(first)
                    first = self._events.get_nowait()
            except queue.Empty:
                pass
            if not stop and any(isinstance(e, _Created) for e in events):
                stop = self._linger(events)
            self._report(events, flush_started=stop or self._started_due())
            if stop:
                return
            if time.monotonic() - last_beat >= HEARTBEAT_S:
                last_beat = time.monotonic()
                self._heartbeat()

    def _linger(self, events: list[TaskEvent | _Created]) -> bool:
        """Gather events for up to CREATED_DELAY_S, or until a run ends; True on stop."""
        deadline = time.monotonic() + CREATED_DELAY_S
        while not any(isinstance(e, Finished) for e in events):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                more = self._events.get(timeout=left)
            except queue.Empty:
                return False
            if more is None:
                return True
            events.extend(more)
        return False

    def _heartbeat(self) -> None:
        now = time.time()
        with self._lock:
            owned = [RunUpdate(id=run_id, heartbeat_at=now) for run_id in self._calls]
        if owned:
            try:
                self.recorder.store.write(WriteBatch(updates=owned))
            except Exception as exc:
                _log.warning("kiln: heartbeat of %d runs failed: %s", len(owned), exc)

    def _started_due(self) -> bool:
        oldest = min((u.started_at or 0.0 for u in self._started.values()), default=None)
        return oldest is not None and time.time() - oldest >= STARTED_DELAY_S

    def _report(self, events: list[TaskEvent | _Created], *, flush_started: bool) -> None:
        self._store_blobs(events)
        batch = WriteBatch()
        done: list[tuple[Call, Outcome]] = []
        retry: list[tuple[Call, float]] = []
        requeue: list[Call] = []
        created: list[str] = []
        now = time.time()
        with self._lock:
            for event in events:
                if isinstance(event, _Created):  # records of runs submitted without waiting
                    batch.new_runs.extend(event.batch.new_runs)
                    batch.artifacts.extend(event.batch.artifacts)
                    created.extend(row.id for row in event.batch.new_runs)
                    continue
                call = self._calls.get(event.run_id)
                if call is None:
                    continue
                if isinstance(event, Started):
                    call.assigned = event.assigned
                    self._started[event.run_id] = RunUpdate(
                        id=event.run_id,
                        status=RunStatus.RUNNING,
                        started_at=now,
                        heartbeat_at=now,
                        attempt=event.attempt,
                        resources=self._resources(call),
                    )
                    continue
                # Its "running" update, if not yet written, goes in the same UPDATE.
                started = self._started.pop(event.run_id, None) or RunUpdate(id=event.run_id)
                outcome = event.outcome
                call.attempts.append(
                    {"attempt": event.attempt, "status": outcome.status, "cause": outcome.cause}
                )
                if outcome.status == "preempted":  # back to the queue: not one of its retries
                    requeue.append(call)
                    call.assigned = {}
                    error = (f"attempt {event.attempt} {outcome.cause}; it waits to be "
                             "admitted again")  # fmt: skip
                    waits = RunUpdate(id=event.run_id, status=RunStatus.PREEMPTED, error=error,
                                      resources=self._resources(call))  # fmt: skip
                    batch.updates.append(started.then(waits))
                    continue
                failures = sum(1 for a in call.attempts if a["status"] == "failed")
                if outcome.status == "failed" and failures <= call.retries:
                    delay = min(BACKOFF_BASE_S * 2 ** (failures - 1), BACKOFF_MAX_S)
                    retry.append((call, delay))
                    call.assigned = {}
                    requeued = RunUpdate(
                        id=event.run_id,
                        status=RunStatus.QUEUED,
                        error=f"attempt {event.attempt} failed: {outcome.cause}; "
                        f"retrying in {delay:g}s",
                        resources=self._resources(call),
                    )
                    batch.updates.append(started.then(requeued))
                    continue
                del self._calls[event.run_id]
                self._finish(call, outcome, now, batch, started)
                done.append((call, outcome))
            if flush_started:
                # Their heartbeat is now: a heartbeat written while they waited is not
                # put back by this older one.
                batch.updates.extend(
                    u.then(RunUpdate(id=u.id, heartbeat_at=now)) for u in self._started.values()
                )
                self._started.clear()
        try:
            self.recorder.store.write(batch)
        except Exception as exc:
            _log.error("kiln: could not record the end of %d runs: %s", len(done), exc)
            for call, _ in done:
                call.future.set_exception(exc)
            return
        if created:
            with self._written:
                self._unwritten.difference_update(created)
                self._written.notify_all()
        self._after_write(done, retry, requeue)

    def _store_blobs(self, events: list[TaskEvent | _Created]) -> None:
        """Blobs of runs on a node without this KILN_HOME, before their ends are recorded."""
        for event in events:
            if isinstance(event, Finished):
                for data in event.outcome.blobs.values():
                    self.recorder.blobs.put_bytes(data)

    def _after_write(
        self, done: list[tuple[Call, Outcome]], retry: list[tuple[Call, float]],
        requeue: list[Call],
    ) -> None:  # fmt: skip
        """Once recorded: queue retries and preempted runs, seal ended runs, resolve
        their futures."""
        for call in requeue:
            call.spec = replace(call.spec, attempt=len(call.attempts) + 1)
            if self.gate is not None:
                self.gate.requeue(call.spec)
            else:  # preempted without a server (by hand): it runs again at once
                self.backend.submit([call.spec])
        for call, delay in retry:
            spec = replace(call.spec, attempt=len(call.attempts) + 1)
            call.spec = spec
            timer = threading.Timer(delay, self.backend.submit, args=([spec],))
            timer.daemon = True
            timer.start()
        if done:
            self.recorder.seal_later([call.spec.run_id for call, _ in done])
            if self.gate is not None:
                for call, _ in done:
                    self.gate.ended(call.spec.run_id)
        for call, outcome in done:
            call.future.set_result(outcome)
            for callback in call.on_done:
                callback(call, outcome)

    def _resources(self, call: Call) -> dict[str, Any]:
        spec = call.spec
        return {
            **(call.row.resources or {}),  # what the caller declared, e.g. its env
            "requested": spec.resources.to_json(),
            "limits": {"timeout_s": spec.timeout_s, "retries": call.retries},
            "assigned": call.assigned,
            "attempts": call.attempts,
        }

    def _finish(
        self, call: Call, outcome: Outcome, now: float, batch: WriteBatch, started: RunUpdate
    ) -> None:
        run_id, app = call.spec.run_id, call.spec.app
        result: Any = None
        if outcome.result is not None:
            # What cannot be recorded is left out here, and the record says so (a run
            # whose result is never fetched too); Run.result() also warns the caller.
            result, problems = result_json(cloudpickle.loads(outcome.result))
            if problems:
                batch.warnings.append((run_id, unrecorded_message(problems)))
            batch.summaries.extend((run_id, app, k, v) for k, v in summary_of(result).items())
        error = outcome.error or outcome.cause
        if error and len(call.attempts) > 1:
            error = f"{error}\n(after {len(call.attempts)} attempts)"
        usage = dict(outcome.usage)
        trace = {k: usage.pop(k) for k in TRACE_FIELDS if k in usage}
        update = RunUpdate(
            id=run_id,
            status=RunStatus(outcome.status),
            ended_at=now,
            result=result,
            error=error,
            usage={k: v for k, v in usage.items() if k != "worker_pid"},
            resources=self._resources(call),
            **trace,
        )
        if outcome.environment is not None:
            update = update.then(
                RunUpdate(id=run_id, environment={**outcome.environment, **call.environment})
            )
        batch.updates.append(started.then(update))

    def close(self) -> None:
        """Stop the backend; whatever still runs or waits is recorded as cancelled."""
        if self._metrics is not None:
            _stop_metrics(self._metrics)
            self._metrics = None
        waiting = self.gate.waiting() if self.gate is not None else []
        if self.gate is not None:
            self.gate.close()
        self.backend.close()
        shut = Outcome("cancelled", cause="the engine shut down while it waited for admission")
        if waiting:
            self.report([Finished(s.run_id, s.attempt, shut) for s in waiting])
        self._events.put(None)
        self._writer.join(timeout=30)


BackendFactory = Callable[[Inventory, Report], Backend]
# The metrics ports this process serves (an engine's each): a second engine of the
# same process with the same port is not served, rather than failing.
_metrics_ports: set[tuple[str, int]] = set()
_metrics_lock = threading.Lock()


def _serve_metrics(backend: Backend, host: str, port: int) -> Served | None:
    """Serve ``backend``'s figures on KILN_METRICS_PORT; ConfigError if the port is taken
    by another process, None (with a warning) if by another engine of this one."""
    from kiln.compute.figures import Measured
    from kiln.compute.metrics import engine_registry, serve

    if not isinstance(backend, Measured):
        _log.warning("kiln: %s has no figures to serve on KILN_METRICS_PORT",
                     type(backend).__name__)  # fmt: skip
        return None
    with _metrics_lock:
        if (host, port) in _metrics_ports:
            _log.warning("kiln: KILN_METRICS_PORT %d already serves another engine of this "
                         "process; this engine's figures are not served", port)  # fmt: skip
            return None
        served = serve(engine_registry(backend.figures), host, port)
        _metrics_ports.add((host, port))
    return served


def _stop_metrics(served: Served) -> None:
    served.close()
    with _metrics_lock:
        _metrics_ports.discard((served.host, served.port))


def _make_backend(settings: Settings) -> BackendFactory:
    if settings.backend == "local":
        from kiln.compute.backends.local import LocalBackend

        return lambda inventory, report: LocalBackend(inventory, report, RUNNER)
    if settings.backend == "ray":
        from kiln.compute.backends.ray import RayBackend

        def ray(_inventory: Inventory, report: Report) -> Backend:
            # The cluster's resources are the inventory, not this machine's.
            backend = RayBackend(report, RUNNER, settings.ray_address, settings.ray_shared_home)
            backend.check_store(settings.record_url)
            return backend

        return ray
    if settings.backend == "kubernetes":
        return _kubernetes(settings)
    raise ConfigError(
        "KILN_BACKEND",
        f"the {settings.backend} engine is not available in this version of Kiln; use local",
    )


def _kubernetes(settings: Settings) -> BackendFactory:
    from kiln.compute.backends.kubernetes import KubernetesBackend
    from kiln.compute.kube import KubeSettings

    if settings.server_url is None:
        raise ConfigError(
            "KILN_SERVER", "runs on Kubernetes record through a team server, the one store "
            "every pod reaches: set KILN_SERVER (and KILN_TOKEN)",
        )  # fmt: skip
    kube = KubeSettings.from_env()
    server_url = settings.server_url

    def kubernetes(_inventory: Inventory, report: Report) -> Backend:
        blobs = recorder_for(settings).blobs  # the server's: pods read tasks from it
        return KubernetesBackend(report, kube, server_url, settings.project,
                                 put=blobs.put_bytes, fetch=blobs.read)  # fmt: skip

    return kubernetes


_engines: dict[tuple[str, ...], Engine] = {}
_engines_lock = threading.Lock()


def engine_for(settings: Settings, *, backend: BackendFactory | None = None) -> Engine:
    """The process's engine for these settings, started on first use (with ``backend``
    if given: ``kiln.testing.FakeBackend`` for tests of code built on functions)."""
    # Each token records as its own principal: one engine per token (a server running
    # registered functions for several callers), not one for all.
    key = (settings.record_url, str(settings.home), settings.backend, settings.pool or "",
           settings.project or "", settings.token or "")  # fmt: skip
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = Engine(settings, backend=backend)
        return engine


def close_engines() -> None:
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        try:
            engine.close()
        except Exception as exc:
            _log.warning("kiln: closing the engine failed: %s", exc)


# Registered after the recorders' hook, so it runs first: engines record their
# last cancellations before the recorders close.
atexit.register(close_engines)
