"""Endpoints on Kubernetes: ``kiln serve FILE:CLASS --backend kubernetes``.

Each model version the endpoint routes to is a Deployment of its own,
``<endpoint>-v<N>``, with a Service of that name and a HorizontalPodAutoscaler. Its
pods run ``kiln serve MODULE:CLASS --model NAME:N --replicas 1``: the same front door
and replica code as on one machine (validation, ``predict``, the request's span with
its OpenInference and ``kiln.*`` attributes, written to the team server), pinned to
that version; the autoscaler adds pods between ``min_replicas`` (at least 1:
Kubernetes' autoscaler does not scale to zero) and ``max_replicas``. It scales on

* ``cpu`` (the default, ``KILN_K8S_HPA=cpu``): 70% of the requested CPU, which every
  cluster with metrics-server serves;
* ``inflight`` (``KILN_K8S_HPA=inflight``): the pods' ``kiln_inflight_requests``
  gauge, averaging ``target_concurrency``, where a custom metrics adapter (such as
  prometheus-adapter) serves that metric as a Pods metric.

A router, the Deployment and Service ``<endpoint>`` (``python -m
kiln.serve.on_kubernetes``), takes the endpoint's traffic: it follows the alias and
the live split in the record as a local front door does, and sends each request to
a version's Service by weight (smooth weighted round robin), only to versions whose
pods answer ``/readyz``; so when the alias moves, traffic moves once the new
version is ready. The process that ran ``kiln serve`` applies the version objects:
a new target's before the router can move to it, and a retired version's are
deleted :data:`DRAIN_S` after the router left it.

The image (``KILN_K8S_IMAGE``) must hold the endpoint's code (its module is imported
by name in the pods) and ``kiln[serve,server]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiln.compute.kube import (
    ENVS,
    MANAGED_BY,
    KubeSettings,
    plain,
    requirements,
    security_context,
    server_env,
    volumes,
)
from kiln.compute.resources import Resources
from kiln.errors import ConfigError, ValidationError

if TYPE_CHECKING:
    from kiln.config import Settings
    from kiln.record.store.base import KilnStore
    from kiln.serve.endpoint import Endpoint, EndpointSpec

PORT = 8000
POLL_S = 2.0  # how often the router and the controller look at the record
DRAIN_S = 30.0  # a retired version's pods outlive the router's move by this long
MAX_BODY = 32 * 2**20
ENDPOINT_LABEL = "kiln.dev/endpoint"
VERSION_LABEL = "kiln.dev/version"
_HPA = ("cpu", "inflight")


def hpa_metric(environ: Any = None) -> str:
    value = (os.environ if environ is None else environ).get("KILN_K8S_HPA") or "cpu"
    if value not in _HPA:
        raise ConfigError("KILN_K8S_HPA", f"{value[:40]!r} is not one of {', '.join(_HPA)}")
    return value


def _name(endpoint: str) -> str:
    """An endpoint's name as a Kubernetes name: lower case, a letter first, runs of
    anything else as one '-', and a hash of the name when any of that changed it or it
    was cut, so two endpoints never share objects. It never holds '--'."""
    cleaned = re.sub(r"[^a-z0-9]+", "-", endpoint.lower()).strip("-")
    if not cleaned[:1].isalpha():
        cleaned = f"e-{cleaned}".rstrip("-")
    if cleaned != endpoint or len(cleaned) > 40:
        digest = hashlib.sha256(endpoint.encode()).hexdigest()[:6]
        cleaned = f"{cleaned[:40].rstrip('-')}-{digest}"
    return cleaned


def version_name(endpoint: str, version: int) -> str:
    """A version's objects: ``<endpoint>--v<N>`` ('--' is in no endpoint's own name)."""
    return f"{_name(endpoint)}--v{version}"


def _probe(path: str, failures: int = 3) -> Any:
    from kubernetes import client

    return client.V1Probe(http_get=client.V1HTTPGetAction(path=path, port=PORT),
                          period_seconds=5, failure_threshold=failures)  # fmt: skip


def _deployment(
    name: str, labels: dict[str, str], container: Any, kube: KubeSettings, replicas: int | None
) -> Any:
    from kubernetes import client

    pod_volumes, mounts = volumes(kube)
    container.volume_mounts = mounts
    return client.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=client.V1ObjectMeta(name=name, namespace=kube.namespace, labels=labels),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    containers=[container], volumes=pod_volumes,
                    service_account_name=kube.service_account,
                    automount_service_account_token=False,
                ),
            ),
        ),
    )  # fmt: skip


def _service(name: str, labels: dict[str, str], kube: KubeSettings, port: int) -> Any:
    from kubernetes import client

    return client.V1Service(
        api_version="v1",
        kind="Service",
        metadata=client.V1ObjectMeta(name=name, namespace=kube.namespace, labels=labels),
        spec=client.V1ServiceSpec(selector=labels, ports=[client.V1ServicePort(
            name="http", port=port, target_port=PORT)]),
    )  # fmt: skip


def render_version(
    endpoint: Endpoint[Any], version: int, kube: KubeSettings, *, server_url: str,
    project: str | None, metric: str = "cpu",
) -> list[Any]:  # fmt: skip
    """A version's Deployment, Service and HorizontalPodAutoscaler."""
    from kubernetes import client

    spec, source = endpoint.spec, endpoint.source
    name = version_name(spec.name, version)
    labels = {MANAGED_BY: "kiln", ENDPOINT_LABEL: _name(spec.name), VERSION_LABEL: str(version)}
    container = client.V1Container(
        name="replica",
        image=kube.require_image(),
        command=["kiln", "serve", f"{source.module}:{source.qualname}", "--host", "0.0.0.0",  # noqa: S104
                 "--port", str(PORT), "--model", f"{spec.model_name}:{version}",
                 "--replicas", "1", "--backend", "local"],
        # its env is built in its cache (the volume) before it serves
        env=[*server_env(kube, server_url, project),
             client.V1EnvVar(name="KILN_CACHE", value=ENVS)],
        ports=[client.V1ContainerPort(container_port=PORT, name="http")],
        resources=requirements(spec.resources, kube.gpu_sharing),
        # a replica may load a model and build an env before it answers: that long
        startup_probe=_probe("/healthz", max(3, math.ceil(kube.startup_s / 5))),
        readiness_probe=_probe("/readyz"),
        liveness_probe=_probe("/healthz"),
        security_context=security_context(),
    )  # fmt: skip
    deployment = _deployment(name, labels, container, kube, None)  # the autoscaler's to set
    if metric == "inflight":
        target = client.V2MetricSpec(type="Pods", pods=client.V2PodsMetricSource(
            metric=client.V2MetricIdentifier(name="kiln_inflight_requests"),
            target=client.V2MetricTarget(type="AverageValue",
                                         average_value=str(spec.target_concurrency))))  # fmt: skip
    else:
        target = client.V2MetricSpec(type="Resource", resource=client.V2ResourceMetricSource(
            name="cpu", target=client.V2MetricTarget(type="Utilization",
                                                     average_utilization=70)))  # fmt: skip
    hpa = client.V2HorizontalPodAutoscaler(
        api_version="autoscaling/v2",
        kind="HorizontalPodAutoscaler",
        metadata=client.V1ObjectMeta(name=name, namespace=kube.namespace, labels=labels),
        spec=client.V2HorizontalPodAutoscalerSpec(
            scale_target_ref=client.V2CrossVersionObjectReference(
                api_version="apps/v1", kind="Deployment", name=name),
            min_replicas=max(1, spec.min_replicas),
            max_replicas=max(1, spec.min_replicas, spec.max_replicas),
            metrics=[target],
        ),
    )  # fmt: skip
    return [deployment, _service(name, labels, kube, PORT), hpa]


