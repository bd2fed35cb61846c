"""The engine's figures in Prometheus' format, from a real local engine running real
tasks in worker processes, read with prometheus_client's own parser.

The workers import this module (by name, from this folder) for :func:`run`, the
runner of a task, and for the tasks' functions: no record is written.
"""

from __future__ import annotations

import importlib
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kiln.compute.backends.base import Finished, TaskEvent, TaskSpec
from kiln.compute.backends.local import LocalBackend
from kiln.compute.figures import gpu_type, scheduler_pools
from kiln.compute.metrics import engine_registry, serve
from kiln.compute.resources import Inventory, Resources
from kiln.compute.scheduler import Release, Scheduler, Submit, Task
from kiln.config import Settings
from kiln.errors import ConfigError, MissingDependencyError

HERE = Path(__file__).parent
GiB = 2**30
DEADLINE_S = 120.0  # generous: a loaded 2-core machine; nothing below is timed
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- in the workers -------------------------------------------------------------------


def run(task: TaskSpec, fn: Callable[..., Any], on_start: Callable[[], None] | None) -> dict:
    """The runner: call ``fn``, say how it ended (as kiln's own runner does)."""
    args = cloudpickle.loads(task.args_payload)
    if on_start is not None:
        on_start()
    try:
        result = fn(*args)
    except Exception as exc:
        return {"run_id": task.run_id, "status": "failed", "cause": f"{type(exc).__name__}"}
    return {"run_id": task.run_id, "status": "succeeded", "result": cloudpickle.dumps(result)}


def wait_for(gate: str) -> str:
    """Hold the task until the test creates ``gate`` (or a minute or two passes)."""
    deadline = time.monotonic() + DEADLINE_S
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return "opened"


def noop() -> int:
    return 0


def fail() -> None:
    raise ValueError("boom")


def die() -> None:
    os._exit(3)


# -- in the test ----------------------------------------------------------------------


