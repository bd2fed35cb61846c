"""Kubernetes objects for Kiln's work, typed with the official client's models.

Nothing here talks to a cluster: it turns a task (or, in :mod:`kiln.serve.on_kubernetes`,
an endpoint) into ``kubernetes.client`` objects, so that what ``kiln k8s render`` prints
is exactly what the engine applies. Settings come from the environment:

=========================  ===============  ============================================
variable                   default          meaning
=========================  ===============  ============================================
KILN_K8S_NAMESPACE         ``default``      where Jobs, Deployments and Services are made
KILN_K8S_IMAGE             none (required)  the pods' image: Python, ``kiln[server]``, uv
KILN_K8S_SERVICE_ACCOUNT   the namespace's  the pods' service account
KILN_K8S_TOKEN_SECRET      ``kiln-token``   a Secret whose ``token`` key is the Kiln token
                                            pods record with
KILN_K8S_QUEUE             none             Kueue's LocalQueue (``kueue.x-k8s.io/queue-name``)
KILN_K8S_PRIORITY_CLASS    none             Kueue's WorkloadPriorityClass
KILN_K8S_GPU_SHARING       none             how a fraction of a GPU is asked for:
                                            ``time-slicing[:RESOURCE]`` or ``mig:PROFILE``;
                                            none: fractions are refused
KILN_K8S_ENV_CACHE         none             a PersistentVolumeClaim keeping built envs
KILN_K8S_STARTUP_S         600              seconds a pod may take to start (image pull,
                                            env build), on top of a timeout
KILN_K8S_TTL_S             3600             seconds a finished Job is kept
=========================  ===============  ============================================

A task's Job runs ``python -m kiln._k8s_task``: it fetches the task from the team
server's blob store by its sha256 (named in the Job), builds the task's env from its
recorded lock, runs the function as every engine's worker does, and records through
``KILN_SERVER`` with the Secret's token. Names come from the run id and attempt
(``kiln-<run id>-<attempt>``), so the same attempt never makes two Jobs.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kiln.compute import _threads
from kiln.compute.resources import Inventory, Resources
from kiln.errors import ConfigError, ValidationError

if TYPE_CHECKING:
    from kiln.compute.backends.base import TaskSpec

MANAGED_BY = "app.kubernetes.io/managed-by"
RUN_LABEL = "kiln.dev/run-id"
ATTEMPT_LABEL = "kiln.dev/attempt"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # a label, as Kueue reads it, never an annotation
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
SELECTOR = f"{MANAGED_BY}=kiln,{RUN_LABEL}"  # every task object Kiln made, with a run
TERMINATION_LOG = "/dev/termination-log"
HOME = "/var/kiln/home"  # a pod's KILN_HOME: its blob cache and spool
ENVS = "/var/kiln/envs"  # where a pod builds envs (the cache volume, if one is set)
_LABEL_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # DNS-1123 label
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_MIG = re.compile(r"[1-9]g\.[0-9]+gb(\+me)?")
_RESOURCE = re.compile(r"[a-z0-9.-]+/[A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class KubeSettings:
    """The ``KILN_K8S_*`` variables, checked (see the module docstring)."""

    namespace: str = "default"
    image: str | None = None
    service_account: str | None = None
    token_secret: str = "kiln-token"  # noqa: S105  a Secret's name, not a secret
    queue: str | None = None
    priority_class: str | None = None
    gpu_sharing: str | None = None
    env_cache: str | None = None
    startup_s: int = 600
    ttl_s: int = 3600

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KubeSettings:
        env = os.environ if environ is None else environ

        def name(var: str, pattern: re.Pattern[str] = _LABEL_NAME) -> str | None:
            value = env.get(var) or None
            if value is not None and not pattern.fullmatch(value):
                rule = ("lower-case letters, digits and '-', at most 63" if pattern is _LABEL_NAME
                        else "lower-case letters, digits, '-' and '.', at most 253")  # fmt: skip
                raise ConfigError(var, f"{value[:80]!r} is not a Kubernetes name ({rule})")
            return value

        def seconds(var: str, default: int) -> int:
            value = env.get(var) or str(default)
            if not re.fullmatch(r"[0-9]{1,8}", value) or not 0 < int(value) <= 10**7:
                raise ConfigError(var, f"{value[:40]!r} is not a number of seconds (1 to 10^7)")
            return int(value)

        image = env.get("KILN_K8S_IMAGE") or None
        if image is not None and (len(image) > 512 or not re.fullmatch(r"[\w./:@+-]+", image)):
            raise ConfigError("KILN_K8S_IMAGE", f"{image[:80]!r} is not an image reference")
        sharing = env.get("KILN_K8S_GPU_SHARING") or None
        if sharing is not None:
            gpu_resource(0.5, sharing)  # refuses a malformed value now, naming the variable
        return cls(
            namespace=name("KILN_K8S_NAMESPACE") or "default",
            image=image,
            service_account=name("KILN_K8S_SERVICE_ACCOUNT", _SUBDOMAIN),
            token_secret=name("KILN_K8S_TOKEN_SECRET", _SUBDOMAIN) or "kiln-token",
            queue=name("KILN_K8S_QUEUE"),
            priority_class=name("KILN_K8S_PRIORITY_CLASS"),  # a label's value: 63 at most
            gpu_sharing=sharing,
            env_cache=name("KILN_K8S_ENV_CACHE", _SUBDOMAIN),
            startup_s=seconds("KILN_K8S_STARTUP_S", 600),
            ttl_s=seconds("KILN_K8S_TTL_S", 3600),
        )

    def require_image(self) -> str:
        if self.image is None:
            raise ConfigError(
                "KILN_K8S_IMAGE", "is unset: name the image pods run, one with Python, "
                "kiln[server] and uv (e.g. registry.example/team/kiln:1)",
            )  # fmt: skip
        return self.image


def gpu_resource(gpu: float, sharing: str | None) -> tuple[str, int] | None:
    """The extended resource and count a GPU request asks the cluster for.

    Whole GPUs are ``nvidia.com/gpu``. A fraction needs a cluster that shares GPUs:
    ``time-slicing`` asks for one slice of a time-sliced GPU (``nvidia.com/gpu.shared``,
    the NVIDIA device plugin's name with ``renameByDefault``; ``time-slicing:RESOURCE``
    names another), ``mig:PROFILE`` for one MIG device (``nvidia.com/mig-1g.18gb``).
    Either way a fraction gets one share, whatever its size: the cluster's
    configuration, not the request, sets how large a share is.
    """
    if gpu <= 0:
        return None
    if gpu >= 1:
        return "nvidia.com/gpu", int(gpu)
    if sharing is None:
        raise ValidationError(
            "gpu", f"{gpu:g} of a GPU cannot be asked of this cluster: it offers no GPU "
            "sharing; ask for a whole GPU, or set KILN_K8S_GPU_SHARING",
            allowed="time-slicing, time-slicing:RESOURCE, mig:PROFILE (e.g. mig:1g.18gb)",
        )  # fmt: skip
    kind, _, arg = sharing.partition(":")
    if kind == "time-slicing" and (not arg or _RESOURCE.fullmatch(arg)):
        return arg or "nvidia.com/gpu.shared", 1
    if kind == "mig" and _MIG.fullmatch(arg):
        return f"nvidia.com/mig-{arg}", 1
    raise ConfigError(
        "KILN_K8S_GPU_SHARING",
        f"{sharing[:80]!r} is not time-slicing, time-slicing:RESOURCE or mig:PROFILE "
        "(a profile such as 1g.18gb)",
    )


@dataclass(frozen=True, slots=True)
class KubeInventory(Inventory):
    """A cluster's nodes as an inventory, refusing what the cluster cannot give at all
    (a fraction of a GPU where it shares none) before anything is recorded."""

    gpu_sharing: str | None = None

    def check(self, request: Resources) -> None:
        gpu_resource(request.gpu, self.gpu_sharing)
        if 0 < request.gpu < 1:  # a share of the cluster's kind, not a nvidia.com/gpu
            request = Resources(request.cpu, request.memory_bytes, 0.0)
        if self.nodes:
            Inventory.check(self, request)


def job_name(run_id: str, attempt: int) -> str:
    """The Job of one attempt of one run: the same name every time it is submitted."""
    return f"kiln-{run_id}-{attempt}"


def cpu_quantity(cpu: float) -> str:
    millis = math.ceil(cpu * 1000)
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def requirements(resources: Resources, sharing: str | None) -> Any:
    """Requests and limits alike (Kueue counts requests; a limit keeps a pod to them)."""
    from kubernetes import client

    asked: dict[str, str] = {"cpu": cpu_quantity(max(resources.cpu, 0.001))}
    if resources.memory_bytes:
        asked["memory"] = f"{math.ceil(resources.memory_bytes / 2**20)}Mi"
    gpu = gpu_resource(resources.gpu, sharing)
    if gpu is not None:
        asked[gpu[0]] = str(gpu[1])
    return client.V1ResourceRequirements(requests=dict(asked), limits=dict(asked))


def security_context() -> Any:
    """What the pod needs and no more: no privilege escalation, no capabilities, the
    runtime's seccomp profile (the restricted Pod Security Standard, but for the user
    the image runs as, which is the image's to choose)."""
    from kubernetes import client

    return client.V1SecurityContext(
        allow_privilege_escalation=False,
        capabilities=client.V1Capabilities(drop=["ALL"]),
        seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
    )