def render_router(
    endpoint: Endpoint[Any], kube: KubeSettings, *, server_url: str, project: str | None
) -> list[Any]:
    """The router's Deployment and Service (port 80)."""
    from kubernetes import client

    spec = endpoint.spec
    name = _name(spec.name)
    labels = {MANAGED_BY: "kiln", ENDPOINT_LABEL: name, VERSION_LABEL: "router"}
    routed = {"name": spec.name, "app": spec.app, "model": spec.model, "traffic": spec.traffic,
              "upstream": f"http://{name}--v{{version}}.{kube.namespace}.svc:{PORT}"}  # fmt: skip
    container = client.V1Container(
        name="router",
        image=kube.require_image(),
        command=["python", "-m", "kiln.serve.on_kubernetes"],
        env=[*server_env(kube, server_url, project),
             client.V1EnvVar(name="KILN_ROUTE", value=json.dumps(routed, sort_keys=True))],
        ports=[client.V1ContainerPort(container_port=PORT, name="http")],
        resources=requirements(_ROUTER, None),
        readiness_probe=_probe("/readyz"),
        liveness_probe=_probe("/healthz"),
        security_context=security_context(),
    )  # fmt: skip
    return [_deployment(name, labels, container, kube, 2),
            _service(name, labels, kube, 80)]  # fmt: skip


