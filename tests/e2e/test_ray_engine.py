"""The Ray engine against a real Ray cluster: a head and a worker node, one CPU each."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from ray_funcs import (
    app,
    boom,
    four_seconds,
    saves,
    saves_seeded,
    seeded,
    six_version,
    sleepy,
    torch_threads,
    where,
)

import kiln
from conftest import ServerProcess, ray_start
from kiln.compute._threads import THREAD_VARS
from kiln.config import Settings
from kiln.errors import ConfigError, ValidationError


def test_runs_are_ray_tasks_recorded_like_local_ones(on_ray: str) -> None:
    run = where.spawn(1)
    assert run.result()["x"] == 1
    record = run.record()
    assert record.status is kiln.RunStatus.SUCCEEDED and record.engine == "ray"
    assert [p.value for p in record.metric_history("x")] == [1.0]
    sweep = where.sweep(kiln.grid(x=[1, 2, 3, 4]))
    results = [r.result() for r in sweep.runs]
    assert sorted(r["x"] for r in results) == [1, 2, 3, 4]
    assert len({r["node"] for r in results}) == 2  # one CPU per node: both nodes worked
    assert len(kiln.runs(parent=sweep.id, status="succeeded")) == 4


def test_failures_timeouts_and_impossible_requests(on_ray: str) -> None:
    with pytest.raises(kiln.RunFailed) as info:
        boom.remote()
    assert "ValueError: bad input on the cluster" in info.value.traceback
    with pytest.raises(kiln.RunFailed, match="timed out after 1s"):
        sleepy.remote(30)
    wants_gpu = app.function(cpu=1, gpu=0.5)(lambda: None)  # declared for the cluster
    with pytest.raises(ValidationError, match=r"gpu: 0\.5 GPUs requested, the largest node has 0"):
        wants_gpu.remote()
    # Two CPUs in the cluster, but a task runs on one node: Ray would wait for ever.
    wants_both = app.function(cpu=2)(lambda: None)
    with pytest.raises(ValidationError, match=r"cpu: 2 cores requested, the largest node has 1"):
        wants_both.remote()


def test_hostile_input_on_the_notice_socket_does_not_stop_timeouts(on_ray: str) -> None:
    import socket

    from kiln._engine import engine_for

    assert where.spawn(1).result()["x"] == 1  # the engine is up
    backend = engine_for(Settings.from_env()).backend
    host, port, token = backend._back[:3]  # type: ignore[attr-defined]
    assert host == "127.0.0.1"  # every node is on this machine: loopback only
    attacks = [
        b"not json at all\n",
        b'{"run": "x", "attempt": 1, "clock": true}\n',  # no token first
        b"A" * 300_000,  # no line end, ever
        b"wrong-token\n" + b'{"run": 1}\n',
        token.encode() + b"\n" + b"[1, 2]\n",  # authenticated, then not a notice
        token.encode() + b"\n" + b'{"run": 5, "attempt": "x"}\n' + b"\xff" * 70_000 + b"\n",
    ]
    for attack in attacks:
        with (
            socket.create_connection((host, port), timeout=5) as conn,
            contextlib.suppress(OSError),
        ):
            conn.sendall(attack)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # until the driver closes it
    with pytest.raises(kiln.RunFailed, match="timed out after 1s"):
        sleepy.remote(30)
    assert where.spawn(2).result()["x"] == 2


def test_cpu_bounds_the_threads_on_ray_as_locally(
    on_ray: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = torch_threads.spawn()
    count, variables = run.result(timeout=120)
    assert count == 1 and {variables[name] for name in THREAD_VARS} == {"1"}
    assert run.record().environment.threads == dict.fromkeys(THREAD_VARS, "1")
    # The driver's own setting reaches the Ray worker, and is the count for the others.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    count, variables = torch_threads.remote()
    assert count == 2 and variables["OMP_NUM_THREADS"] == variables["OPENBLAS_NUM_THREADS"] == "2"


def test_an_unreachable_cluster_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_BACKEND", "ray")
    monkeypatch.setenv("KILN_RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"KILN_RAY_ADDRESS: cannot reach Ray at 127\.0\.0\.1:1"):
        where.remote(1)


def test_a_lost_node_fails_its_runs_with_the_cause_and_they_are_retried(on_ray: str) -> None:
    before = _raylets()
    ray_start("--address", on_ray, cpus=2)  # a third node, to lose: the only one with 2 CPUs
    (doomed,) = _raylets() - before
    try:
        sweep = four_seconds.sweep(kiln.grid(i=range(6)))  # retries=1
        deadline = time.time() + 60
        while sum(r.status is kiln.RunStatus.RUNNING for r in sweep.runs) < 4:
            assert time.time() < deadline, "four runs never started on three nodes"
            time.sleep(0.05)
        # Only the doomed node could ever hold this one; it waits there, behind the sweep.
        wide = app.function(cpu=2)(four_seconds.fn).spawn(99)
        _kill_tree(doomed)
        assert sorted(r.result(timeout=120) for r in sweep.runs) == list(range(6))
        with pytest.raises(kiln.RunFailed, match="no node left in the Ray cluster can hold it"):
            wide.result(timeout=60)  # not a hang
    finally:
        _kill_tree(doomed)
    attempts = [r.record().resources["attempts"] for r in sweep.runs]
    lost = [a for a in attempts if len(a) == 2]
    assert lost, "no run was running on the lost node"
    for first, second in lost:
        assert first["status"] == "failed" and "NodeDiedError" in first["cause"]
        assert second["status"] == "succeeded"


def _raylets() -> set[int]:
    found = subprocess.run(["pgrep", "-x", "raylet"], capture_output=True, text=True)
    return {int(pid) for pid in found.stdout.split()}


def _kill_tree(pid: int) -> None:
    """SIGKILL a node's raylet and its children (workers, agents): the node is lost."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    for victim in (pid, *map(int, found.stdout.split())):
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def test_an_env_runs_under_a_runtime_env_built_from_the_same_lock(
    on_ray: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_ray_result = six_version.remote()  # six is not installed here: only in the env
    assert on_ray_result["six"] == "1.16.0"
    assert "runtime_resources" in on_ray_result["prefix"]  # Ray's env, built on the node
    monkeypatch.setenv("KILN_BACKEND", "local")
    local_result = six_version.remote()
    assert local_result["six"] == "1.16.0" and local_result["prefix"] != on_ray_result["prefix"]
    ray_run, local_run = kiln.runs(app="on-ray", limit=2)[::-1]
    assert (ray_run.engine, local_run.engine) == ("ray", "local")
    for key in ("env_id", "lock_sha256"):  # one lock, one identity, on both engines
        assert ray_run.environment.env_id and getattr(ray_run.environment, key) == getattr(
            local_run.environment, key
        )


@pytest.mark.postgres
def test_nodes_without_the_shared_home_send_artifacts_back_with_results(
    on_ray: str, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_RAY_SHARED_HOME", "0")  # as if every node were another machine
    with pytest.raises(ConfigError, match="KILN_STORE: the store is a SQLite file"):
        saves.remote(b"x", "")  # records would go to a file the nodes cannot reach
    monkeypatch.setenv("KILN_STORE", pg_url)
    data = secrets.token_bytes(4096)
    driver_blobs = Settings.from_env().blob_dir
    run = saves.spawn(data, str(driver_blobs))
    assert run.result() is False  # written on the node, not in this KILN_HOME
    record = run.record()
    assert record.load("weights.bin") == data  # it came back with the result
    assert record.summary["size"] == 4096.0 and record.engine == "ray"
    assert record.environment.python  # the environment's capture came back too


def test_a_sweep_on_ray_records_through_a_server_without_a_shared_home(
    on_ray: str, start_server: Callable[..., ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With KILN_SERVER, a node without the driver's disk uploads its artifacts itself."""
    monkeypatch.setenv("KILN_RAY_SHARED_HOME", "0")
    server = start_server()
    monkeypatch.setenv("KILN_SERVER", server.url)
    driver_blobs = Settings.from_env().blob_dir
    sweep = saves_seeded.sweep(kiln.grid(seed=[1, 2, 3], driver_blobs=[str(driver_blobs)]))
    assert len(sweep.runs) == 3
    for run in sweep.runs:
        run.wait()  # a sweep's runs go on in the background
        record = run.record()
        assert record.status == "succeeded" and record.engine == "ray"
        assert record.result == {"in_driver_home": False}
        data = seeded(record.params["seed"])
        assert record.load("weights.bin") == data
        sha = record.artifact("weights.bin").sha256
        assert (server.home / "blobs" / sha[:2] / sha[2:]).read_bytes() == data
    assert not driver_blobs.exists() or not any(driver_blobs.rglob("*"))
    verified = subprocess.run([sys.executable, "-m", "kiln", "audit", "verify"],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