def server_env(kube: KubeSettings, server_url: str, project: str | None) -> list[Any]:
    """How a pod reaches the team server: its URL, the project, and the token from the
    Secret (never written into the object itself)."""
    from kubernetes import client

    env = [
        client.V1EnvVar(name="KILN_SERVER", value=server_url),
        client.V1EnvVar(name="KILN_TOKEN", value_from=client.V1EnvVarSource(
            secret_key_ref=client.V1SecretKeySelector(name=kube.token_secret, key="token"))),
        client.V1EnvVar(name="KILN_HOME", value=HOME),
        client.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
    ]  # fmt: skip
    if project:
        env.append(client.V1EnvVar(name="KILN_PROJECT", value=project))
    return env


def volumes(kube: KubeSettings) -> tuple[list[Any], list[Any]]:
    """The pod's scratch home, and its env folder (the cache claim, if one is set)."""
    from kubernetes import client

    if kube.env_cache:
        claim = client.V1PersistentVolumeClaimVolumeSource(claim_name=kube.env_cache)
        envs = client.V1Volume(name="envs", persistent_volume_claim=claim)
    else:
        envs = client.V1Volume(name="envs", empty_dir=client.V1EmptyDirVolumeSource())
    home = client.V1Volume(name="home", empty_dir=client.V1EmptyDirVolumeSource())
    mounts = [client.V1VolumeMount(name="home", mount_path=HOME),
              client.V1VolumeMount(name="envs", mount_path=ENVS)]  # fmt: skip
    return [home, envs], mounts


