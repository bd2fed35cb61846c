"""The Kubernetes engine: each attempt of each run is a Job, scheduled by the cluster.

``KILN_BACKEND=kubernetes`` selects it (``pip install 'kiln[kubernetes]'``); the
cluster is the kubeconfig's current context (``KUBECONFIG``), or the one a pod runs
in; the ``KILN_K8S_*`` settings are in :mod:`kiln.compute.kube`, which renders the
Jobs. Runs record through the team server (``KILN_SERVER``): a pod reaches no other
store.

Submit: the task (function by value, arguments, env lock) goes to the server's blob
store, and the Job names it by sha256; the token stays out of it (pods take theirs
from a Secret). Creating a Job that exists already (a resubmission after the driver
lost the answer, or crashed and came back) adopts it: one attempt, one Job.

Started and Finished come from watching Jobs and Pods labelled as Kiln's, from a
list and then a watch from its resource version. A ``410 Gone`` (the version is too
old), a disconnect or a watch that times out lists again, and anything that ended
or vanished meanwhile is seen in that list. A pod running is Started; a Job's
``Complete`` or ``Failed`` condition is Finished, with what the pod wrote as its
termination message (status, cause, and the sha256 of its reply: result, error,
usage), or, when it wrote none, the cause Kubernetes gives: evicted, node lost,
killed for memory, the Job's deadline passed. A Job deleted by someone else fails
its attempt. Events can repeat: each attempt is reported Started and Finished once.

Retries are Kiln's (``backoffLimit: 0``): the engine submits the next attempt, a new
Job. ``cancel`` deletes the Job and its pods; ``preempt`` deletes the pods with the
grace period, so the function gets ``kiln.Preempted`` (SIGTERM) and time to save.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle

from kiln.compute.backends.base import (
    Finished,
    Grant,
    Outcome,
    Report,
    Started,
    TaskEvent,
    TaskSpec,
)
from kiln.compute.figures import Figures, Tally, inventory_pools
from kiln.compute.kube import (
    ATTEMPT_LABEL,
    RUN_LABEL,
    SELECTOR,
    KubeSettings,
    cluster_inventory,
    job_name,
    render_job,
)
from kiln.compute.resources import Inventory, Resources
from kiln.errors import ConfigError

WATCH_S = 60  # a watch is ended and made again this often (the server's limit is longer)
RETRY_S = (0.5, 1.0, 2.0, 5.0)  # backoff between lists after errors
CREATE_TRIES = 4
# What of the driver's store settings a pod gets: the rest (the token, a store URL that
# may hold a password, paths of the driver's machine) stays with the driver.
_SHIPPED = ("actor", "sys_metrics", "traceparent", "project")
# A container waiting for one of these will never start on its own.
_NEVER_STARTS = ("CreateContainerConfigError", "CreateContainerError", "InvalidImageName")
_PULL = ("ErrImagePull", "ImagePullBackOff")  # may pass; given KILN_K8S_STARTUP_S
POD_GRACE_S = 2.0  # after its Job ended, how long an attempt waits for its pod's last state
_log = logging.getLogger("kiln")


@dataclass
class _Slot:
    spec: TaskSpec
    job: str
    created: float = 0.0  # monotonic time its Job was known to exist (0: not yet)
    started: bool = False
    stop_cause: str | None = None
    stop_status: str = "failed"
    pod: Any = None  # the last state seen of its pod (a V1Pod)
    pod_gone: bool = False  # its pod was deleted
    ended: Any = None  # its Job, once Complete or Failed, while its pod's end is awaited


@dataclass
class KubernetesBackend:
    """Runs tasks as Kubernetes Jobs. See the module docstring.

    ``batch`` and ``core`` are the client's ``BatchV1Api`` and ``CoreV1Api`` (made from
    the kubeconfig when None); ``put`` stores a task's payload and ``fetch`` reads a
    pod's reply, both by sha256, in the server's blob store.
    """

    report: Report
    kube: KubeSettings
    server_url: str
    project: str | None
    put: Callable[[bytes], str]
    fetch: Callable[[str], bytes]
    batch: Any = None
    core: Any = None
    inventory: Inventory = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.kube.require_image()
        if self.batch is None or self.core is None:
            self.batch, self.core = connect()
        self.inventory = cluster_inventory(self.core, self.kube.gpu_sharing)
        self._slots: dict[str, _Slot] = {}  # by Job name
        self._lock = threading.Lock()
        self._report_lock = threading.Lock()  # a slot's events are reported in order
        self._closing = threading.Event()
        self._tally = Tally()
        self._watches: list[Any] = []
        self._threads = [
            threading.Thread(target=self._follow, args=(kind,), name=f"kiln-k8s-{kind}",
                             daemon=True)
            for kind in ("jobs", "pods")
        ]  # fmt: skip
        for thread in self._threads:
            thread.start()

    # -- the interface ---------------------------------------------------------------

    def submit(self, tasks: Sequence[TaskSpec]) -> None:
        for spec in tasks:
            slot = _Slot(spec, job_name(spec.run_id, spec.attempt))
            with self._lock:
                self._slots[slot.job] = slot
            if spec.sandbox is not None:
                cause = "SandboxError: sandboxed functions run on the local engine only"
                self._finish_now(slot, Outcome("failed", cause=cause))
                continue
            try:
                job = self._job(spec)
            except Exception as exc:  # a task that cannot be shipped fails, with why
                self._finish_now(slot, Outcome("failed", cause=f"{type(exc).__name__}: {exc}"))
                continue
            refused = None if slot.stop_status == "cancelled" else self._create(slot, job)
            if refused is not None:
                self._delete_job(slot.job)  # a create may have worked after all
                self._finish_now(slot, Outcome("failed", cause=refused))
                continue
            with self._lock:
                cancelled = slot.stop_status == "cancelled"  # while it was being made
            if cancelled and self._delete_job(slot.job):
                self._finish_now(slot, Outcome("cancelled", cause="cancelled"))

    def cancel(self, run_id: str) -> None:
        """Delete the attempt's Job with its pods (a cancel overrides a preemption); it
        is reported cancelled once the delete is done. Cancelled while being submitted,
        it is never created, or deleted as soon as it is."""
        slot = self._stop(run_id, "cancelled", "cancelled")
        if slot is None or not slot.created:
            return
        if self._delete_job(slot.job):
            self._finish_now(slot, Outcome("cancelled", cause="cancelled"))

    def preempt(self, run_id: str, cause: str, grace_s: float) -> None:
        slot = self._stop(run_id, cause, "preempted")
        if slot is None:
            return
        from kubernetes.client.exceptions import ApiException

        grace = max(1, round(grace_s))
        try:
            pods = self.core.list_namespaced_pod(
                self.kube.namespace, label_selector=f"job-name={slot.job}"
            ).items
            for pod in pods:
                with contextlib.suppress(ApiException):
                    self.core.delete_namespaced_pod(pod.metadata.name, self.kube.namespace,
                                                    grace_period_seconds=grace)  # fmt: skip
        except ApiException as exc:
            _log.warning("kiln: could not preempt %s: %s", slot.job, exc.reason)
        if not slot.started:  # nothing runs yet: its Job goes, and it ends now
            self._delete_job(slot.job)

    def reserve(self, lease_id: str, resources: Resources, priority: int, granted: Grant) -> None:
        raise ConfigError(
            "KILN_BACKEND",
            "replica processes run on the local engine only: endpoints on Kubernetes are "
            "Deployments (kiln serve --backend kubernetes); run batch jobs with "
            "KILN_BACKEND=local",
        )

    def release(self, lease_id: str) -> None:
        """Nothing is reserved on this engine."""

    def figures(self) -> Figures:
        with self._lock:
            running = [s.spec.resources for s in self._slots.values() if s.started]
            return Figures(
                queued=len(self._slots) - len(running),
                running=len(running),
                resources=inventory_pools(
                    self.inventory, sum(r.cpu for r in running),
                    sum(r.memory_bytes for r in running), sum(r.gpu for r in running),
                ),
                worker_starts=self._tally.worker_starts,
                finished=dict(self._tally.finished),
                failures=dict(self._tally.failures),
            )  # fmt: skip

    def close(self) -> None:
        """Stop watching; Jobs still running are deleted and reported cancelled."""
        self._closing.set()
        for watch in list(self._watches):
            watch.stop()
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
        for slot in slots:
            self._delete_job(slot.job)
        if slots:
            self.report([Finished(s.spec.run_id, s.spec.attempt,
                                  Outcome("cancelled", cause="the engine shut down"))
                         for s in slots])  # fmt: skip
        for thread in self._threads:
            thread.join(timeout=5)

    # -- submitting ------------------------------------------------------------------

    def _job(self, spec: TaskSpec) -> Any:
        """The Job of ``spec``, its task stored first (without the driver's token, paths
        or interpreter: the pod has its own)."""
        store = {k: v for k, v in spec.store.items() if k in _SHIPPED}  # never a secret
        shipped = dataclasses.replace(spec, store=store, sys_path=(), cwd="", python=None,
                                      env_lock=None)  # fmt: skip
        sha = self.put(cloudpickle.dumps(shipped))
        return render_job(spec, sha, self.kube, server_url=self.server_url,
                          project=self.project)  # fmt: skip

    def _create(self, slot: _Slot, job: Any) -> str | None:
        """Create the Job, or adopt the one of this attempt that exists already; the
        cause if neither can be done."""
        from kubernetes.client.exceptions import ApiException

        for attempt in range(CREATE_TRIES):
            try:
                self.batch.create_namespaced_job(self.kube.namespace, job)
            except ApiException as exc:
                if exc.status == 409:
                    try:
                        return self._adopt(slot)
                    except ApiException as gone:
                        if gone.status != 404:  # 404: deleted since; create it again
                            return f"could not read the Job {slot.job}: {_reason(gone)}"
                elif exc.status and exc.status < 500 and exc.status != 429:
                    return f"Kubernetes refused the Job {slot.job}: {_reason(exc)}"
            except Exception as exc:  # the connection: the Job may or may not exist now
                _log.warning("kiln: creating Job %s: %s; trying again", slot.job, exc)
            else:
                with self._lock:
                    slot.created = time.monotonic()
                return None
            if attempt + 1 < CREATE_TRIES:
                time.sleep(RETRY_S[attempt])
        return f"could not create the Job {slot.job} after {CREATE_TRIES} tries"

    def _adopt(self, slot: _Slot) -> str | None:
        found = self.batch.read_namespaced_job(slot.job, self.kube.namespace)
        labels = found.metadata.labels or {}
        if labels.get(RUN_LABEL) != slot.spec.run_id or labels.get(ATTEMPT_LABEL) != str(
            slot.spec.attempt
        ):
            return f"a Job named {slot.job} exists and is not this run's"
        with self._lock:
            slot.created = time.monotonic()
        self._consider("jobs", "ADDED", found)  # it may have ended already
        return None

    def _stop(self, run_id: str, cause: str, status: str) -> _Slot | None:
        """Mark the run's attempt stopped: a cancel overrides anything but a cancel, a
        preemption only what was not stopped yet."""
        with self._lock:
            for slot in self._slots.values():
                if slot.spec.run_id != run_id or slot.stop_status == "cancelled":
                    continue
                if status == "cancelled" or slot.stop_cause is None:
                    slot.stop_cause, slot.stop_status = cause, status
                    return slot
        return None

    def _delete_job(self, name: str) -> bool:
        """Delete the Job and its pods; whether it is gone."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.delete_namespaced_job(name, self.kube.namespace,
                                             propagation_policy="Background")  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:
                return True
            _log.warning("kiln: could not delete Job %s: %s", name, _reason(exc))
            return False
        except Exception as exc:
            _log.warning("kiln: could not delete Job %s: %s", name, exc)
            return False
        return True

    def _finish_now(self, slot: _Slot, outcome: Outcome) -> bool:
        """Report ``outcome`` as the slot's end, unless it was reported already."""
        with self._report_lock:
            with self._lock:
                if self._slots.pop(slot.job, None) is None:
                    return False
                self._tally.ended(outcome.status)
            self.report([Finished(slot.spec.run_id, slot.spec.attempt, outcome)])
        return True

    # -- watching --------------------------------------------------------------------

    def _follow(self, kind: str) -> None:
        """List, then watch from the list's version; on 410 Gone, a disconnect or the
        watch's end, list again (what changed meanwhile is in the list)."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        lister = (self.batch.list_namespaced_job if kind == "jobs"
                  else self.core.list_namespaced_pod)  # fmt: skip
        errors = 0
        while not self._closing.is_set():
            try:
                began = time.monotonic()
                listed = lister(self.kube.namespace, label_selector=SELECTOR)
                self._listed(kind, listed.items, began)
                stream = watch.Watch()  # type: ignore[no-untyped-call]
                self._watches.append(stream)
                try:
                    for event in stream.stream(  # type: ignore[no-untyped-call]
                        lister, self.kube.namespace, label_selector=SELECTOR,
                        resource_version=listed.metadata.resource_version,
                        timeout_seconds=WATCH_S, allow_watch_bookmarks=True,
                    ):  # fmt: skip
                        errors = 0
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            self._consider(kind, event["type"], event["object"])
                        if self._closing.is_set():
                            break
                finally:
                    self._watches.remove(stream)
            except ApiException as exc:
                if exc.status != 410:  # Gone: the version is too old, so list again now
                    errors += 1
                    _log.warning("kiln: watching %s: %s", kind, _reason(exc))
            except Exception as exc:  # a disconnect, a reset: list again, after a pause
                errors += 1
                _log.warning("kiln: watching %s: %s", kind, exc)
            if errors:
                self._closing.wait(RETRY_S[min(errors, len(RETRY_S)) - 1])

    def _listed(self, kind: str, items: list[Any], began: float) -> None:
        for item in items:
            self._consider(kind, "ADDED", item)
        if kind != "jobs":
            return
        present = {item.metadata.name for item in items}
        with self._lock:  # made before this list began, and absent from it: deleted
            gone = [s for s in self._slots.values()
                    if s.created and s.created < began and s.job not in present]  # fmt: skip
        for slot in gone:
            self._finish(slot, None)

    def _consider(self, kind: str, event: str, obj: Any) -> None:
        labels = (obj.metadata.labels or {}) if obj.metadata else {}
        attempt = labels.get(ATTEMPT_LABEL, "")
        if not (attempt.isascii() and attempt.isdigit()):
            return  # not one of Kiln's (labels anyone can write): never a reason to stop
        name = job_name(labels.get(RUN_LABEL, ""), int(attempt))
        with self._lock:
            slot = self._slots.get(name)
        if slot is None:
            return  # another driver's, or one that has ended
        if kind == "pods":
            self._pod(slot, event, obj)
            return
        status = obj.status
        conditions = {c.type: c for c in (status.conditions or [])} if status else {}
        for kind_ in ("Complete", "Failed"):
            if kind_ in conditions and conditions[kind_].status == "True":
                self._ended(slot, obj)
                return
        if event == "DELETED":
            self._finish(slot, None)

    def _ended(self, slot: _Slot, job: Any) -> None:
        """The Job is over. Its pod's last state says how, and the pods' watch may not
        have brought it yet: finish now if it is here, else once it comes, or after
        POD_GRACE_S with what is known."""
        slot.ended = job
        if not _final(slot):
            slot.pod = self._last_pod(slot.job) or slot.pod
        if _final(slot) or slot.pod is None:
            self._finish(slot, job)
            return
        timer = threading.Timer(POD_GRACE_S, self._finish, args=(slot, job))
        timer.daemon = True
        timer.start()

    def _pod(self, slot: _Slot, event: str, pod: Any) -> None:
        slot.pod = pod
        slot.pod_gone = slot.pod_gone or event == "DELETED"
        if slot.ended is not None and _final(slot):
            self._finish(slot, slot.ended)
            return
        status = pod.status
        statuses = (status.container_statuses or []) if status is not None else []
        stuck = self._stuck(slot, statuses)
        if stuck is not None:
            slot.stop_cause = stuck
            if self._delete_job(slot.job):
                self._finish_now(slot, Outcome("failed", cause=stuck))
            return
        running = status is not None and (
            status.phase in ("Running", "Succeeded", "Failed")
            and any(c.state and (c.state.running or c.state.terminated) for c in statuses)
        )
        if not running or event == "DELETED":
            return
        with self._report_lock:  # so that no Finished of it can be reported before this
            with self._lock:
                if slot.started or self._slots.get(slot.job) is not slot:
                    return
                slot.started = True
                self._tally.worker_starts += 1
            assigned = {"job": slot.job, "pod": pod.metadata.name,
                        "node": pod.spec.node_name if pod.spec else None}  # fmt: skip
            self.report([Started(slot.spec.run_id, slot.spec.attempt, assigned)])

    def _stuck(self, slot: _Slot, statuses: list[Any]) -> str | None:
        """Why the pod will never start on its own (its Secret or image is wrong), if so."""
        for container in statuses:
            waiting = container.state.waiting if container.state else None
            if waiting is None or slot.stop_cause is not None:
                continue
            waited = time.monotonic() - slot.created if slot.created else 0.0
            if waiting.reason in _NEVER_STARTS or (
                waiting.reason in _PULL and waited > self.kube.startup_s
            ):
                said = f": {waiting.message}" if waiting.message else ""
                return f"its pod could not start ({waiting.reason}){said}"[:1000]
        return None

    def _finish(self, slot: _Slot, job: Any) -> None:
        """Report the attempt's end once: from its pod's account, else Kubernetes'."""
        with self._lock:
            if self._slots.get(slot.job) is not slot:
                return
        outcome = _outcome(slot, job, self.fetch)
        with self._report_lock:
            with self._lock:
                if self._slots.pop(slot.job, None) is None:
                    return
                self._tally.ended(outcome.status)
            events: list[TaskEvent] = []
            if not slot.started and slot.pod is not None and _terminated(slot.pod) is not None:
                assigned = {"job": slot.job, "pod": slot.pod.metadata.name}
                events.append(Started(slot.spec.run_id, slot.spec.attempt, assigned))
            events.append(Finished(slot.spec.run_id, slot.spec.attempt, outcome))
            self.report(events)

    def _last_pod(self, job: str) -> Any:
        try:
            pods = self.core.list_namespaced_pod(
                self.kube.namespace, label_selector=f"job-name={job}"
            ).items
        except Exception:
            return None
        return max(pods, key=lambda p: p.metadata.creation_timestamp or 0, default=None)


