"""The backend interface: run tasks somewhere and say when they start and end.

A backend writes nothing to the record itself. It reports :class:`Started` and
:class:`Finished` events, in batches, to the callback it was built with; the
engine above it turns them into the run record, retries and futures. So the
local process pool, Ray and Kubernetes only have to execute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from kiln.compute.resources import Inventory, Resources

if TYPE_CHECKING:
    from kiln.compute.scheduler import Allocation


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One attempt of one run, ready to execute anywhere."""

    run_id: str
    app: str
    fn_key: str  # identifies the function, so a worker loads it once
    fn_payload: bytes  # cloudpickle of ("ref", module, qualname) or of the function
    args_payload: bytes  # cloudpickle of (args, kwargs)
    resources: Resources = field(default_factory=Resources)
    priority: int = 0
    timeout_s: float | None = None  # counted from the call of the function, not from submit
    attempt: int = 1
    store: dict[str, str] = field(default_factory=dict)  # home, store_url, actor
    sys_path: tuple[str, ...] = ()  # the caller's code folders (not its site-packages)
    cwd: str = ""
    python: str | None = None  # the env's interpreter; None: the caller's
    env_lock: str | None = None  # held shared by workers of that env, so it is not pruned
    # An env for engines that build it themselves on each node (Ray): the lock's pins
    # and hashes as requirements lines, and the index, if it names one.
    requirements: str | None = None
    # The thread variables (OMP_NUM_THREADS, ...) to run with; empty: the backend sets
    # them from the CPU request and the driver's environment (see compute/_threads.py).
    threads: dict[str, str] = field(default_factory=dict)
    # A sandbox (kiln.Sandbox's plain form): the worker never loads the function; a
    # confined child does (see kiln._sandboxed). None: the function runs in the worker.
    sandbox: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended. ``result`` is cloudpickled; ``error`` is a traceback."""

    status: Literal["succeeded", "failed", "cancelled", "preempted"]
    result: bytes | None = None
    error: str | None = None
    cause: str | None = (
        None  # one line: "ValueError: …", "timed out after 5s", "worker died: signal 9"
    )
    usage: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] | None = None
    # Blobs (sha256 -> bytes) written where the driver cannot read them (a Ray node
    # without the shared KILN_HOME); the engine stores them before recording the end.
    blobs: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Started:
    run_id: str
    attempt: int
    assigned: dict[str, Any]  # e.g. gpus, cuda_visible_devices, worker_pid


@dataclass(frozen=True, slots=True)
class Finished:
    run_id: str
    attempt: int
    outcome: Outcome


TaskEvent = Started | Finished
Report = Callable[[list[TaskEvent]], None]
# Called with what the scheduler granted a reservation (see Backend.reserve).
Grant = Callable[["Allocation"], None]


class Backend(Protocol):
    """Executes tasks; reports their events to the callback given at construction."""

    inventory: Inventory

    def submit(self, tasks: Sequence[TaskSpec]) -> None:
        """Queue tasks; each is eventually reported Finished exactly once per attempt."""

    def cancel(self, run_id: str) -> None:
        """Stop a queued or running task; it is reported Finished as cancelled."""

    def preempt(self, run_id: str, cause: str, grace_s: float) -> None:
        """Stop a task to give its resources back: its function gets ``kiln.Preempted``
        (SIGTERM; on Ray a KeyboardInterrupt) and ``grace_s`` seconds to save a
        checkpoint before it is killed. Reported Finished as preempted with ``cause``,
        unless it succeeded meanwhile."""

    def reserve(self, lease_id: str, resources: Resources, priority: int, granted: Grant) -> None:
        """Queue a long-lived holder of resources (a serving replica) with the tasks;
        ``granted`` gets its allocation once admitted. It holds it until :meth:`release`."""

    def release(self, lease_id: str) -> None:
        """Give back a reservation's resources, or withdraw it while still queued."""

    def close(self) -> None:
        """Stop everything still running and release workers."""