def queue_labels(kube: KubeSettings) -> dict[str, str]:
    labels = {}
    if kube.queue:
        labels[QUEUE_LABEL] = kube.queue
    if kube.priority_class:
        labels[PRIORITY_LABEL] = kube.priority_class
    return labels


def render_job(
    spec: TaskSpec, task_sha256: str, kube: KubeSettings, *, server_url: str,
    project: str | None,
) -> Any:  # fmt: skip
    """The Job of one attempt (see the module docstring); ``task_sha256`` names the
    task's payload in the server's blob store."""
    from kubernetes import client

    name = job_name(spec.run_id, spec.attempt)
    labels = {MANAGED_BY: "kiln", RUN_LABEL: spec.run_id, ATTEMPT_LABEL: str(spec.attempt)}
    threads = spec.threads or _threads.thread_env(spec.resources.cpu, {})
    env = [
        *server_env(kube, server_url, project),
        client.V1EnvVar(name="KILN_TASK", value=task_sha256),
        client.V1EnvVar(name="KILN_ENVS", value=ENVS),
        *(client.V1EnvVar(name=k, value=v) for k, v in sorted(threads.items())),
    ]
    pod_volumes, mounts = volumes(kube)
    container = client.V1Container(
        name="task",
        image=kube.require_image(),
        command=["python", "-m", "kiln._k8s_task"],
        env=env,
        resources=requirements(spec.resources, kube.gpu_sharing),
        volume_mounts=mounts,
        security_context=security_context(),
        termination_message_path=TERMINATION_LOG,
        # A pod that dies before it could write its account leaves its last log lines.
        termination_message_policy="FallbackToLogsOnError",
    )
    deadline = None
    if spec.timeout_s is not None:  # the function's own timeout is held in the pod, from
        deadline = math.ceil(spec.timeout_s) + kube.startup_s  # its call; this bounds the rest
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(
            name=name,
            namespace=kube.namespace,
            labels={**labels, **queue_labels(kube)},
            annotations={"kiln.dev/task-sha256": task_sha256, "kiln.dev/app": spec.app[:200]},
        ),
        spec=client.V1JobSpec(
            backoff_limit=0,  # retries are Kiln's, as new attempts with their own Jobs
            active_deadline_seconds=deadline,
            ttl_seconds_after_finished=kube.ttl_s,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[container],
                    volumes=pod_volumes,
                    service_account_name=kube.service_account,
                    automount_service_account_token=False,  # a task never calls the API
                    termination_grace_period_seconds=30,
                ),
            ),
        ),
    )