def connect() -> tuple[Any, Any]:
    """``BatchV1Api`` and ``CoreV1Api`` for the kubeconfig's cluster, or this pod's."""
    from kiln._optional import require

    require("kubernetes", extra="kubernetes")
    from kubernetes import client, config

    try:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    except Exception as outside:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            raise ConfigError(
                "KUBECONFIG", f"no cluster to run on: {outside}; point KUBECONFIG at one"
            ) from None
    return client.BatchV1Api(), client.CoreV1Api()


def _reason(exc: Any) -> str:
    try:
        return str(json.loads(exc.body)["message"])[:500]
    except Exception:
        return f"{exc.status} {exc.reason}"


def _final(slot: _Slot) -> bool:
    """Whether the slot's pod is known to have ended: exited, failed or deleted."""
    pod = slot.pod
    if pod is None:
        return False
    return (
        slot.pod_gone
        or _terminated(pod) is not None
        or (pod.status is not None and pod.status.phase in ("Succeeded", "Failed"))
    )


def _terminated(pod: Any) -> Any:
    for status in (pod.status.container_statuses or []) if pod.status else []:
        if status.state is not None and status.state.terminated is not None:
            return status.state.terminated
    return None


def _outcome(slot: _Slot, job: Any, fetch: Callable[[str], bytes]) -> Outcome:
    """How the attempt ended, from what its pod wrote, its pod's state, and its Job."""
    if slot.stop_status == "cancelled":
        return Outcome("cancelled", cause=slot.stop_cause)
    conditions = {c.type: c for c in ((job.status.conditions or []) if job and job.status
                                      else [])}  # fmt: skip
    complete = "Complete" in conditions and conditions["Complete"].status == "True"
    terminated = _terminated(slot.pod) if slot.pod is not None else None
    said = _account(terminated.message if terminated else None)
    if said is not None:
        try:
            reply = json.loads(fetch(said["reply"]))
        except Exception as exc:
            return Outcome("failed", cause=f"its reply could not be read: {exc}")
        result = reply.get("result")
        status = reply.get("status") if complete or reply.get("status") != "succeeded" else None
        cause = reply.get("cause")
        if slot.stop_status == "preempted" and status != "succeeded":
            status, cause = "preempted", slot.stop_cause
        if status in ("succeeded", "failed", "preempted"):
            return Outcome(
                status, result=base64.b64decode(result) if result else None,
                error=reply.get("error"), cause=cause, usage=reply.get("usage") or {},
                environment=reply.get("environment"),
            )  # fmt: skip
    if slot.stop_status == "preempted":
        return Outcome("preempted", cause=slot.stop_cause)
    return Outcome("failed", cause=_cause(slot, job, terminated))


