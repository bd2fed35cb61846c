"""The Ray engine: the same tasks as the local engine, as Ray tasks on a Ray cluster.

``KILN_BACKEND=ray`` selects it; ``KILN_RAY_ADDRESS`` names the cluster (unset: join
the one this machine runs, or start a local one). Each task becomes a Ray task with
its ``num_cpus``, ``num_gpus`` (fractions are Ray's fractional GPUs) and ``memory``;
Kiln's engine keeps doing retries, so Ray's own are off. Timeouts and ``cancel`` are
``ray.cancel(force=True)``; a timeout counts from the moment the worker calls the
function (it sends a second notice then), never from submit, so waiting in Ray's queue
or for a worker to start never times a task out. A request must fit one node (Ray
would queue it for ever otherwise), so it is checked against each live node before
anything is submitted.

Threads: a task's thread variables (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ...; see
``kiln.compute._threads``) go in its runtime_env's ``env_vars``, as on the local
engine: Ray keeps workers per runtime_env, so a worker's libraries load with the
task's count (Ray's own default sets only ``OMP_NUM_THREADS``, to the CPUs rounded
down, and only in a worker that does not have it yet).

Started and Finished: the worker sends a one-line notice over a socket of the
driver's when the task starts (Ray tells a task's owner only when it ends), so a run
queued inside Ray stays queued in the record. Its end comes from Ray's result future:
no polling. A worker or node that dies fails the attempt with Ray's error as the
cause (``Ray worker died: NodeDiedError: ...``), and the engine's retries run again.

Envs: a ``kiln.Env`` is resolved to its hashed lock on the driver (never built
there) and runs under Ray's ``uv`` runtime_env made from that lock: each node builds
it once, with uv, and caches it. The run records the same env id and lock as on the
local engine.

Recording: a task runs the same runner as a local worker, in a Ray worker process,
and writes its run, metrics and artifact rows to the store named in the task,
directly and batched as locally. Where the blobs go depends on the node:

* a node that sees the driver's ``KILN_HOME`` (the nodes on the driver's machine;
  every node with ``KILN_RAY_SHARED_HOME=1``, for a shared filesystem) writes blobs
  there, as a local worker does;
* any other node writes them to a scratch home of its worker, and they travel back
  with the task's result through Ray's object store; the driver's engine stores
  them before it records the run's end, so a finished run's artifacts are there.

So a cluster of several machines needs a store every node reaches: PostgreSQL (or,
later, the team server). A SQLite store with nodes that cannot see it is refused
before anything is recorded.

Figures (:meth:`RayBackend.figures`) are Kiln's view of the cluster: its tasks that
wait in Ray's queue or run, the live nodes' totals as capacity, what its running tasks
asked for as admitted (other users of the cluster are not seen), and as worker starts
the Ray workers its tasks first ran on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hmac
import importlib
import json
import logging
import os
import re
import secrets
import selectors
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from kiln.compute import _threads
from kiln.compute.backends.base import (
    Finished,
    Grant,
    Outcome,
    Report,
    Started,
    TaskEvent,
    TaskSpec,
)
from kiln.compute.figures import FailureCause, Figures, Tally, inventory_pools
from kiln.compute.resources import Inventory, Resources
from kiln.errors import ConfigError, ValidationError

INVENTORY_S = 5.0  # how often the nodes are listed again while tasks wait
# A worker ends its own task this long after its timeout, should the driver's
# enforcement not have (a notice that never came): the timeout holds either way.
WATCHDOG_GRACE_S = 10.0
_ASSIGNED = ("node_id", "node_ip", "worker_pid")  # where a task runs, as its worker says
_WORKER_DIED = ("WorkerCrashedError", "NodeDiedError", "OwnerDiedError")
MAX_NOTICE = 1 << 16  # bytes in a notice line; a longer one closes the connection
_log = logging.getLogger("kiln")


class Inbox:
    """Workers' notices, read from any number of connections as hostile input.

    A connection first sends the token on a line of its own, within 128 bytes, and
    nothing of it is parsed before; then notices, one JSON object per line of at most
    :data:`MAX_NOTICE` bytes. Anything else closes that connection, and only it.
    """

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._conns: dict[object, tuple[bool, bytes]] = {}

    def feed(self, conn: object, chunk: bytes) -> tuple[list[dict[str, Any]], bool]:
        """The notices ``chunk`` completes, and whether to keep the connection."""
        authed, buf = self._conns.get(conn, (False, b""))
        buf += chunk
        if not authed:
            line, newline, buf = buf.partition(b"\n")
            if not newline:
                return [], self._keep(conn, False, line, len(line) <= 128)
            if not hmac.compare_digest(line, self._token):
                return [], self._keep(conn, False, b"", False)
            authed = True
        *lines, buf = buf.split(b"\n")
        notices: list[dict[str, Any]] = []
        for line in lines:
            try:
                notice = json.loads(line) if len(line) <= MAX_NOTICE else None
            except ValueError:
                notice = None
            if not isinstance(notice, dict):
                return notices, self._keep(conn, authed, b"", False)
            notices.append(notice)
        return notices, self._keep(conn, authed, buf, len(buf) <= MAX_NOTICE)

    def _keep(self, conn: object, authed: bool, buf: bytes, keep: bool) -> bool:
        if keep:
            self._conns[conn] = (authed, buf)
        else:
            self._conns.pop(conn, None)
        return keep

    def closed(self, conn: object) -> None:
        self._conns.pop(conn, None)


@dataclass
class _Slot:
    spec: TaskSpec
    ref: Any
    deadline: float | None = None
    stop_cause: str | None = None
    stop_status: str = "failed"
    started: bool = False
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class RayBackend:
    """Runs tasks as Ray tasks. See the module docstring."""

    report: Report
    runner: str
    address: str | None = None
    shared_home: bool | None = None  # None: the nodes on this machine share it, no other
    inventory: Inventory = field(init=False)
    _slots: dict[str, _Slot] = field(default_factory=dict)
    _remotes: dict[tuple[Resources, str | None, tuple[tuple[str, str], ...]], Any] = field(
        default_factory=dict
    )
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closing: bool = False
    _started_ray: bool = False
    _tally: Tally = field(default_factory=Tally)  # under _lock
    _workers: set[tuple[Any, Any]] = field(default_factory=set)  # (node, pid) seen; under _lock

    def __post_init__(self) -> None:
        ray, self._started_ray = connect(self.address)
        self._ray = ray
        self._execute = ray.remote(_execute)
        nodes = ray.nodes()
        self.inventory = _cluster_inventory(nodes)
        # Workers say when a task starts over a socket of ours: Ray tells its owner
        # only when a task ends. It listens on loopback when every node is on this
        # machine, and a connection is heard only after it sends the token.
        node_ip = ray.util.get_node_ip_address()
        others = {n["NodeManagerAddress"] for n in nodes if n.get("Alive")} - {node_ip}
        self._selector = selectors.DefaultSelector()
        self._listener = socket.create_server(("127.0.0.1" if not others else node_ip, 0))
        self._wake_r, self._wake_w = socket.socketpair()
        for sock, role in ((self._listener, "accept"), (self._wake_r, "wake")):
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, role)
        self._wake_w.setblocking(False)
        host, port = self._listener.getsockname()[:2]
        self._back = (host, port, secrets.token_hex(16), node_ip)
        self._inbox = Inbox(self._back[2])
        self._all_share = self.shared_home or (self.shared_home is None and not others)
        self._thread = threading.Thread(target=self._loop, name="kiln-ray", daemon=True)
        self._thread.start()

    # -- the interface ---------------------------------------------------------------

    def check_store(self, store_url: str) -> None:
        """Refuse a store that some node cannot write (before anything is recorded)."""
        if not self._all_share and store_url.startswith("sqlite"):
            self.close()
            raise ConfigError(
                "KILN_STORE",
                "the store is a SQLite file on this machine, which Ray nodes on other "
                "machines cannot write; use PostgreSQL (postgresql+psycopg://...) "
                "or KILN_RAY_SHARED_HOME=1 if every node sees this KILN_HOME",
            )

    def submit(self, tasks: Sequence[TaskSpec]) -> None:
        threads: dict[float, dict[str, str]] = {}  # by CPU request, from this environment
        refused = [s for s in tasks if s.sandbox is not None]  # never run unprotected
        if refused:
            cause = "SandboxError: sandboxed functions run on the local engine only"
            self.report([Finished(s.run_id, s.attempt, Outcome("failed", cause=cause))
                         for s in refused])  # fmt: skip
        for spec in tasks:
            if spec.sandbox is not None:
                continue
            if not spec.threads:
                cpu = spec.resources.cpu
                if cpu not in threads:
                    threads[cpu] = _threads.thread_env(cpu)
                spec = dataclasses.replace(spec, threads=threads[cpu])
            ref = self._remote(spec).remote(self.runner, spec, self._back, self.shared_home)
            slot = _Slot(spec, ref)  # its deadline is set when its function is called
            with self._lock:
                self._slots[spec.run_id] = slot
            # Ray resolves the future when the task ends: no polling between tasks.
            ref.future().add_done_callback(lambda f, slot=slot: self._done(slot, f))

    def cancel(self, run_id: str) -> None:
        with self._lock:
            slot = self._slots.get(run_id)
            if slot is None or slot.stop_cause:
                return
            slot.stop_cause, slot.stop_status = "cancelled", "cancelled"
        self._ray.cancel(slot.ref, force=True)

    def preempt(self, run_id: str, cause: str, grace_s: float) -> None:
        """Ray raises KeyboardInterrupt (of which kiln.Preempted is one) in the task; a
        task still running after ``grace_s`` is cancelled by force."""
        with self._lock:
            slot = self._slots.get(run_id)
            if slot is None or slot.stop_cause:
                return
            slot.stop_cause, slot.stop_status = cause, "preempted"
            if slot.started:
                slot.deadline = time.monotonic() + grace_s
        self._ray.cancel(slot.ref, force=False)

    def reserve(self, lease_id: str, resources: Resources, priority: int, granted: Grant) -> None:
        raise ConfigError(
            "KILN_BACKEND",
            "replica processes run on the local engine only: endpoints on Ray are served "
            "by Ray Serve (kiln serve --backend ray); run batch jobs with KILN_BACKEND=local",
        )

    def release(self, lease_id: str) -> None:
        """Nothing is reserved on this engine."""

    def figures(self) -> Figures:
        """Kiln's tasks waiting in Ray or running, resources and counters (see the
        module docstring); from any thread."""
        with self._lock:
            running = [s.spec.resources for s in self._slots.values() if s.started]
            queued = len(self._slots) - len(running)
            tally, inventory = self._tally, self.inventory
            return Figures(
                queued=queued,
                running=len(running),
                resources=inventory_pools(
                    inventory, sum(r.cpu for r in running),
                    sum(r.memory_bytes for r in running), sum(r.gpu for r in running),
                ),
                worker_starts=tally.worker_starts,
                finished=dict(tally.finished),
                failures=dict(tally.failures),
            )  # fmt: skip

    def close(self) -> None:
        self._closing = True
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
            for _ in slots:
                self._tally.ended("cancelled")
        try:
            for slot in slots:
                with contextlib.suppress(Exception):  # it may have ended meanwhile
                    self._ray.cancel(slot.ref, force=True)
            self._wake()
            self._thread.join(timeout=5)
            if slots:
                self.report([
                    Finished(s.spec.run_id, s.spec.attempt,
                             Outcome("cancelled", cause="the engine shut down"))
                    for s in slots
                ])  # fmt: skip
        finally:
            if self._started_ray:  # whatever happened above: no Ray left connected
                self._ray.shutdown()

    # -- endings ---------------------------------------------------------------------

    def _remote(self, spec: TaskSpec) -> Any:
        """The Ray task with the options of ``spec`` (made once per distinct options: Ray
        builds a class per call)."""
        r, requirements = spec.resources, spec.requirements
        key = (r, requirements, tuple(spec.threads.items()))
        remote = self._remotes.get(key)
        if remote is None:
            options: dict[str, Any] = {"num_cpus": r.cpu, "num_gpus": r.gpu, "max_retries": 0}
            if r.memory_bytes:
                options["memory"] = r.memory_bytes
            runtime_env: dict[str, Any] = {"env_vars": dict(spec.threads)}
            if os.environ.get("KILN_METRICS_PORT"):
                # The driver's own port (a Ray started here passes its environment on):
                # an engine of a run started inside the task must not serve on it too.
                runtime_env["env_vars"]["KILN_METRICS_PORT"] = ""
            if requirements:  # a kiln.Env
                runtime_env.update(uv_runtime_env(requirements))
            options["runtime_env"] = runtime_env
            remote = self._remotes[key] = self._execute.options(**options)
        return remote

    def _done(self, slot: _Slot, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            if self._slots.pop(slot.spec.run_id, None) is None:
                return  # already reported (the engine shut down)
        events, failure = self._finish(slot, future)
        with self._lock:
            for event in events:
                if isinstance(event, Started):
                    self._saw_worker(event.assigned)
                else:
                    self._tally.ended(event.outcome.status, failure)
        self.report(events)

    def _saw_worker(self, assigned: dict[str, Any]) -> None:
        """Count a Ray worker the first time one of our tasks runs on it (under _lock)."""
        worker = (assigned.get("node_id"), assigned.get("worker_pid"))
        if worker not in self._workers:
            self._workers.add(worker)
            self._tally.worker_starts += 1

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: already awake; closed: stopped
            self._wake_w.send(b"!")

    def _loop(self) -> None:
        """Take workers' start notices; enforce timeouts, sleeping until the next deadline;
        follow the cluster's nodes every INVENTORY_S while tasks wait."""
        next_look = time.monotonic() + INVENTORY_S
        while not self._closing:
            try:
                next_look = self._turn(next_look)
            except Exception:  # whatever happened, timeouts and cancels must go on
                _log.exception("kiln: the Ray engine's notice loop failed; it goes on")
                time.sleep(0.1)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        self._wake_w.close()

    def _turn(self, next_look: float) -> float:
        """One wait of the loop: read notices, enforce deadlines, look at the nodes."""
        with self._lock:
            deadlines = [s.deadline for s in self._slots.values() if s.deadline is not None]
            if self._slots:
                deadlines.append(next_look)
        wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        notices: list[dict[str, Any]] = []
        for key, _ in self._selector.select(wait):
            sock = cast(socket.socket, key.fileobj)
            if key.data == "accept":
                with contextlib.suppress(BlockingIOError, ConnectionError):
                    conn, _ = sock.accept()
                    conn.setblocking(False)
                    self._selector.register(conn, selectors.EVENT_READ, "worker")
                continue
            try:
                chunk = sock.recv(1 << 16)
            except (BlockingIOError, ConnectionError):
                chunk = b"" if key.data == "worker" else b"!"
            if key.data == "wake":
                continue
            read, keep = self._inbox.feed(sock, chunk) if chunk else ([], False)
            notices += read
            if chunk and not keep:
                _log.warning("kiln: closed a connection to the Ray notice socket that sent "
                             "something other than a worker's notices")  # fmt: skip
            if not keep:
                self._inbox.closed(sock)
                self._selector.unregister(sock)
                sock.close()
        if notices:
            self._notices(notices)
        self._enforce_deadlines()
        if time.monotonic() >= next_look:
            next_look = time.monotonic() + INVENTORY_S
            self._look_at_nodes()
        return next_look

    def _look_at_nodes(self) -> None:
        """Take the live nodes as the inventory; fail waiting tasks that no node left
        can hold (after a node was lost, Ray would keep them waiting for ever)."""
        try:
            self.inventory = _cluster_inventory(self._ray.nodes())
        except Exception as exc:  # the GCS may be briefly unreachable; look again later
            _log.warning("kiln: could not list the Ray cluster's nodes: %s", exc)
            return
        stuck: list[_Slot] = []
        with self._lock:
            for slot in self._slots.values():
                if slot.started or slot.stop_cause:
                    continue
                try:
                    self.inventory.check(slot.spec.resources)
                except ValidationError as exc:
                    slot.stop_cause = f"no node left in the Ray cluster can hold it: {exc}"
                    stuck.append(slot)
        for slot in stuck:
            self._ray.cancel(slot.ref, force=True)

    def _notices(self, notices: list[dict[str, Any]]) -> None:
        events: list[TaskEvent] = []
        with self._lock:
            for notice in notices:
                run = notice.pop("run", None)
                slot = self._slots.get(run) if isinstance(run, str) else None
                if slot is None or slot.spec.attempt != notice.pop("attempt", None):
                    continue
                if notice.pop("clock", False) and slot.spec.timeout_s and not slot.stop_cause:
                    slot.deadline = time.monotonic() + slot.spec.timeout_s  # the call began
                if slot.started:
                    continue
                slot.started = True  # (from a clock notice too, if the first was lost)
                assigned = {k: v for k, v in notice.items()  # what a worker sends, no more
                            if k in _ASSIGNED and isinstance(v, str | int)}  # fmt: skip
                self._saw_worker(assigned)
                assigned["ray_task_id"] = slot.ref.task_id().hex()
                events.append(Started(slot.spec.run_id, slot.spec.attempt, assigned))
        if events:
            self.report(events)

    def _finish(
        self, slot: _Slot, future: concurrent.futures.Future[Any]
    ) -> tuple[list[TaskEvent], FailureCause]:
        """The task's events, and why it failed if it did."""
        ray = self._ray
        events: list[TaskEvent] = []
        failure: FailureCause = "error"
        try:
            reply = future.result()
        except ray.exceptions.TaskCancelledError:
            stopped = slot.stop_status if slot.stop_status != "failed" else "failed"
            outcome = Outcome(stopped, cause=slot.stop_cause or "cancelled by Ray")  # type: ignore[arg-type]
            failure = _failure(outcome.cause or "", "")
        except ray.exceptions.RayError as exc:
            cause = slot.stop_cause or _cause(exc)
            timeout = slot.spec.timeout_s
            if (
                timeout is not None
                and slot.deadline is None  # the driver never heard the call begin
                and not slot.stop_cause
                and type(exc).__name__ == "WorkerCrashedError"
                and time.monotonic() - slot.submitted >= timeout + WATCHDOG_GRACE_S
            ):
                cause = f"timed out after {timeout:g}s (its worker's watchdog ended it)"
            status = slot.stop_status
            error = f"{cause}\n{exc}"
            outcome = Outcome(status, error=error, cause=cause)  # type: ignore[arg-type]
            failure = _failure(cause, type(exc).__name__)
        else:
            if not slot.started:  # its notice was lost or is late: it did start
                assigned = {**reply["assigned"], "ray_task_id": slot.ref.task_id().hex()}
                events.append(Started(slot.spec.run_id, slot.spec.attempt, assigned))
            preempted = slot.stop_status == "preempted" and reply["status"] != "succeeded"
            ended_by = slot.stop_cause if preempted else reply.get("cause")
            outcome = Outcome(
                "preempted" if preempted else reply["status"], result=reply.get("result"),
                error=reply.get("error"), cause=ended_by, usage=reply.get("usage", {}),
                environment=reply.get("environment"), blobs=reply.get("blobs", {}),
            )  # fmt: skip
        events.append(Finished(slot.spec.run_id, slot.spec.attempt, outcome))
        return events, failure

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [s for s in self._slots.values()
                   if s.deadline is not None and now >= s.deadline
                   and (not s.stop_cause or s.stop_status == "preempted")]  # fmt: skip
            for slot in due:
                slot.deadline = None
                if slot.stop_status == "preempted":  # its grace period is over
                    slot.stop_cause = f"{slot.stop_cause} (killed at the end of its grace period)"
                else:
                    slot.stop_cause = f"timed out after {slot.spec.timeout_s:g}s"
        for slot in due:
            self._ray.cancel(slot.ref, force=True)