def plain(obj: Any) -> dict[str, Any]:
    """A client object as the JSON the API server receives (camelCase, no nulls)."""
    from kubernetes import client

    return client.ApiClient().sanitize_for_serialization(obj)  # type: ignore[no-untyped-call,no-any-return]


def cluster_inventory(core: Any, sharing: str | None) -> KubeInventory:
    """The schedulable nodes' allocatable resources; a cluster whose nodes Kiln may not
    list (no RBAC for it) is taken as unbounded: its scheduler and Kueue decide."""
    from kubernetes.client.exceptions import ApiException

    try:
        nodes = core.list_node().items
    except ApiException as exc:
        if exc.status not in (401, 403):
            raise
        return KubeInventory(math.inf, 2**62, tuple(range(4096)), gpu_sharing=sharing)
    each = []
    for node in nodes:
        if node.spec is not None and node.spec.unschedulable:
            continue
        alloc = (node.status.allocatable if node.status else None) or {}
        gpus = int(alloc.get("nvidia.com/gpu", "0") or 0)
        cpu, memory = parse_cpu(alloc.get("cpu", "0")), parse_bytes(alloc.get("memory", "0"))
        each.append(Inventory(cpu, memory, tuple(range(gpus))))
    return KubeInventory(
        sum(n.cpu for n in each), sum(n.memory_bytes for n in each),
        tuple(range(sum(len(n.gpus) for n in each))), nodes=tuple(each), gpu_sharing=sharing,
    )  # fmt: skip


def parse_cpu(value: str) -> float:
    try:
        return int(value[:-1]) / 1000 if value.endswith("m") else float(value)
    except ValueError:
        return 0.0


_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
           "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "m": 10**-3}  # fmt: skip


def parse_bytes(value: str) -> int:
    """A Kubernetes quantity of bytes (``32Gi``, ``1e9``, ``128974848000m``); 0 if it
    is none of those."""
    for suffix, factor in _SUFFIX.items():
        if value.endswith(suffix):
            value, scale = value[: -len(suffix)], factor
            break
    else:
        scale = 1
    try:
        return int(float(value) * scale)
    except ValueError:
        return 0