_ROUTER = Resources(cpu=0.5, memory_bytes=256 * 2**20)  # what a router pod asks for


# -- the router (in its pods) ---------------------------------------------------------


@dataclass
class Router:
    """An ASGI app: ``POST /predict`` to a ready version by weight; ``/healthz``;
    ``/readyz`` (ready once it routes somewhere); ``GET /`` (what it routes)."""

    spec: EndpointSpec
    settings: Settings
    upstream: Callable[[int], str]
    weights: dict[int, float] = field(default_factory=dict)
    _split: Any = None
    _client: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == "/predict" and method == "POST":
            await self._predict(scope, receive, send)
        elif path == "/healthz":
            await _answer(send, 200, {"ok": True})
        elif path == "/readyz":
            ready = self._split is not None
            await _answer(send, 200 if ready else 503, {"ready": ready, "weights": self.weights})
        elif path == "/":
            await _answer(send, 200, {"endpoint": self.spec.name, "model": self.spec.model,
                                      "weights": self.weights})  # fmt: skip
        else:
            await _answer(send, 404, {"error": f"no route {path}"})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        import httpx

        await receive()
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0))
        follow = asyncio.create_task(self._follow())
        await send({"type": "lifespan.startup.complete"})
        await receive()
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        await self._client.aclose()
        await send({"type": "lifespan.shutdown.complete"})

    async def _follow(self) -> None:
        from kiln.record.recorder import recorder_for
        from kiln.serve import state
        from kiln.serve.traffic import Split

        store = recorder_for(self.settings).store
        while True:
            try:
                targets = await asyncio.to_thread(state.targets, store, self.spec,
                                                  self.settings.actor)  # fmt: skip
                ready = {v: w for v, w in targets.items() if w > 0 and await self._ready(v)}
                if ready and ready != self.weights:  # else it stays where it was
                    self.weights, self._split = ready, Split(ready)
            except Exception as exc:  # the record or a version unreachable: look again
                print(f"kiln router: {exc}", flush=True)
            await asyncio.sleep(POLL_S)

    async def _ready(self, version: int) -> bool:
        try:
            answer = await self._client.get(self.upstream(version) + "/readyz", timeout=2.0)
        except Exception:
            return False
        return bool(answer.status_code == 200)

    async def _predict(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self._split is None:
            await _answer(send, 503, {"error": "no version of the model is ready yet"})
            return
        headers = scope["headers"]
        declared = next((v for k, v in headers if k == b"content-length"), b"0")
        if not declared.isdigit() or int(declared) > MAX_BODY:
            await _answer(send, 413, {"error": "the body is over 32 MiB"})
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BODY:
                await _answer(send, 413, {"error": "the body is over 32 MiB"})
                return
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        # passed on as they came (bytes); two traceparents are none, as at a front door
        passed = [(k, v) for k, v in headers if k in (b"content-type", b"tracestate")]
        parents = [(k, v) for k, v in headers if k == b"traceparent"]
        passed += parents if len(parents) == 1 else []
        version = self._split.pick()
        try:
            answer = await self._client.post(self.upstream(version) + "/predict",
                                             content=body, headers=passed)  # fmt: skip
        except Exception as exc:
            await _answer(send, 502, {"error": f"version {version} did not answer: {exc}"})
            return
        kept = (b"content-type", b"traceparent")
        back = [(k, v) for k, v in answer.headers.raw
                if k.lower() in kept or k.lower().startswith(b"x-kiln-")]  # fmt: skip
        await send({"type": "http.response.start", "status": answer.status_code,
                    "headers": back})  # fmt: skip
        await send({"type": "http.response.body", "body": answer.content})


async def _answer(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})  # fmt: skip
    await send({"type": "http.response.body", "body": data})