def connect(address: str | None) -> tuple[Any, bool]:
    """The ``ray`` module, connected to the cluster at ``address`` (None: this machine's,
    or a new local one), and whether this call connected it."""
    from kiln._optional import require

    ray = require("ray", extra="ray")
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        wanted = (address or "auto").removeprefix("ray://")
        if wanted != "auto" and wanted.rpartition(":")[2] != current.rpartition(":")[2]:
            raise ConfigError(
                "KILN_RAY_ADDRESS",
                f"this process is already connected to Ray at {current}, not {address}",
            )
        return ray, False
    if address:
        _probe(address)
    where = address or "this machine"
    options = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **options)
        else:  # a cluster already running here (RAY_ADDRESS, `ray start`), else a new one
            try:
                ray.init(address="auto", **options)
            except ConnectionError:
                ray.init(**options)
            else:
                _log.warning(
                    "kiln: KILN_RAY_ADDRESS is unset, so tasks run on the Ray cluster already "
                    "running here, at %s (Ray %s, Python %s); set KILN_RAY_ADDRESS to choose",
                    ray.get_runtime_context().gcs_address, ray.__version__,
                    ".".join(map(str, sys.version_info[:3])),
                )  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if "version mismatch" in str(exc).lower():
            raise ConfigError(
                "KILN_RAY_ADDRESS",
                f"the Ray cluster at {where} runs another Ray or Python version than this "
                f"environment (Ray {ray.__version__}, Python {sys.version.split()[0]}): "
                f"{_cause(exc)}; use a cluster started from this environment",
            ) from None
        raise ConfigError("KILN_RAY_ADDRESS", f"cannot reach Ray at {where}: {exc}") from None
    return ray, True


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an address nothing listens on: Ray itself retries for minutes."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(
            "KILN_RAY_ADDRESS", f"cannot reach Ray at {address}: {exc.strerror or exc}"
        ) from None


