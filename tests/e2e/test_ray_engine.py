"""The Ray engine against a real Ray cluster: a head and a worker node, one CPU each."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_funcs import app, boom, sleepy, where

import kiln
from kiln.errors import ConfigError, ValidationError

RAY = Path(sys.executable).with_name("ray")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    port = "6399"  # below the range Ray gives its workers (10002-19999)
    # A local test cluster: no token authentication (Ray 2.5x turns it on for `ray start`)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    start = [str(RAY), "start", "--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats"]
    subprocess.run([*start, "--head", "--port", port, "--include-dashboard", "false"],
                   check=True, capture_output=True, env=env, timeout=180)  # fmt: skip
    try:
        subprocess.run([*start, "--address", f"127.0.0.1:{port}"], check=True,
                       capture_output=True, env=env, timeout=180)  # fmt: skip
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree("/tmp/ray/session_latest", ignore_errors=True)


@pytest.fixture
def on_ray(cluster: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KILN_BACKEND", "ray")
    monkeypatch.setenv("KILN_RAY_ADDRESS", cluster)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    return cluster


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
    with pytest.raises(ValidationError, match=r"gpu: 0\.5 GPUs requested, the machine has 0"):
        wants_gpu.remote()


def test_an_unreachable_cluster_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_BACKEND", "ray")
    monkeypatch.setenv("KILN_RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"KILN_RAY_ADDRESS: cannot reach Ray at 127\.0\.0\.1:1"):
        where.remote(1)
