"""Endpoints on Ray Serve: ``kiln serve --backend ray`` (or ``KILN_BACKEND=ray``).

Each model version the endpoint routes to is a Ray Serve application of its own,
``<endpoint>-v<N>``. Its replicas load that version with the same code as a local
replica (validation, ``predict``, the span with its OpenInference and ``kiln.*``
attributes), and Ray Serve scales them between ``min_replicas`` and
``max_replicas``, aiming at ``target_concurrency`` requests in flight per replica
and scaling down after ``idle_timeout``. Each replica reserves the endpoint's
``cpu``, ``gpu`` (fractions are Ray's) and ``memory``; a ``kiln.Env`` is Ray's
``uv`` runtime_env, built from the same lock as on the local engine.

A router application, ``<endpoint>``, takes HTTP on Ray Serve's proxy at
``/<endpoint>`` (``POST /<endpoint>/predict``, ``GET /<endpoint>/healthz``) and
splits requests between versions by weight (smooth weighted round robin, as the
local front door does). The process that ran ``kiln serve`` follows the alias and
the live split: a new version's application is deployed and ready before the
router moves to it, and the old one is deleted only after the router has moved,
so a promotion or rollback drops no request.

Replicas load the model from the store's blob folder and write spans to the
store, so every node must reach both (one machine, or a shared filesystem and
PostgreSQL; see :mod:`kiln.compute.backends.ray`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiln.config import Settings
from kiln.errors import KilnError, ValidationError
from kiln.serve import state
from kiln.serve.replicas import setup
from kiln.serve.server import _say

if TYPE_CHECKING:
    from kiln.record.store.base import EndpointLogRow
    from kiln.serve.endpoint import Endpoint

_log = logging.getLogger("kiln")
POLL_S = 0.5
REPORT_S = 5.0
STATUS = {0: 200, 1: 422, 2: 500}  # the replica's OK, INVALID, FAILED
_COUNTS = ("requests", "errors", "cpu_ns", "busy_ns")  # a router's figures of a version


class _Output:
    """What a Ray Serve replica prints: passed on (Ray logs it as ever) and stored as
    its endpoint's logs for its version, every :data:`REPORT_S` and when it stops."""

    def __init__(self, store_url: str, endpoint: str, version: int | None) -> None:
        from kiln.record.output import FdTee

        self._url, self._endpoint, self._version = store_url, endpoint, version
        self._lock = threading.Lock()
        self._rows: list[EndpointLogRow] = []
        self._kept = self._dropped = 0
        self._store: Any = None
        self._stopped = threading.Event()
        FdTee.installed().sink = self._add
        threading.Thread(target=self._loop, daemon=True, name="kiln-replica-logs").start()

    def _add(self, stream: str, at: float, data: bytes) -> None:
        from kiln.record.output import LOG_LIMIT_BYTES, clean
        from kiln.record.store.base import LOG_CHUNK_CHARS

        with self._lock:
            if self._kept + len(data) > LOG_LIMIT_BYTES:
                self._dropped += len(data)
                return
            self._kept += len(data)
            text = clean(data)
            self._rows += [(self._endpoint, self._version, os.getpid(), at, stream,
                            text[i : i + LOG_CHUNK_CHARS])
                           for i in range(0, len(text), LOG_CHUNK_CHARS)]  # fmt: skip

    def _loop(self) -> None:
        while not self._stopped.wait(REPORT_S):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            rows, self._rows = self._rows, []
            dropped, self._dropped = self._dropped, 0
        if dropped:
            rows.append(
                (
                    self._endpoint,
                    self._version,
                    os.getpid(),
                    time.time(),
                    "kiln",
                    f"[kiln] {dropped:,} bytes of replica output were not recorded\n",
                )
            )
        if not rows:
            return
        try:
            if self._store is None:
                from kiln.record.store import open_store

                self._store = open_store(self._url)
            self._store.write_endpoint_logs(rows)
        except Exception as exc:  # the output was shown; it is only not kept
            _log.warning("kiln: %d chunks of replica output were not recorded: %s",
                         len(rows), exc)  # fmt: skip

    def close(self) -> None:
        from kiln.record.output import FdTee

        self._stopped.set()
        tee = FdTee.installed()
        tee.drain()
        tee.sink = None
        self.flush()