def route_spec(routed: dict[str, Any]) -> EndpointSpec:
    from kiln.compute.resources import Resources
    from kiln.serve.endpoint import EndpointSpec

    return EndpointSpec(name=routed["name"], app=routed["app"], model=routed["model"],
                        resources=Resources(), traffic=routed.get("traffic"))  # fmt: skip


def main() -> None:
    """The router pod: ``KILN_ROUTE`` says what it routes (see :func:`render_router`)."""
    import uvicorn

    from kiln.config import Settings

    routed = json.loads(os.environ["KILN_ROUTE"])
    template = str(routed["upstream"])
    router = Router(route_spec(routed), Settings.from_env(),
                    lambda version: template.format(version=version))  # fmt: skip
    uvicorn.run(router, host="0.0.0.0", port=PORT, log_level="warning")  # noqa: S104  a pod


# -- the controller (where `kiln serve` ran) -------------------------------------------


def serve_on_kubernetes(endpoint: Endpoint[Any], *, block: bool = True) -> None:
    """Apply the router, then follow the record (see :class:`Controller`)."""
    from kiln.compute.backends.kubernetes import connect
    from kiln.config import Settings
    from kiln.serve.server import _say

    settings = Settings.from_env()
    if settings.server_url is None:
        raise ConfigError("KILN_SERVER", "endpoints on Kubernetes record through a team "
                          "server, which their pods reach: set KILN_SERVER")  # fmt: skip
    kube = KubeSettings.from_env()
    batch, core = connect()
    from kiln.record.recorder import recorder_for

    controller = Controller(
        endpoint, Applier(batch, core, kube.namespace), kube, recorder_for(settings).store,
        settings.server_url, settings.project, settings.actor, hpa_metric(),
    )  # fmt: skip
    controller.start()
    _say(f"{endpoint.name}: routed by Service {_name(endpoint.name)} in {kube.namespace}")
    while True:
        try:
            for line in controller.step():
                _say(f"{endpoint.name}: {line}")
        except Exception as exc:  # the server or the cluster, for now: look again
            if not block:
                raise
            _say(f"{endpoint.name}: {exc}; trying again in {POLL_S:g}s")
        if not block:
            return
        time.sleep(POLL_S)


