"""A scripted Kubernetes API, for tests of the Kubernetes engine without a cluster.

:class:`FakeCluster` answers the calls the engine makes of the official client's
``BatchV1Api`` and ``CoreV1Api`` (``cluster.batch``, ``cluster.core``) with the JSON
an API server sends, which the client itself turns into its typed objects; watches
are streams of JSON lines read by the client's own ``kubernetes.watch.Watch``. A
test plays the cluster's part: a Job's pod starts, succeeds or fails, is evicted,
loses its node, the Job's deadline passes; a watch expires (``410 Gone``) or is cut;
events come twice. ``put`` and ``fetch`` are the blob store the pods and the engine
share.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle

IDLE_S = 0.05  # a watch with nothing to say sends a bookmark this often


class _Response:
    """What the client reads a watch from: ``stream()`` yields lines as bytes."""

    def __init__(self, lines: Iterator[bytes]) -> None:
        self.status = 200
        self._lines = lines

    def stream(self, amt: Any = None, decode_content: Any = None) -> Iterator[bytes]:
        yield from self._lines

    def close(self) -> None:
        """Nothing to close."""

    def release_conn(self) -> None:
        """Nothing to release."""


class _Api:
    """Deployments, Services and autoscalers: ``create``, ``patch`` and ``delete``
    (``_namespaced_<noun>``), kept by name and answered 409 and 404 as the server does."""

    def __init__(self, cluster: FakeCluster) -> None:
        self._cluster = cluster

    def __getattr__(self, name: str) -> Any:
        verb, _, noun = name.partition("_namespaced_")
        if verb not in ("create", "read", "patch", "delete") or not noun:
            raise AttributeError(name)
        return functools.partial(self._cluster.kept, verb, noun.removesuffix("_status"))


class _Batch(_Api):
    def create_namespaced_job(self, namespace: str, body: Any, **_: Any) -> Any:
        return self._cluster.create_job(namespace, body)

    def read_namespaced_job(self, name: str, namespace: str, **_: Any) -> Any:
        return self._cluster.typed(self._cluster.find("jobs", name), "V1Job")

    def delete_namespaced_job(self, name: str, namespace: str, **kwargs: Any) -> Any:
        self._cluster.calls.append(("delete_job", name, kwargs))
        return self._cluster.delete("jobs", name, cascade=True)

    def list_namespaced_job(self, namespace: str, **kwargs: Any) -> Any:
        """:rtype: V1JobList"""
        return self._cluster.list_or_watch("jobs", kwargs)


class _Core(_Api):
    def list_namespaced_pod(self, namespace: str, **kwargs: Any) -> Any:
        """:rtype: V1PodList"""
        return self._cluster.list_or_watch("pods", kwargs)

    def delete_namespaced_pod(self, name: str, namespace: str, **kwargs: Any) -> Any:
        self._cluster.calls.append(("delete_pod", name, kwargs))
        if kwargs.get("grace_period_seconds"):  # terminating: SIGTERM, then its grace
            return self._cluster.terminating(name)
        return self._cluster.delete("pods", name)

    def list_node(self, **_: Any) -> Any:
        nodes = [
            {
                "metadata": {"name": n},
                "status": {"allocatable": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}},
            }
            for n in ("n1", "n2")
        ]
        return self._cluster.typed({"items": nodes, "metadata": {}}, "V1NodeList")


class FakeCluster:
    """Jobs and pods in one namespace, with their watch streams (see the module doc)."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, dict[str, Any]]] = {"jobs": {}, "pods": {}}
        self.events: dict[str, list[tuple[int, str, dict[str, Any]]]] = {"jobs": [], "pods": []}
        self.version = 100
        self.blobs: dict[str, bytes] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.watches = {"jobs": 0, "pods": 0}  # watch streams opened, by kind
        self.lists = {"jobs": 0, "pods": 0}
        self.creates = 0
        self.lose_next_create_answer = False  # the Job is made, its answer never arrives
        self._faults: dict[str, list[str]] = {"jobs": [], "pods": []}
        self._changed = threading.Condition()
        self.batch, self.core = _Batch(self), _Core(self)
        self.apps, self.autoscaling = _Api(self), _Api(self)
        from kubernetes import client

        self._client = client.ApiClient()

    # -- the blob store pods and engine share ----------------------------------------

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        return sha

    def fetch(self, sha: str) -> bytes:
        return self.blobs[sha]

    # -- the API -----------------------------------------------------------------------

    def typed(self, data: dict[str, Any], kind: str) -> Any:
        return self._client.deserialize(json.dumps(data), kind, "application/json")

    def create_job(self, namespace: str, body: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        job = self._client.sanitize_for_serialization(body)  # type: ignore[no-untyped-call]
        name = job["metadata"]["name"]
        with self._changed:
            self.creates += 1
            if name in self.objects["jobs"]:
                raise ApiException(status=409, reason="AlreadyExists")
            job["metadata"]["namespace"] = namespace
            job["status"] = {}
            self._emit("jobs", "ADDED", job)
        if self.lose_next_create_answer:
            self.lose_next_create_answer = False
            raise ConnectionResetError("the connection was reset before the answer came")
        return self.typed(job, "V1Job")

    def kept(self, verb: str, noun: str, *args: Any, **kwargs: Any) -> Any:
        """``verb`` an object of ``noun`` (``deployment``, ``service``,
        ``horizontal_pod_autoscaler``); a patch is server-side apply: the whole object."""
        from kubernetes.client.exceptions import ApiException

        types = {"deployment": "V1Deployment", "service": "V1Service",
                 "horizontal_pod_autoscaler": "V2HorizontalPodAutoscaler"}  # fmt: skip
        with self._changed:
            kept = self.objects.setdefault(noun, {})
            name = args[0] if verb != "create" else args[1].metadata.name
            self.calls.append((verb, noun, name))
            if verb == "create":
                if name in kept:
                    raise ApiException(status=409, reason="AlreadyExists")
                kept[name] = self._client.sanitize_for_serialization(args[1])  # type: ignore[no-untyped-call]
            elif verb == "patch" and kwargs.get("field_manager") == "kiln" and kwargs.get("force"):
                status = kept.get(name, {}).get("status")  # the cluster's, kept
                kept[name] = {**args[2], **({"status": status} if status else {})}
            elif name not in kept:
                raise ApiException(status=404, reason="NotFound")
            elif verb == "read":
                return self.typed(kept[name], types[noun])
            elif verb == "delete":
                del kept[name]
            else:
                raise ApiException(status=415, reason="only server-side apply is scripted")
        return None

    def find(self, kind: str, name: str) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        with self._changed:
            found = self.objects[kind].get(name)
            if found is None:
                raise ApiException(status=404, reason="NotFound")
            return copy.deepcopy(found)

    def delete(self, kind: str, name: str, *, cascade: bool = False) -> Any:
        from kubernetes.client.exceptions import ApiException

        with self._changed:
            found = self.objects[kind].get(name)
            if found is None:
                raise ApiException(status=404, reason="NotFound")
            self._emit(kind, "DELETED", found)
            if cascade:
                for pod in list(self.objects["pods"].values()):
                    if pod["metadata"]["labels"].get("job-name") == name:
                        self._emit("pods", "DELETED", pod)
        return None

    def terminating(self, name: str) -> None:
        with self._changed:
            pod = copy.deepcopy(self.objects["pods"][name])
            pod["metadata"]["deletionTimestamp"] = "2026-12-04T10:00:05Z"
            self._emit("pods", "MODIFIED", pod)

    def list_or_watch(self, kind: str, kwargs: dict[str, Any]) -> Any:
        selector = kwargs.get("label_selector", "")
        if kwargs.get("watch"):
            with self._changed:
                self.watches[kind] += 1
            return _Response(
                self._stream(
                    kind, selector, int(kwargs["resource_version"]), kwargs.get("timeout_seconds")
                )
            )
        with self._changed:
            self.lists[kind] += 1
            items = [o for o in self.objects[kind].values() if _matches(o, selector)]
            listed = {
                "items": copy.deepcopy(items),
                "metadata": {"resourceVersion": str(self.version)},
            }
        return self.typed(listed, "V1JobList" if kind == "jobs" else "V1PodList")

    def _stream(self, kind: str, selector: str, since: int, timeout: int | None) -> Iterator[bytes]:
        end = time.monotonic() + (timeout or 3600)
        at = 0  # how far into the event log this watch has read
        while time.monotonic() < end:
            with self._changed:
                fault = self._faults[kind].pop(0) if self._faults[kind] else None
                if fault == "gone":
                    yield _line(
                        "ERROR",
                        {
                            "kind": "Status",
                            "code": 410,
                            "reason": "Expired",
                            "message": "too old resource version",
                        },
                    )
                    return
                if fault == "cut":
                    raise ConnectionResetError("the watch's connection was reset")
                log = self.events[kind]
                at = at if at <= len(log) else 0  # the log was cut (a test's doing)
                fresh = [(v, t, o) for v, t, o in log[at:] if v > since and _matches(o, selector)]
                at = len(log)
                if not fresh:
                    self._changed.wait(IDLE_S)
                    bookmark = {"kind": "Bookmark", "metadata": {"resourceVersion": str(since)}}
            if not fresh:
                yield _line("BOOKMARK", bookmark)
                continue
            for version, type_, obj in fresh:
                since = version
                yield _line(type_, obj)

    def _emit(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        """Record a change (under the lock) and wake the watches."""
        self.version += 1  # a copy of the top level: callers replace parts, never mutate them
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.version)}}
        if type_ == "DELETED":
            self.objects[kind].pop(obj["metadata"]["name"], None)
        else:
            self.objects[kind][obj["metadata"]["name"]] = obj
        self.events[kind].append((self.version, type_, obj))
        self._changed.notify_all()

    # -- the cluster's part, played by a test ----------------------------------------

    def job(self, run_id: str, attempt: int = 1) -> str:
        return f"kiln-{run_id}-{attempt}"

    def wait_for_job(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while name not in self.objects["jobs"]:
                if not self._changed.wait(max(0.0, deadline - time.monotonic())):
                    raise AssertionError(f"no Job {name} was made")
            return copy.deepcopy(self.objects["jobs"][name])

    def start(self, job: str, node: str = "n1") -> str:
        """The Job's pod is scheduled on ``node`` and its container runs."""
        with self._changed:
            spec = self.objects["jobs"][job]["spec"]["template"]
            name = f"{job}-{len(self.events['pods']):05d}"
            labels = {**spec["metadata"]["labels"], "job-name": job}
            pod = {
                "metadata": {
                    "name": name,
                    "labels": labels,
                    "creationTimestamp": "2026-12-04T10:00:00Z",
                },
                "spec": {"nodeName": node, "containers": spec["spec"]["containers"]},
                "status": {"phase": "Pending"},
            }
            self._emit("pods", "ADDED", pod)
            pod["status"] = {
                "phase": "Running",
                "containerStatuses": [
                    _container({"running": {"startedAt": "2026-12-04T10:00:01Z"}})
                ],
            }
            self._emit("pods", "MODIFIED", pod)
            return name

    def finish(
        self,
        job: str,
        status: str = "succeeded",
        *,
        result: Any = None,
        cause: str | None = None,
        exit_code: int | None = None,
    ) -> None:
        """The task ends and writes its account; the Job completes or fails."""
        envelope = {
            "status": status,
            "cause": cause,
            "error": cause,
            "usage": {"cpu_s": 1.0},
            "environment": None,
            "result": base64.b64encode(cloudpickle.dumps(result)).decode()
            if status == "succeeded"
            else None,
        }
        sha = self.put(json.dumps(envelope).encode())
        account = json.dumps({"kiln": 1, "status": status, "cause": cause, "reply": sha})
        code = exit_code if exit_code is not None else (0 if status == "succeeded" else 1)
        self.terminate(job, code, "Completed" if code == 0 else "Error", account)

    def terminate(self, job: str, exit_code: int, reason: str, message: str = "") -> None:
        """The pod's container exits with ``exit_code`` (no account unless ``message``
        is one); the Job controller marks the Job."""
        with self._changed:
            pod = self._pod_of(job)
            pod["status"] = {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "containerStatuses": [
                    _container(
                        {
                            "terminated": {
                                "exitCode": exit_code,
                                "reason": reason,
                                "message": message,
                            }
                        }
                    )
                ],
            }
            self._emit("pods", "MODIFIED", pod)
            self._condition(
                job,
                "Complete" if exit_code == 0 else "Failed",
                "" if exit_code == 0 else "BackoffLimitExceeded",
            )

    def stall(self, job: str, reason: str, message: str) -> str:
        """The Job's pod is scheduled but its container waits (``CreateContainerConfigError``:
        its Secret is missing; ``ImagePullBackOff``: its image cannot be pulled)."""
        with self._changed:
            spec = self.objects["jobs"][job]["spec"]["template"]
            name = f"{job}-{len(self.events['pods']):05d}"
            pod = {"metadata": {"name": name, "labels": {**spec["metadata"]["labels"],
                                                         "job-name": job}},
                   "spec": {"nodeName": "n1", "containers": spec["spec"]["containers"]},
                   "status": {"phase": "Pending", "containerStatuses": [_container(
                       {"waiting": {"reason": reason, "message": message}})]}}  # fmt: skip
            self._emit("pods", "ADDED", pod)
            return name

    def label(self, kind: str, name: str, labels: dict[str, str]) -> None:
        """Anyone with rights in the namespace can write labels: an object of ``kind``
        with these, as Kiln's watches see it."""
        with self._changed:
            self._emit(kind, "ADDED", {"metadata": {"name": name, "labels": labels},
                                       "status": {}})  # fmt: skip

    def evict(self, job: str) -> None:
        with self._changed:
            pod = self._pod_of(job)
            pod["status"] = {
                "phase": "Failed",
                "reason": "Evicted",
                "message": "The node was low on resource: memory.",
            }
            self._emit("pods", "MODIFIED", pod)
            self._condition(job, "Failed", "BackoffLimitExceeded")

    def lose_node(self, job: str) -> None:
        with self._changed:
            pod = self._pod_of(job)
            lost = {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "DeletionByTaintManager",
                "message": "node n1 is unreachable",
            }
            pod["status"] = {**pod["status"], "conditions": [lost]}
            self._emit("pods", "MODIFIED", pod)
            self._emit("pods", "DELETED", pod)
            self._condition(job, "Failed", "BackoffLimitExceeded")

    def pass_deadline(self, job: str) -> None:
        with self._changed:
            for pod in list(self.objects["pods"].values()):
                if pod["metadata"]["labels"].get("job-name") == job:
                    self._emit("pods", "DELETED", pod)
            self._condition(
                job, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline"
            )

    def repeat_last(self, kind: str) -> None:
        """The last event of ``kind`` again, as a watch resumed may send it."""
        with self._changed:
            _version, type_, obj = self.events[kind][-1]
            self.version += 1
            self.events[kind].append((self.version, type_, obj))
            self._changed.notify_all()

    def expire_watch(self, kind: str) -> None:
        """The next read of a ``kind`` watch is ``410 Gone``."""
        with self._changed:
            self._faults[kind].append("gone")

    def cut_watch(self, kind: str) -> None:
        """The next read of a ``kind`` watch finds its connection reset."""
        with self._changed:
            self._faults[kind].append("cut")

    def _pod_of(self, job: str) -> dict[str, Any]:
        pods = [
            p
            for p in self.objects["pods"].values()
            if p["metadata"]["labels"].get("job-name") == job
        ]
        return dict(pods[-1])

    def _condition(self, job: str, type_: str, reason: str, message: str = "") -> None:
        obj = dict(self.objects["jobs"][job])
        obj["status"] = {
            "conditions": [{"type": type_, "status": "True", "reason": reason, "message": message}]
        }
        self._emit("jobs", "MODIFIED", obj)


def _container(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "task",
        "image": "kiln",
        "imageID": "",
        "ready": False,
        "restartCount": 0,
        "state": state,
    }


def _line(type_: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": type_, "object": obj}).encode() + b"\n"


def _matches(obj: dict[str, Any], selector: str) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, eq, value = term.partition("=")
        if key not in labels or (eq and labels[key] != value):
            return False
    return True