class Replica:
    """A Ray Serve replica of one model version."""

    def __init__(self, init: dict[str, Any]) -> None:
        from kiln.serve._replica import _setup

        self._output: _Output | None = None
        with contextlib.suppress(OSError):  # no descriptors to spare: unlogged
            self._output = _Output(init["store_url"], init["endpoint"],
                                   init.get("model_version"))  # fmt: skip
        self._handler, _ = _setup(init)

    def predict(
        self, body: bytes, received_ns: int, context: str
    ) -> tuple[int, bytes, bytes, int, int]:
        """(status, answer, traceparent, CPU ns, wall ns) for one request body."""
        cpu, wall = time.thread_time_ns(), time.perf_counter_ns()
        status, answer, trace_out = self._handler.predict(body, received_ns, context)
        return status, answer, trace_out, time.thread_time_ns() - cpu, time.perf_counter_ns() - wall

    def batch(self, rows: bytes, received_ns: int, attributes: dict[str, Any]) -> bytes:
        """JSONL answers for JSONL rows, in order (a batch job's shard)."""
        from kiln.serve._replica import batch_answers

        return batch_answers(*self._handler.batch(rows, received_ns, attributes))

    def close(self) -> None:
        """Export the spans still queued (Ray Serve calls it on a graceful stop)."""
        from kiln.serve._replica import _warm

        if "provider" in _warm:
            _warm["provider"].shutdown()
            del _warm["provider"]
        output = getattr(self, "_output", None)  # Ray's actor class skips __init__
        if output is not None:
            output.close()
            self._output = None

    def __del__(self) -> None:
        self.close()


