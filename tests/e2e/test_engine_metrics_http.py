"""Engine figures over HTTP: a driver with KILN_METRICS_PORT serves its engine's, and
``kiln server``'s ``/metrics`` counts the record's queued and running runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiln.record.model import RunStatus
from kiln.record.store.base import WriteBatch
from kiln.record.store.rows import RunRow
from kiln.record.store.sql import SqlStore

DEADLINE_S = 120.0  # generous: a loaded 2-core machine; nothing below is timed
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

DRIVER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    import kiln

    app = kiln.App("metrics")
    CPUS = len(os.sched_getaffinity(0))


    def wait_for(path: str) -> None:
        deadline = time.monotonic() + 120
        while not Path(path).exists() and time.monotonic() < deadline:
            time.sleep(0.01)


    @app.function(cpu=CPUS)  # the whole machine: one runs, the others wait
    def hold(gate: str) -> str:
        wait_for(gate)
        return "done"


    @app.function(cpu=1)
    def boom() -> None:
        raise ValueError("boom")


    @app.function(cpu=1)
    def inner() -> str:
        return "inner"


    @app.function(cpu=1)
    def outer() -> str:  # its worker's own engine runs inner: it serves no metrics
        return inner.remote()


    if __name__ == "__main__":
        gate, leave = sys.argv[1], sys.argv[2]
        runs = [hold.spawn(gate) for _ in range(3)]
        assert [run.result() for run in runs] == ["done"] * 3
        assert outer.remote() == "inner"
        try:
            boom.remote()
        except kiln.RunFailed:
            pass
        Path(leave + ".ready").touch()  # the test scrapes the final counts, then lets go
        wait_for(leave)
    """
)


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape_until(
    url: str, ready: Callable[[Samples], bool], proc: subprocess.Popen[str]
) -> Samples:
    """Scrape ``url`` until ``ready``: polled with a deadline (the driver may not listen yet)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        assert proc.poll() is None, f"the driver exited: {proc.communicate()}"
        try:
            answer = httpx.get(url, timeout=10)
        except httpx.TransportError:
            samples: Samples = {}
        else:
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/plain")
            samples = parse(answer.text)
        if samples and ready(samples):
            return samples
        assert time.monotonic() < deadline, f"never ready: {samples}"
        time.sleep(0.05)


def wait_path(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not path.exists():
        assert proc.poll() is None, f"the driver exited: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_driver_with_kiln_metrics_port_serves_its_engine_figures(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    gate, leave = tmp_path / "gate", tmp_path / "leave"
    port = free_port()
    cpus = len(os.sched_getaffinity(0))
    env = {**os.environ, "KILN_METRICS_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(gate), str(leave)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        busy = scrape_until(url, lambda s: (  # the driver spawns them one by one
            value(s, "kiln_engine_running_tasks"), value(s, "kiln_engine_queue_depth")
        ) == (1, 2), proc)  # fmt: skip
        assert value(busy, "kiln_engine_worker_starts_total") == 1
        cpu = {
            state: value(busy, "kiln_engine_resources", resource="cpu", gpu_type="", state=state)
            for state in ("capacity", "admitted", "free")
        }
        assert cpu == {"capacity": cpus, "admitted": cpus, "free": 0}

        gate.touch()
        wait_path(Path(f"{leave}.ready"), proc)
        done = scrape_until(url, lambda s: True, proc)
        # The holds and outer: inner ran on the engine of outer's worker.
        assert value(done, "kiln_engine_tasks_finished_total", status="succeeded") == 4
        assert value(done, "kiln_engine_tasks_finished_total", status="failed") == 1
        assert value(done, "kiln_engine_task_failures_total", cause="error") == 1
        assert value(done, "kiln_engine_queue_depth") == 0
        assert value(done, "kiln_engine_running_tasks") == 0
    finally:
        gate.touch()
        leave.touch()
        try:
            _, err = proc.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err


def test_a_taken_metrics_port_fails_the_driver_naming_the_variable_and_port(
    tmp_path: Path,
) -> None:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = {**os.environ, "KILN_METRICS_PORT": str(port)}
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "gate"), str(tmp_path / "leave")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=DEADLINE_S,
        )  # fmt: skip
    assert done.returncode != 0
    assert f"KILN_METRICS_PORT: port {port} on 127.0.0.1 is already in use" in done.stderr


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_kiln_server_metrics_count_queued_and_running_runs_by_project(
    store: str, tmp_path: Path, start_server: Callable[..., Any], request: pytest.FixtureRequest
) -> None:
    home = tmp_path / "server-home"
    url = (
        request.getfixturevalue("pg_url")
        if store == "postgres"
        else f"sqlite:///{home / 'kiln.db'}"
    )
    home.mkdir()
    server = start_server(url, home)
    rows = {
        "default": [RunStatus.QUEUED, RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.SUCCEEDED],
        "blue": [RunStatus.RUNNING, RunStatus.FAILED],
        "green": [RunStatus.SUCCEEDED],  # nothing live: no series
    }
    n = 0
    with SqlStore(url) as db:
        for project, statuses in rows.items():
            batch = WriteBatch()
            for status in statuses:
                n += 1
                batch.new_runs.append(
                    RunRow(id=f"{n:032x}", app=f"app{n}", status=status, created_at=float(n))
                )
            db.in_project(project).write(batch)

    assert httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200
    answer = httpx.get(f"{server.url}/metrics", timeout=30)
    assert answer.status_code == 200
    samples = parse(answer.text)
    runs = {labels: v for (name, labels), v in samples.items() if name == "kiln_runs"}
    assert runs == {
        (("project", "default"), ("status", "queued")): 2,
        (("project", "default"), ("status", "running")): 1,
        (("project", "blue"), ("status", "queued")): 0,
        (("project", "blue"), ("status", "running")): 1,
        (("project", "default"), ("status", "preempted")): 0,
        (("project", "blue"), ("status", "preempted")): 0,
    }
    healthz = (("code", "200"), ("method", "GET"), ("route", "/healthz"))
    assert samples[("kiln_server_requests_total", healthz)] == 1  # the server's own, still


def test_the_ray_engine_says_the_same_figures(on_ray: str) -> None:
    """Kiln's view of a Ray cluster (a head and a worker node, one CPU each)."""
    from prometheus_client import generate_latest
    from ray_funcs import boom, sleepy, where

    import kiln
    from kiln._engine import engine_for
    from kiln.compute.metrics import engine_registry
    from kiln.config import Settings

    assert where.remote(1)["x"] == 1
    with pytest.raises(kiln.RunFailed):
        boom.remote()
    with pytest.raises(kiln.RunFailed, match="timed out"):
        sleepy.remote(30)
    registry = engine_registry(engine_for(Settings.from_env()).backend.figures)
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "kiln_engine_tasks_finished_total", status="succeeded") == 1
    assert value(samples, "kiln_engine_tasks_finished_total", status="failed") == 2
    assert value(samples, "kiln_engine_task_failures_total", cause="error") == 1
    assert value(samples, "kiln_engine_task_failures_total", cause="timeout") == 1
    assert value(samples, "kiln_engine_worker_starts_total") >= 1
    assert value(samples, "kiln_engine_queue_depth") == 0
    assert value(samples, "kiln_engine_running_tasks") == 0
    cpu = {
        state: value(samples, "kiln_engine_resources", resource="cpu", gpu_type="", state=state)
        for state in ("capacity", "admitted", "free")
    }
    assert cpu == {"capacity": 2, "admitted": 0, "free": 2}
