"""Functions on the Kubernetes engine, end to end but for the API server: a real
``kiln server`` is the record, the engine is the real one, and each Job's pod is its
real process (``python -m kiln._k8s_task`` with the environment the Job names), run
by a test thread playing the kubelet against the scripted API of
``kiln.testing.kubernetes``. No Kubernetes cluster runs on these machines."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kiln
from conftest import ServerProcess
from kiln._engine import engine_for
from kiln.compute.backends.kubernetes import KubernetesBackend
from kiln.compute.kube import KubeSettings
from kiln.config import Settings
from kiln.errors import RunFailed
from kiln.record.recorder import recorder_for
from kiln.testing.kubernetes import FakeCluster

FUNCS = Path(__file__).with_name("k8s_funcs.py")


class Kubelet:
    """Runs each new Job's container as a process, then reports how it ended."""

    def __init__(self, cluster: FakeCluster, scratch: Path) -> None:
        self.cluster, self.scratch = cluster, scratch
        self.ran: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            with self.cluster._changed:
                new = [n for n in self.cluster.objects["jobs"] if n not in self.ran]
            for job in new:
                self.ran.append(job)
                self.run(job)

    def run(self, job: str) -> None:
        spec = self.cluster.objects["jobs"][job]["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        pod = self.scratch / job
        pod.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
        env.update(
            KILN_HOME=str(pod / "home"),
            KILN_ENVS=str(self.scratch / "envs"),
            KILN_TERMINATION_LOG=str(pod / "termination-log"),
        )
        self.cluster.start(job)
        done = subprocess.run(
            [sys.executable, *container["command"][1:]],
            env=env,
            cwd=pod,
            capture_output=True,
            text=True,
            timeout=120,
        )
        log = pod / "termination-log"
        message = log.read_text() if log.exists() else done.stderr[-2000:]
        reason = "Completed" if done.returncode == 0 else "Error"
        self.cluster.terminate(job, done.returncode, reason, message)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture
def on_kubernetes(
    start_server: Callable[..., ServerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[FakeCluster, Kubelet]]:
    server = start_server()
    monkeypatch.setenv("KILN_SERVER", server.url)
    monkeypatch.setenv("KILN_BACKEND", "kubernetes")
    monkeypatch.setenv("KILN_K8S_IMAGE", "registry.example/kiln:test")
    cluster = FakeCluster()
    settings = Settings.from_env()

    def backend(_inventory: Any, report: Any) -> KubernetesBackend:
        blobs = recorder_for(settings).blobs
        return KubernetesBackend(
            report,
            KubeSettings.from_env(),
            server.url,
            None,
            put=blobs.put_bytes,
            fetch=blobs.read,
            batch=cluster.batch,
            core=cluster.core,
        )

    engine_for(settings, backend=backend)
    kubelet = Kubelet(cluster, tmp_path / "node")
    (tmp_path / "node").mkdir()
    yield cluster, kubelet
    kubelet.stop()


def test_functions_run_as_jobs_and_record_through_the_server(
    on_kubernetes: tuple[FakeCluster, Kubelet], tmp_path: Path
) -> None:
    _, kubelet = on_kubernetes
    sys.path.insert(0, str(FUNCS.parent))
    try:
        import k8s_funcs
    finally:
        sys.path.remove(str(FUNCS.parent))
    assert k8s_funcs.train.remote(0.25) == {"accuracy": 0.75}
    (run,) = kiln.runs(app="k8s")
    assert run.status is kiln.RunStatus.SUCCEEDED
    assert run.engine == "kubernetes"
    assert [p.value for p in kiln.get_run(run.id).metric_history("loss")] == [0.25, 0.125, 0.25 / 3]
    assert kubelet.ran == [f"kiln-{run.id}-1"]
    # a failed attempt is retried as a new Job of the same run
    assert k8s_funcs.flaky.remote(str(tmp_path / "marker")) == "second attempt"
    flaky = kiln.runs(app="k8s", order_by="-created")[0]
    assert kubelet.ran[-2:] == [f"kiln-{flaky.id}-1", f"kiln-{flaky.id}-2"]
    assert [a["status"] for a in flaky.resources["attempts"]] == ["failed", "succeeded"]
    # the timeout is held in the pod, from the function's call
    with pytest.raises(RunFailed, match="timed out after 1s"):
        k8s_funcs.sleeps.remote()
    # an env is built in the pod from the lock recorded by the driver, once
    built = k8s_funcs.in_env.remote()
    assert built["six"] == "1.16.0"
    assert built["prefix"].startswith(str(tmp_path / "node" / "envs"))
    assert k8s_funcs.in_env.remote() == built  # the same env, from the volume