class Engine:
    """A LocalBackend on a made-up machine, its events and its registry."""

    def __init__(self, inventory: Inventory) -> None:
        self.events: queue.SimpleQueue[TaskEvent] = queue.SimpleQueue()
        self.backend = LocalBackend(inventory, self._report, f"{__name__}:run")
        self.registry = engine_registry(self.backend.figures)
        self.finished: dict[str, Finished] = {}
        self._n = 0

    def _report(self, events: list[TaskEvent]) -> None:
        for event in events:
            self.events.put(event)

    def submit(self, fn: str, *args: Any, cpu: float = 1, memory: int = 0, gpu: float = 0,
               timeout_s: float | None = None) -> str:  # fmt: skip
        self._n += 1
        run_id = f"{self._n:032x}"
        spec = TaskSpec(
            run_id=run_id, app="metrics", fn_key=fn,
            fn_payload=cloudpickle.dumps(("ref", __name__, fn)),
            args_payload=cloudpickle.dumps(args),
            resources=Resources(cpu=cpu, memory_bytes=memory, gpu=gpu),
            timeout_s=timeout_s, sys_path=(str(HERE),),
        )  # fmt: skip
        self.backend.submit([spec])
        return run_id

    def wait_finished(self, n: int) -> dict[str, Finished]:
        """Until ``n`` tasks in all have been reported Finished."""
        deadline = time.monotonic() + DEADLINE_S
        while len(self.finished) < n:
            event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            if isinstance(event, Finished):
                self.finished[event.run_id] = event
        return self.finished

    def scrape(self) -> Samples:
        return parse(generate_latest(self.registry).decode())

    def scrape_until(self, ready: Callable[[Samples], bool]) -> Samples:
        """Scrape until ``ready`` says so: polled, with a deadline, never timed."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            samples = self.scrape()
            if ready(samples):
                return samples
            assert time.monotonic() < deadline, f"never ready: {samples}"
            time.sleep(0.02)


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and labels, read by the standard's parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def resource(samples: Samples, name: str, state: str, gpu_type: str = "") -> float:
    return value(samples, "kiln_engine_resources", resource=name, gpu_type=gpu_type, state=state)


@pytest.fixture
def engine() -> Iterator[Engine]:
    machine = Inventory(cpu=2, memory_bytes=8 * GiB, gpus=(0, 1),
                        gpu_names=("virtual-0", "virtual-1"))  # fmt: skip
    made = Engine(machine)
    yield made
    made.backend.close()


def test_queue_running_resources_and_worker_starts_of_a_real_engine(
    engine: Engine, tmp_path: Path
) -> None:
    gate = str(tmp_path / "gate")
    for _ in range(5):  # two fit (2 CPUs), three wait
        engine.submit("wait_for", gate, cpu=1, memory=GiB, gpu=0.5)
    busy = engine.scrape_until(lambda s: value(s, "kiln_engine_running_tasks") == 2)
    assert value(busy, "kiln_engine_queue_depth") == 3
    assert value(busy, "kiln_engine_worker_starts_total") == 2
    assert resource(busy, "cpu", "capacity") == 2
    assert resource(busy, "cpu", "admitted") == 2 and resource(busy, "cpu", "free") == 0
    assert resource(busy, "memory_bytes", "admitted") == 2 * GiB
    assert resource(busy, "memory_bytes", "free") == 6 * GiB
    # Two halves, packed best-fit onto one device of the two (both are "virtual").
    assert resource(busy, "gpu", "capacity", "virtual") == 2
    assert resource(busy, "gpu", "admitted", "virtual") == pytest.approx(1.0)
    assert resource(busy, "gpu", "free", "virtual") == pytest.approx(1.0)
    for name, kind in (("cpu", ""), ("memory_bytes", ""), ("gpu", "virtual")):
        assert resource(busy, name, "admitted", kind) + resource(
            busy, name, "free", kind
        ) == pytest.approx(resource(busy, name, "capacity", kind))
    assert value(busy, "kiln_engine_tasks_finished_total", status="succeeded") == 0

    Path(gate).touch()
    engine.wait_finished(5)
    done = engine.scrape_until(
        lambda s: value(s, "kiln_engine_tasks_finished_total", status="succeeded") == 5
    )
    assert value(done, "kiln_engine_queue_depth") == 0
    assert value(done, "kiln_engine_running_tasks") == 0
    assert resource(done, "cpu", "admitted") == 0 and resource(done, "cpu", "free") == 2
    assert resource(done, "gpu", "admitted", "virtual") == 0
    assert value(done, "kiln_engine_worker_starts_total") >= 2
    assert (
        sum(
            value(done, "kiln_engine_task_failures_total", cause=c)
            for c in ("error", "timeout", "worker_died", "cancelled")
        )
        == 0
    )


def test_failures_are_counted_by_cause(engine: Engine, tmp_path: Path) -> None:
    gate = str(tmp_path / "never")
    engine.submit("fail")
    engine.submit("die")
    engine.submit("wait_for", gate, timeout_s=0.5)  # killed once its time is up
    engine.wait_finished(3)
    cancelled = engine.submit("wait_for", gate)
    engine.backend.cancel(cancelled)
    ended = engine.wait_finished(4)
    assert ended[cancelled].outcome.status == "cancelled"

    samples = engine.scrape()
    for cause in ("error", "timeout", "worker_died", "cancelled"):
        assert value(samples, "kiln_engine_task_failures_total", cause=cause) == 1, cause
    assert value(samples, "kiln_engine_tasks_finished_total", status="failed") == 3
    assert value(samples, "kiln_engine_tasks_finished_total", status="cancelled") == 1
    assert value(samples, "kiln_engine_tasks_finished_total", status="succeeded") == 0
    # A dead or killed worker is replaced: at least one more than the two slots.
    assert value(samples, "kiln_engine_worker_starts_total") >= 3


def test_scrapes_from_other_threads_while_tasks_run_see_consistent_figures(
    engine: Engine,
) -> None:
    seen: list[Samples] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def scraper() -> None:
        try:
            while not stop.is_set():
                seen.append(engine.scrape())
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=scraper) for _ in range(2)]
    for thread in threads:
        thread.start()
    for _ in range(100):
        engine.submit("noop", cpu=0.5)
    engine.wait_finished(100)
    engine.scrape_until(
        lambda s: value(s, "kiln_engine_tasks_finished_total", status="succeeded") == 100
    )
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors and seen
    for samples in seen:
        assert resource(samples, "cpu", "admitted") + resource(samples, "cpu", "free") == 2
        assert 0 <= value(samples, "kiln_engine_running_tasks") <= 4  # 4 halves of 2 CPUs
        assert (
            value(samples, "kiln_engine_queue_depth")
            + value(samples, "kiln_engine_running_tasks")
            + value(samples, "kiln_engine_tasks_finished_total", status="succeeded")
            <= 100
        )


def test_a_stopped_engine_still_answers_with_its_last_figures(engine: Engine) -> None:
    engine.submit("noop")
    engine.wait_finished(1)
    engine.backend.close()
    samples = engine.scrape()
    assert value(samples, "kiln_engine_tasks_finished_total", status="succeeded") == 1
    assert value(samples, "kiln_engine_queue_depth") == 0


def test_each_engine_has_a_registry_of_its_own(engine: Engine) -> None:
    from prometheus_client import REGISTRY

    other = Engine(Inventory(cpu=1, memory_bytes=GiB))
    try:
        assert resource(other.scrape(), "cpu", "capacity") == 1
        assert resource(engine.scrape(), "cpu", "capacity") == 2
        assert b"kiln_engine" not in generate_latest(REGISTRY)
    finally:
        other.backend.close()


def test_gpu_shares_per_type_as_the_scheduler_counts_them() -> None:
    machine = Inventory(cpu=8, memory_bytes=GiB, gpus=(0, 1, 2),
                        gpu_names=("NVIDIA A100", "NVIDIA A100", "Tesla T4"))  # fmt: skip
    scheduler = Scheduler(machine)
    for i, share in enumerate((0.25, 0.5, 1.0)):
        scheduler.handle(Submit(Task(f"t{i}", Resources(cpu=1, gpu=share))))
    pools = {(p.resource, p.gpu_type): p for p in scheduler_pools(scheduler)}
    a100, t4 = pools[("gpu", "NVIDIA A100")], pools[("gpu", "Tesla T4")]
    assert (a100.capacity, a100.admitted, t4.capacity) == (2, 1.75, 1)
    assert a100.free == pytest.approx(0.25) and t4.admitted == 0
    assert (pools[("cpu", "")].admitted, pools[("cpu", "")].free) == (3, 5)
    scheduler.handle(Release("t2"))
    assert {p.gpu_type: p.admitted for p in scheduler_pools(scheduler)}["NVIDIA A100"] == 0.75
    # No GPU: one series of none, so a query over GPUs still finds the engine.
    bare = {(p.resource, p.gpu_type): p for p in scheduler_pools(Scheduler(Inventory(2, GiB)))}
    assert bare[("gpu", "")].capacity == 0
    assert (gpu_type("virtual-12"), gpu_type("ray-0"), gpu_type("H100")) == (
        "virtual", "ray", "H100"
    )  # fmt: skip


@pytest.mark.parametrize("port", ["0", "65536", "http", "-1", "9464x", "\uff11\uff12"])
def test_a_bad_metrics_port_names_the_variable(port: str) -> None:
    with pytest.raises(ConfigError, match="KILN_METRICS_PORT") as info:
        Settings.from_env({"KILN_METRICS_PORT": port})
    assert info.value.setting == "KILN_METRICS_PORT"


def test_metrics_settings() -> None:
    assert Settings.from_env({}).metrics_port is None
    settings = Settings.from_env({"KILN_METRICS_PORT": "9464"})
    assert (settings.metrics_port, settings.metrics_host) == (9464, "127.0.0.1")
    assert Settings.from_env({"KILN_METRICS_HOST": "0.0.0.0"}).metrics_host == "0.0.0.0"  # noqa: S104
    with pytest.raises(ConfigError, match="KILN_METRICS_HOST"):
        Settings.from_env({"KILN_METRICS_HOST": "http://host:1/"})


def test_a_port_in_use_names_the_variable_and_the_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"KILN_METRICS_PORT: port {port} .* in use"):
            serve(CollectorRegistry(), "127.0.0.1", port)


def test_without_prometheus_client_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "kiln.compute.metrics")
    with pytest.raises(MissingDependencyError, match=r"pip install 'kiln\[server\]'"):
        importlib.import_module("kiln.compute.metrics")