class Router:
    """The endpoint's HTTP entry on Ray Serve: picks a version, forwards the body."""

    def __init__(
        self, weights: dict[int, float], apps: dict[int, str], refs: dict[int, str],
        spans: dict[str, Any] | None = None, openapi: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        from ray import serve

        from kiln.serve.traffic import Split

        self._openapi = openapi or {}
        self._spans = spans  # what the span of a request no replica answered needs
        self._tracer: Any = None
        self._split = Split(weights)
        self._handles = {v: serve.get_app_handle(app) for v, app in apps.items()}
        self._refs = refs
        self._figures = {v: dict.fromkeys(_COUNTS, 0) for v in weights}
        self._latencies: collections.deque[float] = collections.deque(maxlen=4096)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, Response

        from kiln.serve.server import _trace_context

        path = request.url.path.rstrip("/")
        route = path.rsplit("/", 1)[-1]
        if route not in ("predict", "healthz", "readyz", "openapi.json"):
            return JSONResponse({"error": f"no route {path}; POST .../predict"}, 404)
        allowed = "POST" if route == "predict" else "GET, HEAD"
        if request.method not in allowed.split(", "):
            return JSONResponse({"error": f"use {allowed.split(',')[0]} {path}"}, 405,
                                {"allow": allowed})  # fmt: skip
        if route == "openapi.json":
            return JSONResponse(self._openapi)
        if route != "predict":
            return JSONResponse({"status": "ok"} if route == "healthz" else {"ready": True})
        started, received = time.perf_counter(), time.time_ns()
        body = await request.body()
        context = _trace_context(request.scope["headers"]).decode("latin-1")
        version = self._split.pick()
        try:
            status, answer, trace_out, cpu_ns, wall_ns = await self._handles[
                version
            ].predict.remote(body, received, context)
        except Exception as exc:  # the replica died, or Ray could not reach one
            self._figures[version]["requests"] += 1
            self._figures[version]["errors"] += 1
            self._latencies.append(time.perf_counter() - started)
            message = f"no replica of {self._refs[version]} answered: {type(exc).__name__}"
            headers = self._refused(version, received, context, message)
            return JSONResponse({"error": message}, 503, headers)
        figures = self._figures[version]
        figures["requests"] += 1
        figures["errors"] += status != 0
        figures["cpu_ns"] += cpu_ns
        figures["busy_ns"] += wall_ns
        self._latencies.append(time.perf_counter() - started)
        headers = {"x-kiln-model": self._refs[version]}
        if trace_out:
            traced = trace_out.decode()
            headers.update({"traceparent": traced, "x-kiln-trace-id": traced[3:35]})
        return Response(answer, STATUS[status], headers, media_type="application/json")

    def _refused(self, version: int, received: int, context: str, message: str) -> dict[str, str]:
        """The span of a request no replica answered; its trace headers."""
        spans = self._spans
        if spans is None:
            return {"x-kiln-model": self._refs[version]}
        from kiln.observe import tracing

        if self._tracer is None:
            provider = tracing.tracer_provider(spans["service"], store_url=spans["store_url"])
            self._tracer = provider.get_tracer("kiln.serve")
        traced = tracing.refused_request_span(
            self._tracer, name=f"POST {spans['route']}", received_ns=received, context=context,
            attributes={**spans["attributes"], **spans["versions"][version]}, code=503,
            message=message,
        ).decode()  # fmt: skip
        return {"traceparent": traced, "x-kiln-trace-id": traced[3:35],
                "x-kiln-model": self._refs[version]}  # fmt: skip

    def stats(self) -> dict[str, Any]:
        """Requests, errors, CPU and busy time by version, and latency, since it started."""
        from kiln.serve.server import _quantile

        latencies = sorted(self._latencies)
        return {
            "latency_ms": {"p50": _quantile(latencies, 0.5) * 1000,
                           "p99": _quantile(latencies, 0.99) * 1000},
            "versions": {v: dict(f) for v, f in self._figures.items()},
        }  # fmt: skip


@dataclass
class RayEndpoint:
    """Deploys an endpoint on Ray Serve and keeps it on its alias or live split."""

    endpoint: Endpoint[Any]
    host: str = "127.0.0.1"
    port: int = 8000
    url: str = ""
    weights: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _started_ray: bool = False
    _server_id: str | None = None  # its row among the endpoint's servers, once announced
    _past: dict[int, dict[str, int]] = field(default_factory=dict)  # of replaced routers

    def start(self) -> None:
        from kiln.record.recorder import recorder_for

        self._started_ray, self._options = _on_cluster(self.endpoint)  # Ray is there
        from ray import serve

        self._serve = serve
        recorder = recorder_for(self.settings)
        self._store, self._blobs = recorder.store, recorder.blobs
        state.check_declared_traffic(self._store, self.spec, self.settings.actor)
        self._serve.start(http_options={"host": self.host, "port": self.port})
        self.url = f"http://{self.host}:{self.port}/{self.spec.name}"
        self._route(state.targets(self._store, self.spec, self.settings.actor))
        self._server_id = state.announce(self._store, self.spec, self.url)
        self._thread = threading.Thread(target=self._follow, name="kiln-serve-ray", daemon=True)
        self._thread.start()

    @property
    def spec(self) -> Any:
        return self.endpoint.spec

    @property
    def settings(self) -> Settings:
        return self.endpoint.app.settings

    def app_name(self, version: int) -> str:
        return f"{self.spec.name}-v{version}"

    def _route(self, targets: dict[int, float]) -> None:
        """Deploy new versions, move the router, then delete versions no longer routed."""
        from kiln.observe import tracing
        from kiln.registry.models import models_for
        from kiln.serve.openapi import document

        serve = self._serve
        models = models_for(self._store, app=self.spec.app, actor=self.settings.actor)
        routed = {v: w for v, w in targets.items() if w > 0}
        refs = {}
        identities = {}
        root, route = self.url.rsplit("/", 1)[0], f"/{self.spec.name}/predict"
        for version in routed:
            mv = models.get(f"{self.spec.model_name}:{version}")
            refs[version] = mv.ref
            identities[version] = tracing.identity_attributes(
                endpoint=self.spec.name, model_name=mv.name, model_version=mv.version,
                run_id=mv.run_id, kind=self.spec.kind,
            )  # fmt: skip
            if version not in self.weights:
                path = str(self._blobs.fetch(mv.artifact_sha256))
                init = setup(self.endpoint, self.settings.record_url, mv, path, url=root,
                             route=route)  # fmt: skip
                serve.run(self._replica().bind(init), name=self.app_name(version),
                          route_prefix=None)  # fmt: skip
        apps = {v: self.app_name(v) for v in routed}
        carried = self._carried_figures()
        router = serve.deployment(Router, name="router", ray_actor_options={"num_cpus": 0})
        spans = None
        if self.spec.tracing:
            attributes = {
                **tracing.server_span_attributes(root, route),
                tracing.ROUTED_BY: self.spec.model,
                **self.spec.span_attributes,
            }
            spans = {"service": f"kiln.{self.spec.name}", "store_url": self.settings.record_url,
                     "route": route, "attributes": attributes, "versions": identities}  # fmt: skip
        openapi = document(self.endpoint.cls, title=f"{self.spec.name} (kiln endpoint on Ray)",
                           base=f"/{self.spec.name}")  # fmt: skip
        serve.run(router.bind(routed, apps, refs, spans, openapi), name=self.spec.name,
                  route_prefix=f"/{self.spec.name}")  # fmt: skip
        self._past = carried  # only once the old router is replaced: no double count
        for version in self.weights:
            if version not in routed:
                serve.delete(self.app_name(version))
        self.weights = routed
        shares = ", ".join(f"{refs[v]} {w:g}" for v, w in routed.items())
        _say(f"{self.spec.name}: serving {shares} on Ray Serve at {self.url}")

    def _replica(self) -> Any:
        spec = self.spec
        return self._serve.deployment(
            Replica, name="replica",
            ray_actor_options=self._options,
            max_ongoing_requests=max(2 * spec.target_concurrency, 5),
            autoscaling_config={
                "min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas,
                "target_ongoing_requests": spec.target_concurrency,
                "downscale_delay_s": spec.idle_timeout, "upscale_delay_s": 0.0,
            },
        )  # fmt: skip

    def _follow(self) -> None:
        last_report = 0.0
        failed: set[tuple[tuple[int, float], ...]] = set()
        while not self._stop.wait(POLL_S):
            try:
                targets = state.targets(self._store, self.spec, self.settings.actor)
                key = tuple(sorted(targets.items()))
                if targets != self.weights and key not in failed:
                    try:
                        self._route(targets)
                    except Exception as exc:  # a version that cannot start: keep the old
                        failed.add(key)
                        _say(f"{self.spec.name}: keeps serving what it served: {exc}")
                if self._server_id and time.monotonic() - last_report >= REPORT_S:
                    last_report = time.monotonic()
                    state.report(self._store, self._server_id, self.stats(), url=self.url)
            except KilnError as exc:
                _say(f"{self.spec.name}: cannot follow {self.spec.model}: {exc}")
            except Exception as exc:  # the store or the cluster may be briefly unavailable
                _log.warning("kiln: following endpoint %s failed: %s", self.spec.name, exc)

    def _router_figures(self) -> dict[str, Any]:
        handle = self._serve.get_app_handle(self.spec.name)
        figures: dict[str, Any] = handle.stats.remote().result(timeout_s=10)
        return figures

    def _carried_figures(self) -> dict[int, dict[str, int]]:
        """The counts of the routers so far, the one about to be replaced included, so
        that the endpoint's figures count every version's requests since it started (a
        canary's too, after its split ends). Requests answered between this and the
        swap are not counted."""
        past = {v: dict(f) for v, f in self._past.items()}
        if not self.weights:
            return past
        try:
            router = self._router_figures()
        except Exception as exc:  # the old router is gone: its counts with it
            _log.warning("kiln: %s: the router's figures were lost: %s", self.spec.name, exc)
            return past
        for version, figures in router["versions"].items():
            counts = past.setdefault(version, dict.fromkeys(_COUNTS, 0))
            for key in _COUNTS:
                counts[key] += figures.get(key, 0)
        return past

    def stats(self) -> dict[str, Any]:
        """Figures for ``kiln endpoints show``: replicas as Ray Serve reports them;
        requests, errors and resource-seconds per request of every version routed since
        it started (from the routers), latency from the current router."""
        from kiln.observe.cost import Usage

        status = self._serve.status().applications
        router = self._router_figures()
        r, gpu_type = self.spec.resources, None
        total, versions = Usage(), {}
        for version in sorted({*self.weights, *router["versions"], *self._past}):
            now, past = router["versions"].get(version, {}), self._past.get(version, {})
            figures = {k: now.get(k, 0) + past.get(k, 0) for k in _COUNTS}
            weight = self.weights.get(version, 0.0)
            busy_s = figures.get("busy_ns", 0) / 1e9
            usage = Usage(figures.get("requests", 0), figures.get("cpu_ns", 0) / 1e9,
                          busy_s * r.gpu, busy_s * r.memory_bytes / 2**30)  # fmt: skip
            total = total + usage
            versions[str(version)] = {
                "weight": weight,
                "replicas": _running(status.get(self.app_name(version))) if weight else 0,
                "requests": usage.requests, "errors": figures.get("errors", 0),
                "usage": usage.per_request(),
            }  # fmt: skip
        return {
            "engine": "ray", "requests": total.requests,
            "errors": sum(v["errors"] for v in versions.values()),
            "replicas": sum(v["replicas"] for v in versions.values()),
            "latency_ms": router["latency_ms"], "per_request": total.per_request(),
            "versions": versions, "gpu_type": gpu_type,
        }  # fmt: skip

    def stop(self, timeout: float = 30.0) -> None:
        """Stop following, delete the endpoint's Ray Serve applications."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with contextlib.suppress(Exception):
            self._serve.delete(self.spec.name)
            for version in self.weights:
                self._serve.delete(self.app_name(version))
        if self._server_id is not None:
            with contextlib.suppress(Exception):
                state.report(self._store, self._server_id, None, status="stopped", url=self.url)
        if self._started_ray:
            import ray

            ray.shutdown()

    def __enter__(self) -> RayEndpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _on_cluster(endpoint: Endpoint[Any]) -> tuple[bool, dict[str, Any]]:
    """Connect to the endpoint's Ray cluster and check that a node can hold a replica;
    whether this connected, and a replica's actor options: the endpoint's resources,
    its env as a uv runtime_env."""
    from kiln.compute._threads import thread_env
    from kiln.compute.backends.ray import _cluster_inventory, connect, uv_runtime_env

    settings, spec = endpoint.app.settings, endpoint.spec
    ray, connected = connect(settings.ray_address)
    _cluster_inventory(ray.nodes()).check(spec.resources)
    r = spec.resources
    options: dict[str, Any] = {"num_cpus": r.cpu, "num_gpus": r.gpu}
    if r.memory_bytes:
        options["memory"] = r.memory_bytes
    runtime_env: dict[str, Any] = {"env_vars": thread_env(r.cpu)}  # as for a function's task
    if spec.env is not None:
        from kiln.envs.manager import env_manager
        from kiln.record.recorder import recorder_for

        blobs = recorder_for(settings).blobs
        requirements = env_manager(settings.home, blobs).lock(spec.env).requirements
        runtime_env.update(uv_runtime_env(requirements))
    options["runtime_env"] = runtime_env
    return connected, options


def batch_replicas(endpoint: Endpoint[Any], init: dict[str, Any], n: int) -> tuple[list[Any], bool]:
    """``n`` replicas of ``endpoint`` as Ray actors, for a batch job on the Ray engine,
    and whether this connected to Ray (the job then disconnects when done)."""
    import ray

    connected, options = _on_cluster(endpoint)
    actor = ray.remote(Replica).options(**options)
    return [actor.remote(init) for _ in range(n)], connected


def _running(app: Any) -> int:
    """Running replicas of a version's application, as Ray Serve reports them."""
    deployment = None if app is None else app.deployments.get("replica")
    if deployment is None:
        return 0
    states = deployment.replica_states.items()
    return sum(n for s, n in states if str(getattr(s, "value", s)) == "RUNNING")


def serve_on_ray(
    endpoint: Endpoint[Any], *, host: str = "127.0.0.1", port: int = 8000, block: bool = True
) -> RayEndpoint | None:
    """Deploy ``endpoint`` on Ray Serve, its HTTP proxy on ``host:port``."""
    if not port:
        raise ValidationError("port", "Ray Serve's proxy needs a fixed port", allowed="1-65535")
    handle = RayEndpoint(endpoint, host, port)
    if not block:
        try:
            handle.start()
        except BaseException:
            handle.stop()  # whatever it deployed before it failed
            raise
        return handle

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM stops it as Ctrl-C does, deleting its applications (set after connecting:
    # ray.init sets its own; and Ray's failure handler in the driver would abort).
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    try:
        handle.start()
        signal.signal(signal.SIGTERM, interrupt)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
    return None