def _failure(cause: str, error: str) -> FailureCause:
    """Why a task Ray ended failed, from our stop cause and Ray's error's type."""
    if cause.startswith("timed out"):
        return "timeout"
    if error in _WORKER_DIED or cause.startswith("no node left"):
        return "worker_died"
    return "error"


def _cause(exc: BaseException) -> str:
    name = type(exc).__name__
    if name in _WORKER_DIED:
        return f"Ray worker died: {name}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    text = str(exc).strip().splitlines()
    return f"{name}: {text[0] if text else ''}"


def uv_runtime_env(requirements: str) -> dict[str, Any]:
    """A kiln.Env as Ray's ``uv`` runtime_env: on each node Ray copies its Python
    environment once per lock and installs the lock over it with uv (exact pins, hashes
    checked, nothing else resolved), so the env is the same lock on every node."""
    lines = re.sub(r"\s*\\\n\s*", " ", requirements).splitlines()
    return {
        "uv": {
            "packages": [line for line in lines if line.strip()],
            "uv_pip_install_options": ["--no-deps", "--require-hashes"],
        }
    }


def _cluster_inventory(nodes: list[dict[str, Any]]) -> Inventory:
    """Totals over the live nodes, and each node: a task must fit on one of them."""

    def inventory(
        cpu: float, memory: float, gpus: int, nodes: tuple[Inventory, ...] = ()
    ) -> Inventory:
        devices = tuple(range(gpus))
        return Inventory(float(cpu), int(memory), devices, tuple(f"ray-{i}" for i in devices),
                         nodes)  # fmt: skip

    each = tuple(
        inventory(r.get("CPU", 0), r.get("memory", 0), int(r.get("GPU", 0)))
        for r in (n.get("Resources", {}) for n in nodes if n.get("Alive"))
    )
    return inventory(
        sum(n.cpu for n in each), sum(n.memory_bytes for n in each),
        sum(len(n.gpus) for n in each), nodes=each,
    )  # fmt: skip