def _account(message: str | None) -> dict[str, Any] | None:
    """A pod's termination message, if it is the task's own account (else it is the
    tail of its log, written by Kubernetes)."""
    if not message:
        return None
    try:
        said = json.loads(message)
    except ValueError:
        return None
    if (
        not isinstance(said, dict)
        or said.get("kiln") != 1
        or not isinstance(said.get("reply"), str)
    ):
        return None
    return said


def _cause(slot: _Slot, job: Any, terminated: Any) -> str:
    """Why an attempt failed without its own account, in Kubernetes' words."""
    pod = slot.pod
    if pod is not None and pod.status is not None:
        status = pod.status
        if status.reason == "Evicted":
            return f"pod evicted: {status.message or 'by the kubelet'}"
        for condition in status.conditions or []:
            if condition.type == "DisruptionTarget" and condition.status == "True":
                if condition.reason == "DeletionByTaintManager":
                    return f"node lost: {condition.message or pod.spec.node_name}"
                return f"pod disrupted ({condition.reason}): {condition.message or ''}".rstrip(": ")
        if terminated is not None:
            if terminated.reason == "OOMKilled":
                return f"killed for memory (OOMKilled, exit {terminated.exit_code})"
            tail = (terminated.message or "").strip().splitlines()[-3:]
            said = f": {' | '.join(tail)[:500]}" if tail else ""
            return f"container exited {terminated.exit_code} ({terminated.reason}){said}"
    conditions = {c.type: c for c in ((job.status.conditions or []) if job and job.status
                                      else [])}  # fmt: skip
    failed = conditions.get("Failed")
    if failed is not None and failed.reason == "DeadlineExceeded":
        deadline = job.spec.active_deadline_seconds if job.spec else None
        return f"timed out: its Job's activeDeadlineSeconds ({deadline}s) passed"
    if failed is not None:
        return f"its Job failed ({failed.reason}): {failed.message or ''}".rstrip(": ")
    if job is None:
        return f"its Job {slot.job} was deleted outside Kiln"
    return f"its Job {slot.job} ended without a pod's account"