@dataclass
class Controller:
    """Where ``kiln serve --backend kubernetes`` runs: applies the router once, then at
    each :meth:`step` the objects of each version the record (``store``) routes to, and
    deletes a retired version's DRAIN_S after the router left it (it moves within
    POLL_S). Pods reach the record at ``server_url``."""

    endpoint: Endpoint[Any]
    api: Applier
    kube: KubeSettings
    store: KilnStore
    server_url: str
    project: str | None = None
    actor: str = "unknown"
    metric: str = "cpu"
    applied: dict[int, float] = field(default_factory=dict)  # version -> retired at (0: live)

    def start(self) -> None:
        for obj in render_router(self.endpoint, self.kube, server_url=self.server_url,
                                 project=self.project):  # fmt: skip
            self.api.apply(obj)

    def step(self, now: float | None = None) -> list[str]:
        """One look at the record; what changed, in words."""
        from kiln.serve import state

        now = time.time() if now is None else now
        targets = state.targets(self.store, self.endpoint.spec, self.actor)
        said = []
        for version, weight in sorted(targets.items()):
            if weight > 0 and self.applied.get(version) != 0:
                objects = render_version(
                    self.endpoint, version, self.kube, server_url=self.server_url,
                    project=self.project, metric=self.metric,
                )  # fmt: skip
                for obj in objects:
                    self.api.apply(obj)
                self.applied[version] = 0
                said.append(f"version {version} applied")
        live = [v for v, w in targets.items() if w > 0]
        moved = all(self.api.available(version_name(self.endpoint.name, v)) for v in live)
        for version, since in list(self.applied.items()):
            if targets.get(version, 0) > 0:
                continue
            if since == 0:
                if moved:  # the router moves off it within POLL_S: the drain counts from now
                    self.applied[version] = now
            elif now - since > DRAIN_S + POLL_S:
                self.api.delete_version(version_name(self.endpoint.name, version))
                del self.applied[version]
                said.append(f"version {version} retired")
        return said


@dataclass
class Applier:
    """Create an object, or replace the one of that name (what ``kubectl apply`` does
    for objects Kiln alone owns). ``apps`` and ``autoscaling`` are the client's
    ``AppsV1Api`` and ``AutoscalingV2Api`` (made when None)."""

    batch: Any
    core: Any
    namespace: str
    apps: Any = None
    autoscaling: Any = None

    def __post_init__(self) -> None:
        if self.apps is None or self.autoscaling is None:
            from kubernetes import client

            self.apps, self.autoscaling = client.AppsV1Api(), client.AutoscalingV2Api()

    def _api(self, kind: str) -> tuple[Any, str]:
        return {"Job": (self.batch, "job"), "Service": (self.core, "service"),
                "Deployment": (self.apps, "deployment"),
                "HorizontalPodAutoscaler": (self.autoscaling, "horizontal_pod_autoscaler"),
                }[kind]  # fmt: skip

    def _existing(self, kind: str, name: str) -> Any:
        """The object of that name, or None; refused if it is not Kiln's to change."""
        from kubernetes.client.exceptions import ApiException

        api, noun = self._api(kind)
        try:
            found = getattr(api, f"read_namespaced_{noun}")(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        if (found.metadata.labels or {}).get(MANAGED_BY) != "kiln":
            raise ValidationError(
                "endpoint", f"a {kind} named {name} exists in {self.namespace} and is not "
                "Kiln's: Kiln changes and deletes only what it made; rename the endpoint",
            )  # fmt: skip
        return found

    def apply(self, obj: Any) -> str:
        """``created``, ``applied`` (server-side apply: Kiln's fields are as rendered)
        or ``kept`` (a Job, which cannot change)."""
        kind, name = obj.kind, obj.metadata.name
        existing = self._existing(kind, name)
        if kind == "Job" and existing is not None:
            return "kept"
        api, noun = self._api(kind)
        getattr(api, f"patch_namespaced_{noun}")(
            name, self.namespace, plain(obj), field_manager="kiln", force=True,
            _content_type="application/apply-patch+yaml",
        )  # fmt: skip
        return "created" if existing is None else "applied"

    def available(self, name: str) -> bool:
        """Whether the Deployment has a pod ready (the router's probe will find it)."""
        from kubernetes.client.exceptions import ApiException

        try:
            found = self.apps.read_namespaced_deployment_status(name, self.namespace)
        except ApiException:
            return False
        return bool(found.status and (found.status.available_replicas or 0) > 0)

    def delete_version(self, name: str) -> None:
        """Delete a version's autoscaler, Deployment and Service (Kiln's only)."""
        from kubernetes.client.exceptions import ApiException

        for kind in ("HorizontalPodAutoscaler", "Deployment", "Service"):
            if self._existing(kind, name) is None:
                continue
            api, noun = self._api(kind)
            try:
                getattr(api, f"delete_namespaced_{noun}")(name, self.namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise


if __name__ == "__main__":
    main()