_loaded: dict[str, Any] = {}


@contextlib.contextmanager
def _interrupt_preempts() -> Iterator[None]:
    """Ray stops a task it cancels without force (a preemption) by interrupting its
    main thread: the function gets kiln.Preempted there, as on the local engine."""
    from kiln.compute._worker import _preempted

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, _preempted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _execute(
    runner: str, task: TaskSpec, back: tuple[str, int, str, str], shared_home: bool | None
) -> dict[str, Any]:
    """Runs in a Ray worker: say it started, load the function (once per worker), run
    it as the local engine's workers do, return the reply.

    On a node that does not see the driver's KILN_HOME, blobs (artifacts, the
    environment's lock) are written to a scratch home of this worker and travel back
    with the reply; records go to the store directly, as everywhere.
    """
    from kiln.compute._worker import _Functions, _load_failure

    assigned = _loaded.get("assigned")
    if assigned is None:
        import ray

        node = ray.get_runtime_context().get_node_id()
        assigned = _loaded["assigned"] = {
            "node_id": node, "node_ip": ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
            "worker_pid": os.getpid(),
        }  # fmt: skip
    notice = {"run": task.run_id, "attempt": task.attempt, **assigned}
    _notify(back, notice)
    _threads.apply(task.threads)  # set for this worker by its runtime_env; torch's again
    shared = shared_home if shared_home is not None else assigned["node_ip"] == back[3]
    scratch: Path | None = None
    if not shared:
        scratch = _loaded.get("scratch")
        if scratch is None:
            scratch = _loaded["scratch"] = Path(tempfile.mkdtemp(prefix="kiln-ray-home-"))
        task = dataclasses.replace(task, store={**task.store, "home": str(scratch)})

    for path in reversed(task.sys_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    if "functions" not in _loaded:  # once per worker: the loaded functions, the runner
        module, _, name = runner.partition(":")
        _loaded["functions"] = _Functions()
        _loaded["runner"] = getattr(importlib.import_module(module), name)
    try:
        fn = _loaded["functions"].get(task.fn_key, task.fn_payload)
    except BaseException as exc:
        return _load_failure(task, exc)
    watchdog: list[threading.Timer] = []
    on_start = None
    if task.timeout_s is not None:  # the timeout counts from the call: tell the driver
        timeout_s = task.timeout_s

        def on_start() -> None:
            _notify(back, {**notice, "clock": True})
            # And hold it here too, should the driver never hear of it.
            timer = threading.Timer(timeout_s + WATCHDOG_GRACE_S, os.kill,
                                    (os.getpid(), signal.SIGKILL))  # fmt: skip
            timer.daemon = True
            timer.start()
            watchdog.append(timer)

    try:
        with _interrupt_preempts():
            reply: dict[str, Any] = _loaded["runner"](task, fn, on_start)
    finally:
        for timer in watchdog:
            timer.cancel()
    reply["assigned"] = assigned
    # The runner sends the environment when it changes; this worker's every reply has it.
    reply["environment"] = _loaded["environment"] = reply.get("environment") or _loaded.get(
        "environment"
    )
    if scratch is not None and not task.store.get("server_url"):  # a server has them already
        reply["blobs"] = _take_blobs(scratch / "blobs")
    return reply


def _take_blobs(root: Path) -> dict[str, bytes]:
    """Every blob under ``root`` (sha256 -> bytes), removed from it."""
    out = {}
    for path in root.glob("??/*"):
        if path.is_file() and not path.name.startswith("."):
            out[path.parent.name + path.name] = path.read_bytes()
            path.unlink()
    return out


def _notify(back: tuple[str, int, str, str], notice: dict[str, Any]) -> None:
    """Send a notice to the driver. A lost start notice only delays Started to the end;
    a lost clock notice leaves the task without its timeout, so a send that fails on a
    connection kept from an earlier task is tried once more on a new one."""
    line = json.dumps(notice).encode() + b"\n"
    for _ in range(2):
        cached = _loaded.get("back")
        if cached is not None and cached[0] != back:
            cached[1].close()  # a driver that has gone: one connection per worker at a time
            cached = None
        fresh = cached is None
        try:
            if cached is None:
                cached = _loaded["back"] = (back, socket.create_connection(back[:2], timeout=2))
                cached[1].sendall(back[2].encode() + b"\n")  # the token, before any notice
            cached[1].sendall(line)
            return
        except OSError:
            with contextlib.suppress(KeyError, OSError):
                _loaded.pop("back")[1].close()
            if fresh:
                return  # the driver cannot be reached: no point in trying again
