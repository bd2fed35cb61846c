"""The Kubernetes engine's driver work per Job, on the scripted API server.

500 tasks go through the real engine: each is shipped (cloudpickled, put in the blob
store), rendered as a typed Job and created; the scripted cluster starts and ends
each pod, and the engine's watches read every event through the official client
(``kubernetes.watch.Watch``, its typed deserialization) to report Started and
Finished. The baseline is the floor any tool built on the official client pays for
the same Jobs: a minimal typed ``V1Job`` serialized, and its two watch events
deserialized. The cluster's own time is not in either. Goal (ours; the issue sets
none): < 10 ms of driver work per Job, so a 1,000-run sweep is submitted and
followed in under 10 s.
"""

from __future__ import annotations

import json
import threading
import time

import cloudpickle
from kubernetes import client

from kiln.compute.backends.base import Finished, TaskEvent, TaskSpec
from kiln.compute.backends.kubernetes import KubernetesBackend
from kiln.compute.kube import KubeSettings
from kiln.compute.resources import Resources
from kiln.testing.kubernetes import FakeCluster

from _common import Row, emit

N = 500


def specs() -> list[TaskSpec]:
    payload = cloudpickle.dumps(len)
    return [TaskSpec(run_id=f"{i:032x}", app="bench", fn_key="k", fn_payload=payload,
                     args_payload=cloudpickle.dumps(((i,), {})), resources=Resources(cpu=1))
            for i in range(N)]  # fmt: skip


def kiln_per_job() -> float:
    cluster = FakeCluster()
    done = threading.Semaphore(0)

    def report(events: list[TaskEvent]) -> None:
        for event in events:
            if isinstance(event, Finished):
                done.release()

    backend = KubernetesBackend(report, KubeSettings(image="k:1"), "http://kiln:8000", None,
                                put=cluster.put, fetch=cluster.fetch, batch=cluster.batch,
                                core=cluster.core)  # fmt: skip
    try:
        tasks = specs()
        t = time.perf_counter()
        backend.submit(tasks)
        for task in tasks:
            job = cluster.job(task.run_id)
            cluster.start(job)
            cluster.finish(job, result=task.run_id)
        for _ in tasks:
            done.acquire(timeout=60)
        return (time.perf_counter() - t) * 1000 / N
    finally:
        backend.close()


def baseline_per_job() -> float:
    api = client.ApiClient()
    t = time.perf_counter()
    for task in specs():
        job = client.V1Job(api_version="batch/v1", kind="Job",
                           metadata=client.V1ObjectMeta(name=f"kiln-{task.run_id}-1"),
                           spec=client.V1JobSpec(template=client.V1PodTemplateSpec(
                               spec=client.V1PodSpec(restart_policy="Never", containers=[
                                   client.V1Container(name="task", image="k:1")]))))  # fmt: skip
        text = json.dumps(api.sanitize_for_serialization(job))
        for _ in range(2):
            api.deserialize(text, "V1Job", "application/json")
    return (time.perf_counter() - t) * 1000 / N


def main() -> None:
    baseline_per_job()  # warm: the client's models imported
    base = min(baseline_per_job() for _ in range(3))
    ours = min(kiln_per_job() for _ in range(2))
    emit([Row("kubernetes", f"driver work per Job, {N} Jobs submitted, watched, finished (ms)",
              ours, base, "official client: a minimal V1Job serialized, 2 events read",
              "ms", "< 10 ms per Job", ours < 10)])  # fmt: skip


if __name__ == "__main__":
    main()
