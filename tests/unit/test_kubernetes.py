"""The Kubernetes engine without a cluster: every object it renders, validated by
kubernetes-validate (strict) against two Kubernetes versions and pinned by golden
files; Kueue's fields; and the engine's watch loop against a scripted API server
(kiln.testing.kubernetes) read by the official client: 410 Gone, cut connections,
repeated events, evictions, lost nodes, deadlines, cancel, preempt, and a
resubmission that never makes a second Job."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import cloudpickle
import kubernetes_validate
import pytest

import kiln
from kiln.compute.backends.base import Finished, Started, TaskEvent, TaskSpec
from kiln.compute.backends.kubernetes import KubernetesBackend
from kiln.compute.kube import (
    PRIORITY_LABEL,
    QUEUE_LABEL,
    KubeSettings,
    job_name,
    plain,
    render_job,
)
from kiln.compute.resources import Resources
from kiln.errors import ConfigError, ValidationError
from kiln.serve.on_kubernetes import render_router, render_version
from kiln.testing.kubernetes import FakeCluster

VERSIONS = ("1.35.0", "1.37.0")  # the oldest and newest kubernetes-validate knows here
GOLDEN = Path(__file__).parent / "golden"
RUN = "0123456789abcdef0123456789abcdef"
KUBE = KubeSettings(
    image="registry.example/team/kiln:1",
    queue="team-a",
    priority_class="high",
    gpu_sharing="time-slicing",
)
LOCK = (
    "six==1.16.0 \\\n"
    "    --hash=sha256:8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254\n"
)


def spec(run: str = RUN, attempt: int = 1, **resources: Any) -> TaskSpec:
    return TaskSpec(
        run_id=run,
        app="fraud",
        fn_key="k",
        fn_payload=cloudpickle.dumps(len),
        args_payload=cloudpickle.dumps(((), {})),
        attempt=attempt,
        resources=Resources(**resources),
        store={"token": "secret-of-the-driver"},
    )


def bare(**fields: Any) -> TaskSpec:
    """A task with nothing to run, as rendering sees it."""
    return TaskSpec(run_id=RUN, app="fraud", fn_key="k", fn_payload=b"", args_payload=b"", **fields)


def valid(obj: dict[str, Any]) -> None:
    for version in VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)  # raises on any error


SHAPES = {
    "cpu": (Resources(cpu=0.5), KUBE),
    "cpu-memory": (Resources(cpu=2, memory_bytes=3 * 2**30), KUBE),
    "whole-gpus": (Resources(cpu=4, memory_bytes=2**34, gpu=2), KUBE),
    "time-sliced": (Resources(cpu=1, gpu=0.5), KUBE),
    "mig": (Resources(cpu=1, gpu=0.25), KubeSettings(image="k:1", gpu_sharing="mig:1g.18gb")),
    "env-cache": (
        Resources(cpu=1),
        KubeSettings(image="k:1", env_cache="kiln-envs", service_account="runner"),
    ),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_job_shape_is_valid_kubernetes(shape: str) -> None:
    resources, kube = SHAPES[shape]
    task = bare(resources=resources, timeout_s=90.0, requirements=LOCK)
    job = plain(render_job(task, "ab" * 32, kube, server_url="http://kiln:8000", project="p"))
    valid(job)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert job["spec"]["activeDeadlineSeconds"] == 90 + kube.startup_s


def test_a_job_is_pinned_by_its_golden_file() -> None:
    task = bare(
        resources=Resources(cpu=2, memory_bytes=2**30, gpu=1),
        timeout_s=60.0,
        threads={"OMP_NUM_THREADS": "2"},
    )
    job = plain(render_job(task, "ab" * 32, KUBE, server_url="http://kiln:8000", project="p"))
    golden = GOLDEN / "job.json"
    if os.environ.get("KILN_UPDATE_GOLDEN"):
        golden.write_text(json.dumps(job, indent=2, sort_keys=True) + "\n")
    assert job == json.loads(golden.read_text())


def test_kueue_reads_its_queue_and_priority_from_labels_and_retries_stay_kilns() -> None:
    job = plain(render_job(spec(), "ab" * 32, KUBE, server_url="http://k", project=None))
    meta = job["metadata"]
    assert meta["labels"][QUEUE_LABEL] == "team-a"  # a label: Kueue ignores annotations
    assert meta["labels"][PRIORITY_LABEL] == "high"
    assert not any(k.startswith("kueue.x-k8s.io/") for k in meta.get("annotations", {}))
    assert QUEUE_LABEL == "kueue.x-k8s.io/queue-name"  # the field of Kueue's API
    assert PRIORITY_LABEL == "kueue.x-k8s.io/priority-class"
    pod = job["spec"]["template"]["spec"]
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert "suspend" not in job["spec"]  # Kueue's webhook suspends it until admitted
    assert meta["name"] == job_name(RUN, 1) == f"kiln-{RUN}-1"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["KILN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "kiln-token", "key": "token"}
    assert "secret-of-the-driver" not in json.dumps(job)


def test_what_the_cluster_cannot_give_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="KILN_K8S_GPU_SHARING") as info:
        render_job(
            spec(gpu=0.5), "ab" * 32, KubeSettings(image="k:1"), server_url="http://k", project=None
        )
    assert info.value.field == "gpu"
    bad = {
        "KILN_K8S_NAMESPACE": "Team_A",
        "KILN_K8S_GPU_SHARING": "half",
        "KILN_K8S_IMAGE": "a b",
        "KILN_K8S_STARTUP_S": "-1",
        "KILN_K8S_QUEUE": "x" * 64,
    }
    for var, value in bad.items():
        with pytest.raises(ConfigError) as refused:
            KubeSettings.from_env({var: value})
        assert refused.value.setting == var
    with pytest.raises(ConfigError, match="KILN_K8S_IMAGE"):
        KubeSettings().require_image()


# -- the engine against a scripted API server ---------------------------------------


class Reported:
    def __init__(self) -> None:
        self.events: list[TaskEvent] = []
        self._cond = threading.Condition()

    def __call__(self, events: list[TaskEvent]) -> None:
        with self._cond:
            self.events.extend(events)
            self._cond.notify_all()

    def wait(self, kind: type, n: int = 1, timeout: float = 10.0) -> list[Any]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.of(kind)) >= n, timeout)
        assert ok, f"waited for {n} {kind.__name__}: {self.events}"
        return self.of(kind)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster()


@pytest.fixture
def engine(cluster: FakeCluster) -> Any:
    reported = Reported()
    backend = KubernetesBackend(
        reported,
        KUBE,
        "http://kiln:8000",
        "p",
        put=cluster.put,
        fetch=cluster.fetch,
        batch=cluster.batch,
        core=cluster.core,
    )
    backend.reported = reported  # type: ignore[attr-defined]
    yield backend
    backend.close()


def test_a_job_starts_and_ends_once_through_410s_cuts_and_repeats(
    cluster: FakeCluster, engine: Any
) -> None:
    reported: Reported = engine.reported
    engine.submit([spec()])
    job = cluster.job(RUN)
    made = cluster.wait_for_job(job)
    sha = made["metadata"]["annotations"]["kiln.dev/task-sha256"]
    shipped = cloudpickle.loads(cluster.blobs[sha])
    assert shipped.run_id == RUN and "token" not in shipped.store  # the pod has its own
    cluster.expire_watch("pods")
    cluster.cut_watch("jobs")
    cluster.start(job)
    (started,) = reported.wait(Started)
    assert started.assigned["node"] == "n1" and started.assigned["job"] == job
    cluster.repeat_last("pods")
    cluster.finish(job, result={"accuracy": 0.9})
    cluster.repeat_last("jobs")
    (finished,) = reported.wait(Finished)
    assert finished.outcome.status == "succeeded"
    assert cloudpickle.loads(finished.outcome.result) == {"accuracy": 0.9}
    assert cluster.lists["jobs"] >= 2 and cluster.lists["pods"] >= 2  # it listed again
    assert len(reported.of(Started)) == 1 and len(reported.of(Finished)) == 1


@pytest.mark.parametrize(
    ("play", "cause"),
    [
        ("evict", "pod evicted: The node was low on resource: memory."),
        ("lose_node", "node lost: node n1 is unreachable"),
        ("pass_deadline", "timed out: its Job's activeDeadlineSeconds"),
        ("oom", "killed for memory (OOMKilled, exit 137)"),
        ("crash", "container exited 1 (Error): loading model | Segmentation fault"),
        ("delete", "was deleted outside Kiln"),
        ("fail", "ValueError: bad lr"),
    ],
)
def test_a_failed_attempt_says_why_in_kubernetes_words(
    cluster: FakeCluster, engine: Any, play: str, cause: str
) -> None:
    engine.submit([spec()])
    job = cluster.job(RUN)
    cluster.wait_for_job(job)
    cluster.start(job)
    engine.reported.wait(Started)
    if play == "oom":
        cluster.terminate(job, 137, "OOMKilled")
    elif play == "crash":
        cluster.terminate(job, 1, "Error", "loading model\nSegmentation fault")
    elif play == "delete":
        cluster.batch.delete_namespaced_job(job, "default")
    elif play == "fail":
        cluster.finish(job, "failed", cause="ValueError: bad lr")
    else:
        getattr(cluster, play)(job)
    (finished,) = engine.reported.wait(Finished)
    assert finished.outcome.status == "failed"
    assert cause in (finished.outcome.cause or "")


def test_an_end_missed_while_the_watch_was_down_is_found_by_listing_again(
    cluster: FakeCluster, engine: Any
) -> None:
    engine.submit([spec()])
    job = cluster.job(RUN)
    cluster.wait_for_job(job)
    cluster.start(job)
    engine.reported.wait(Started)
    # the Job ends and is deleted (its TTL) while both watches are down; the list
    # after the cut no longer has it, and the attempt ends with that cause
    cluster.cut_watch("jobs")
    cluster.cut_watch("pods")
    cluster.events["jobs"].clear()  # nothing of it reaches a watch
    with cluster._changed:
        cluster.objects["jobs"].pop(job)
    (finished,) = engine.reported.wait(Finished)
    assert "deleted outside Kiln" in (finished.outcome.cause or "")


def test_cancel_deletes_the_job_with_its_pods_and_preempt_gives_the_grace(
    cluster: FakeCluster, engine: Any
) -> None:
    other = "f" * 32
    engine.submit([spec(), spec(other)])
    for run in (RUN, other):
        cluster.wait_for_job(cluster.job(run))
        cluster.start(cluster.job(run))
    engine.reported.wait(Started, 2)
    engine.cancel(RUN)
    assert ("delete_job", cluster.job(RUN), {"propagation_policy": "Background"}) in cluster.calls
    engine.preempt(other, "its quota went to a higher priority", 7.0)
    deleted = [c for c in cluster.calls if c[0] == "delete_pod"]
    assert deleted and deleted[0][2] == {"grace_period_seconds": 7}
    cluster.finish(cluster.job(other), "failed", cause="Preempted: saved a checkpoint")
    finished = {f.run_id: f.outcome for f in engine.reported.wait(Finished, 2)}
    assert finished[RUN].status == "cancelled"
    assert finished[other].status == "preempted"
    assert finished[other].cause == "its quota went to a higher priority"


def test_a_resubmission_after_a_lost_answer_never_makes_a_second_job(
    cluster: FakeCluster, engine: Any
) -> None:
    cluster.lose_next_create_answer = True  # made, but the driver never hears so
    engine.submit([spec()])
    job = cluster.job(RUN)
    assert cluster.creates == 2 and list(cluster.objects["jobs"]) == [job]  # 409: adopted
    engine.submit([spec()])  # the driver, back after a crash, submits it again
    assert cluster.creates == 3 and list(cluster.objects["jobs"]) == [job]
    cluster.start(job)
    cluster.finish(job, result=1)
    assert len(engine.reported.wait(Finished)) == 1
    assert engine.reported.of(Finished)[0].outcome.status == "succeeded"


def test_a_fraction_of_a_gpu_is_refused_before_anything_runs_where_none_is_shared(
    cluster: FakeCluster,
) -> None:
    reported = Reported()
    backend = KubernetesBackend(
        reported,
        KubeSettings(image="k:1"),
        "http://kiln:8000",
        None,
        put=cluster.put,
        fetch=cluster.fetch,
        batch=cluster.batch,
        core=cluster.core,
    )
    try:
        with pytest.raises(ValidationError, match="offers no GPU sharing"):
            backend.inventory.check(Resources(gpu=0.5))
        backend.inventory.check(Resources(cpu=8, gpu=2))  # one node has that
        with pytest.raises(ValidationError, match="the largest node has 2"):
            backend.inventory.check(Resources(cpu=8, gpu=3))
    finally:
        backend.close()


# -- endpoints -------------------------------------------------------------------------

shop = kiln.App("shop")


class Fraud:
    def load(self, model_path: str) -> None:
        self.path = model_path

    def predict(self, features: list[float]) -> dict[str, float]:
        return {"fraud": sum(features)}


def endpoint_objects(metric: str, **declared: Any) -> list[dict[str, Any]]:
    endpoint = shop.endpoint(model="fraud@production", **declared)(Fraud)
    where = {"server_url": "http://kiln:8000", "project": "p"}
    objects = render_router(endpoint, KUBE, **where)
    objects += render_version(endpoint, 3, KUBE, metric=metric, **where)
    return [plain(o) for o in objects]


@pytest.mark.parametrize("metric", ["cpu", "inflight"])
def test_an_endpoints_objects_are_valid_kubernetes(metric: str) -> None:
    objects = endpoint_objects(metric, cpu=1, memory="1Gi", gpu=0.5, min_replicas=0,
                               max_replicas=4, target_concurrency=8)  # fmt: skip
    for obj in objects:
        valid(obj)
    kinds = [(o["kind"], o["metadata"]["name"]) for o in objects]
    version = "fraud--v3"
    assert kinds == [("Deployment", "fraud"), ("Service", "fraud"), ("Deployment", version),
                     ("Service", version), ("HorizontalPodAutoscaler", version)]  # fmt: skip
    hpa = objects[-1]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 4)  # no scale to zero in the HPA
    (target,) = hpa["metrics"]
    if metric == "inflight":
        assert target["pods"]["metric"]["name"] == "kiln_inflight_requests"
        assert target["pods"]["target"]["averageValue"] == "8"
    else:
        assert target["resource"]["name"] == "cpu"
    replica = objects[2]["spec"]["template"]["spec"]["containers"][0]
    assert replica["command"][-6:] == ["--model", "fraud:3", "--replicas", "1", "--backend",
                                       "local"]  # fmt: skip
    assert replica["resources"]["limits"]["nvidia.com/gpu.shared"] == "1"
    assert "replicas" not in objects[2]["spec"]  # the autoscaler's to set


def test_an_endpoint_is_pinned_by_its_golden_file() -> None:
    objects = endpoint_objects("cpu", cpu=2, memory="2Gi", max_replicas=3)
    golden = GOLDEN / "endpoint.json"
    if os.environ.get("KILN_UPDATE_GOLDEN"):
        golden.write_text(json.dumps(objects, indent=2, sort_keys=True) + "\n")
    assert objects == json.loads(golden.read_text())


def test_the_controller_applies_new_versions_and_retires_old_ones_after_the_move(
    cluster: FakeCluster,
) -> None:
    from kiln.config import Settings
    from kiln.record.recorder import recorder_for
    from kiln.serve.on_kubernetes import DRAIN_S, POLL_S, Applier, Controller

    with shop.run() as run:
        kiln.save("model.pkl", b"weights")
    first = shop.models.register("fraud", run, artifact="model.pkl").version
    shop.models.promote("fraud", first, alias="production", reason="first")
    endpoint = shop.endpoint(model="fraud@production", cpu=1)(Fraud)
    api = Applier(cluster.batch, cluster.core, "default", cluster.apps, cluster.autoscaling)
    store = recorder_for(Settings.from_env()).store
    controller = Controller(endpoint, api, KUBE, store, "http://kiln:8000")
    controller.start()
    controller.start()  # again (a restarted `kiln serve`): applied again, not duplicated
    assert set(cluster.objects["deployment"]) == {"fraud"}
    assert controller.step(now=1000.0) == [f"version {first} applied"]
    assert controller.step(now=1001.0) == []
    second = shop.models.register("fraud", run, artifact="model.pkl").version
    shop.models.promote("fraud", second, alias="production", reason="second")
    assert controller.step(now=1002.0) == [f"version {second} applied"]
    old, new = f"fraud--v{first}", f"fraud--v{second}"
    assert set(cluster.objects["deployment"]) == {"fraud", old, new}
    # the new version's pods are not ready: the router stays on the old one, which stays
    assert controller.step(now=5000.0) == []
    assert controller.step(now=9000.0) == []
    cluster.objects["deployment"][new]["status"] = {"availableReplicas": 1}
    assert controller.step(now=9001.0) == []  # the router moves now; the drain begins
    assert controller.step(now=9001.0 + DRAIN_S) == []
    assert controller.step(now=9002.0 + DRAIN_S + POLL_S) == [f"version {first} retired"]
    for noun in ("deployment", "service", "horizontal_pod_autoscaler"):
        assert old not in cluster.objects[noun] and new in cluster.objects[noun]


def test_kiln_never_takes_over_or_deletes_what_is_not_its_own(cluster: FakeCluster) -> None:
    from kiln.serve.on_kubernetes import Applier, _name

    cluster.objects["service"] = {"fraud": {"metadata": {"name": "fraud", "labels": {}}}}
    api = Applier(cluster.batch, cluster.core, "default", cluster.apps, cluster.autoscaling)
    endpoint = shop.endpoint(model="fraud@production", cpu=1)(Fraud)
    with pytest.raises(ValidationError, match="is not Kiln's"):
        for obj in render_router(endpoint, KUBE, server_url="http://k", project=None):
            api.apply(obj)
    assert cluster.objects["service"]["fraud"]["metadata"]["labels"] == {}
    with pytest.raises(ValidationError, match="is not Kiln's"):
        api.delete_version("fraud")
    # names: valid, and two endpoints never share them
    names = {_name(n) for n in ("fraud", "Fraud", "fraud_model", "fraud.model", "1fraud",
                                "a" * 49 + "_b", "fraud-v2")}  # fmt: skip
    assert len(names) == 7
    assert all(re.fullmatch(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?", n) for n in names), names
    assert not any("--" in n for n in names)


def test_a_pod_that_can_never_start_fails_with_kubernetes_reason(
    cluster: FakeCluster, engine: Any
) -> None:
    engine.submit([spec()])
    job = cluster.job(RUN)
    cluster.wait_for_job(job)
    hostile = {"app.kubernetes.io/managed-by": "kiln", "kiln.dev/run-id": RUN,
               "kiln.dev/attempt": "x"}  # fmt: skip
    cluster.label("pods", "intruder", hostile)  # a watch that stopped here would miss the rest
    cluster.stall(job, "CreateContainerConfigError", 'secret "kiln-token" not found')
    (finished,) = engine.reported.wait(Finished)
    assert finished.outcome.cause == (
        'its pod could not start (CreateContainerConfigError): secret "kiln-token" not found'
    )
    assert job not in cluster.objects["jobs"]  # deleted, not left to wait for ever
    assert engine.reported.of(Started) == []


def test_a_cancel_while_the_job_is_being_made_never_leaves_it_running(
    cluster: FakeCluster, engine: Any
) -> None:
    cluster.lose_next_create_answer = True
    cancelling = threading.Timer(0.1, engine.cancel, args=(RUN,))  # during the retry's wait
    cancelling.start()
    engine.submit([spec()])
    cancelling.join()
    (finished,) = engine.reported.wait(Finished)
    assert finished.outcome.status == "cancelled"
    assert cluster.objects["jobs"] == {}
    assert len(engine.reported.of(Finished)) == 1


def test_a_share_of_a_gpu_fits_a_cluster_that_shares_them(cluster: FakeCluster) -> None:
    backend = KubernetesBackend(Reported(), KUBE, "http://kiln:8000", None, put=cluster.put,
                                fetch=cluster.fetch, batch=cluster.batch,
                                core=cluster.core)  # fmt: skip
    try:
        backend.inventory.check(Resources(cpu=8, gpu=0.5))  # nodes list no gpu.shared count
    finally:
        backend.close()


def test_the_pods_account_fits_the_termination_log_whatever_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln import _k8s_task

    monkeypatch.setenv("KILN_TERMINATION_LOG", str(tmp_path / "log"))
    cluster = FakeCluster()
    store = type(
        "Store", (), {"blob_store": type("B", (), {"put_bytes": staticmethod(cluster.put)})}
    )
    code = _k8s_task._account(store, {"status": "failed", "cause": "😀\0" * 5000, "error": "x"})
    written = (tmp_path / "log").read_bytes()
    assert code == 1 and len(written) < 200
    said = json.loads(written)
    assert json.loads(cluster.blobs[said["reply"]])["cause"] == "😀\0" * 5000
