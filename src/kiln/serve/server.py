"""The front door of an endpoint: an ASGI app on uvicorn in front of replica processes.

Routes: ``POST /predict`` (JSON in and out), ``GET /healthz``, ``GET /readyz`` (ready
once the routed versions have a replica that finished ``load``, or, with
``min_replicas=0``, once the model resolved), ``GET /metrics`` (Prometheus text)
and ``GET /`` (what is served).

The front door forwards request bodies untouched; validation, ``predict`` and the
request's span happen in the replica. Around that it keeps

- one pool of replicas per model version served, sized by :class:`Autoscaler`;
- the traffic split between pools (:class:`Split`): the model reference's holder,
  the declared ``traffic``, or a live split set with ``kiln endpoints set-traffic``;
- a poll of the store: when the alias moves (promote, rollback) or the live split
  changes, the new version's pool starts, traffic moves to it once it is ready,
  and the old pool is drained (its in-flight requests finish) before it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.config import Settings
from kiln.errors import KilnError, ValidationError
from kiln.observe.cost import Prices, Usage
from kiln.record.output import LOG_LIMIT_BYTES, clean
from kiln.record.store.base import LOG_CHUNK_CHARS, EndpointLogRow
from kiln.serve import state
from kiln.serve._replica import FAILED, INVALID, OK, PREDICT
from kiln.serve.autoscale import Autoscaler
from kiln.serve.replicas import Replica, ReplicaDied, replica_env, reserve, setup
from kiln.serve.traffic import Split

if TYPE_CHECKING:
    from kiln.compute.scheduler import Allocation
    from kiln.record.store.base import KilnStore
    from kiln.registry.models import ModelVersion
    from kiln.serve.endpoint import Endpoint

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

POLL_S = 0.5  # how often the store is asked whether the alias or the split moved
TICK_S = 0.1  # how often the autoscaler decides
REPORT_S = 2.0  # how often figures are written to the store
MAX_BODY = 32 * 1024 * 1024
BODY_TIMEOUT_S = 60.0  # for the whole body of a request to arrive
HEADER_TIMEOUT_S = 10.0  # for a request's headers to arrive, from its first byte
MAX_CONNECTIONS = 1000  # more are answered 503 at once
_STATUS = {OK: 200, INVALID: 422, FAILED: 500}
_JSON = (b"content-type", b"application/json")
_log = logging.getLogger("kiln")


def _say(message: str) -> None:
    print(f"kiln: {message}", file=sys.stderr, flush=True)


@dataclass
class Pool:
    """The replicas of one model version."""

    version: ModelVersion
    model_path: str
    autoscaler: Autoscaler
    run_trace: tuple[str, str] | None = None  # the training run's trace and span ids
    replicas: list[Replica] = field(default_factory=list)
    starting: int = 0
    inflight: int = 0
    peak: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None
    requests: int = 0
    errors: int = 0
    cpu_ns: int = 0
    busy_ns: int = 0
    cold_starts: list[float] = field(default_factory=list)
    replica_seconds: float = 0.0  # of replicas already stopped
    turn: int = 0

    @property
    def size(self) -> int:
        return len(self.replicas) + self.starting

    def pick(self) -> Replica | None:
        """The replica with the fewest requests in flight; ties go round robin."""
        replicas = self.replicas
        n = len(replicas)
        if n == 1:
            return replicas[0]
        if not n:
            return None
        self.turn += 1
        best = replicas[self.turn % n]
        for i in range(1, n):
            replica = replicas[(self.turn + i) % n]
            if replica.inflight < best.inflight:
                best = replica
        return best


def _inflight(replica: Replica) -> int:
    return replica.inflight


class EndpointServer:
    """The ASGI app serving one endpoint. See the module docstring."""

    def __init__(self, endpoint: Endpoint[Any], settings: Settings | None = None) -> None:
        from prometheus_client import CollectorRegistry

        self.endpoint = endpoint
        self.spec = endpoint.spec
        self.settings = settings or endpoint.app.settings
        self.url = ""
        self.pools: dict[int, Pool] = {}
        self.split: Split | None = None
        self.weights: dict[int, float] = {}
        self.inflight = 0
        self.ready = False
        self.prices = Prices.from_env()
        self._latencies: deque[float] = deque(maxlen=4096)
        self._tasks: list[asyncio.Task[Any]] = []
        self._failed_targets: set[tuple[tuple[int, float], ...]] = set()
        self._closing = False
        self.registry = CollectorRegistry()
        self._metrics = _Metrics(self.registry, self.spec.name)
        self._python: str = sys.executable
        self._env_lock: str | None = None
        self._standby: asyncio.Task[Replica] | None = None
        self._leases: set[str] = set()  # reservations not yet given back
        self._spawned: set[Replica] = set()  # every process started, for the last cleanup
        self._preload: list[str] = []
        self._engine: Any = None
        self._store: KilnStore | None = None
        self._server_id: str | None = None  # its row among the endpoint's servers
        self._retired: list[Pool] = []  # pools of versions no longer routed (a canary's)
        self._provider: Any = None  # for the spans of requests no replica answered
        self._tracer: Any = None
        self._openapi: dict[str, Any] | None = None
        self._log_lock = threading.Lock()  # replicas' output, read by their pipes' threads
        self._log_rows: list[EndpointLogRow] = []
        self._log_kept: dict[int | None, int] = {}  # bytes recorded, by version
        self._log_dropped: dict[int | None, int] = {}

    # -- ASGI ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path, method = scope["path"], scope["method"]
            allowed = "POST" if path == "/predict" else "GET, HEAD"
            if path == "/predict" and method == "POST":
                await self._predict(scope, receive, send)
            elif path in _ROUTES and method not in allowed.split(", "):
                self._metrics.count(None, 405)
                await _respond(send, 405, {"error": f"use {allowed.split(',')[0]} {path}"},
                               [(b"allow", allowed.encode())])  # fmt: skip
            elif path == "/healthz":
                await _respond(send, 200, {"status": "ok"})
            elif path == "/readyz":
                ok = self.ready and not self._closing
                await _respond(send, 200 if ok else 503, {"ready": ok})
            elif path == "/metrics":
                await self._prometheus(send)
            elif path == "/openapi.json":
                await _respond(send, 200, self.openapi())
            elif path == "/":
                await _respond(send, 200, self.describe())
            else:
                self._metrics.count(None, 404)
                await _respond(send, 404, {"error": f"no route {path}", "routes": _ROUTES})
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _predict(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = time.time_ns()
        started = time.perf_counter()
        context, declared = _request_headers(scope["headers"])
        try:
            if declared > MAX_BODY:
                raise _Refused(413, f"request body over {MAX_BODY} bytes")
            body = await _read_body(receive, scope)
        except _Refused as exc:
            await self._refuse(send, None, context, received, started, exc.code, str(exc))
            return
        split = self.split
        if split is None:
            await self._refuse(send, None, context, received, started, 503,
                               "the endpoint is starting")  # fmt: skip
            return
        pool = self.pools[split.pick()]
        pool.inflight += 1
        if pool.inflight > pool.peak:
            pool.peak = pool.inflight
        self.inflight += 1
        try:
            answer = await self._forward(pool, body, received, context)
        except (ReplicaDied, _Unavailable) as exc:
            pool.requests += 1
            pool.errors += 1
            await self._refuse(send, pool, context, received, started, 503, str(exc))
            return
        finally:
            pool.inflight -= 1
            self.inflight -= 1
        code = _STATUS[answer.status]
        pool.requests += 1
        pool.cpu_ns += answer.cpu_ns
        pool.busy_ns += answer.wall_ns
        if code != 200:
            pool.errors += 1
        headers = [_JSON, (b"content-length", str(len(answer.body)).encode()),
                   (b"x-kiln-model", pool.version.ref.encode())]  # fmt: skip
        traced = answer.traceparent
        if traced[0]:
            headers += [(b"traceparent", traced), (b"x-kiln-trace-id", traced[3:35])]
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})
        elapsed = time.perf_counter() - started
        self._latencies.append(elapsed)
        self._metrics.observe(pool.version.version, code, elapsed)

    async def _refuse(
        self, send: Send, pool: Pool | None, context: bytes, received: int, started: float,
        code: int, message: str,
    ) -> None:  # fmt: skip
        """Answer a request no replica answered (it died, its version never started, the
        endpoint is starting, the body is too big): it is still a span, with a trace id,
        and its latency is observed."""
        headers: list[tuple[bytes, bytes]] = []
        if self.spec.tracing:
            try:
                traced = self._refused_span(pool, context, received, code, message)
                headers = [(b"traceparent", traced), (b"x-kiln-trace-id", traced[3:35])]
            except Exception as exc:  # a span must never cost the answer
                _log.warning("kiln: the span of a refused request was not made: %s", exc)
        if pool is not None:
            headers.append((b"x-kiln-model", pool.version.ref.encode()))
        await _respond(send, code, {"error": message}, headers)
        version = None if pool is None else pool.version.version
        self._metrics.observe(version, code, time.perf_counter() - started)

    def _refused_span(
        self, pool: Pool | None, context: bytes, received: int, code: int, message: str
    ) -> bytes:
        from kiln.observe import tracing

        if self._tracer is None:
            self._provider = tracing.tracer_provider(
                f"kiln.{self.spec.name}", store_url=self.settings.record_url
            )
            self._tracer = self._provider.get_tracer("kiln.serve")
        attrs = {**tracing.server_span_attributes(self.url, "/predict"),
                 tracing.ENDPOINT: self.spec.name, tracing.ROUTED_BY: self.spec.model,
                 "openinference.span.kind": self.spec.kind.upper(),
                 **self.spec.span_attributes}  # fmt: skip
        if pool is not None:
            mv = pool.version
            attrs.update(tracing.identity_attributes(
                endpoint=self.spec.name, model_name=mv.name, model_version=mv.version,
                run_id=mv.run_id, kind=self.spec.kind))  # fmt: skip
        return tracing.refused_request_span(
            self._tracer, name="POST /predict", received_ns=received,
            context=context.decode("latin-1"), attributes=attrs, code=code, message=message,
        )  # fmt: skip

    async def _forward(self, pool: Pool, body: bytes, received: int, context: bytes) -> Any:
        for attempt in range(2):
            replica = pool.pick()
            if replica is None:
                replica = await self._cold_start(pool)
            replica.inflight += 1
            try:
                return await replica.send(PREDICT, body, received_ns=received, context=context)
            except ReplicaDied:
                if attempt:
                    raise
                self._retire_dead(pool, replica)  # try once more on another replica
            finally:
                replica.inflight -= 1
        raise AssertionError("unreachable")

    async def _cold_start(self, pool: Pool) -> Replica:
        """Wait for a replica, starting one if none is on its way (scale from zero)."""
        spawned = False
        while True:
            replica = pool.pick()
            if replica is not None:
                return replica
            if pool.starting == 0:
                if spawned or self._closing:
                    raise _Unavailable(f"{pool.version.ref} could not start: {pool.error}")
                self._spawn(pool)
                spawned = True
            pool.ready.clear()
            await pool.ready.wait()

    # -- replicas -------------------------------------------------------------------

    def _spawn(self, pool: Pool) -> None:
        pool.starting += 1
        self._tasks.append(asyncio.create_task(self._add_replica(pool)))

    async def _add_replica(self, pool: Pool) -> None:
        from_zero = not pool.replicas
        began = time.perf_counter()
        lease_id = ""
        try:
            lease_id, allocation = await reserve(
                self._engine.backend, self.spec.resources, held=self._leases
            )
            replica = await self._take_standby()
            learned = await replica.start(lease_id, self._init(pool, allocation))
        except Exception as exc:
            if lease_id:
                self._release(lease_id)
            pool.error = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            if not self._closing:
                _say(f"a replica of {pool.version.ref} failed to start: {exc}")
            pool.starting -= 1
            pool.ready.set()  # wake waiters, who see the error
            return
        pool.starting -= 1
        pool.error = None
        if self._closing or pool not in self.pools.values():
            await self._stop_replica(pool, replica)
            return
        pool.replicas.append(replica)
        pool.ready.set()
        took = time.perf_counter() - began
        if from_zero:
            pool.cold_starts.append(took)
            self._metrics.cold_start.observe(took)
            _say(f"{self.spec.name}: {pool.version.ref} cold start {took:.2f}s "
                 f"(load {replica.load_s:.2f}s), {len(pool.replicas)} replica(s)")  # fmt: skip
        self._learn(learned)

    # A standby is a replica process that has imported what loading needs but loaded
    # nothing and holds no reservation: the next replica starts from it.

    async def _take_standby(self) -> Replica:
        task, self._standby = self._standby, None
        self._refill()
        if task is not None:
            try:
                replica = await task
                if replica.alive:
                    return replica
            except Exception as exc:
                _log.warning("kiln: a standby replica failed: %s", exc)
        return await self._new_standby()

    def _refill(self) -> None:
        if self._standby is None and not self._closing:
            self._standby = asyncio.create_task(self._new_standby())

    async def _new_standby(self) -> Replica:
        replica = Replica()
        self._spawned.add(replica)
        await replica.spawn(
            python=self._python,
            env=replica_env(self._env_lock, self.spec.resources.cpu),
            on_output=self._output,
        )
        preload = setup(self.endpoint, self.settings.record_url)
        await replica.preload({**preload, "preload": self._preload})
        return replica

    def _learn(self, learned: list[str]) -> None:
        """Remember what ``load`` imported, so standbys import it ahead of time."""
        known = set(self._preload)
        new = [m for m in learned if m not in known]
        if not new:
            return
        self._preload = self._preload + new
        with contextlib.suppress(OSError):
            self._preload_file.parent.mkdir(parents=True, exist_ok=True)
            self._preload_file.write_text(json.dumps(self._preload))
        stale, self._standby = self._standby, None
        if stale is not None:
            self._tasks.append(asyncio.create_task(_discard(stale)))
        self._refill()

    @property
    def _preload_file(self) -> Path:
        return self.settings.home / "serve" / f"{self.spec.name}.preload.json"

    def _init(self, pool: Pool, allocation: Allocation) -> dict[str, Any]:
        gpus = allocation.cuda_visible_devices if self._engine.inventory.gpus else None
        init = setup(self.endpoint, self.settings.record_url, pool.version, pool.model_path,
                     url=self.url)  # fmt: skip
        return {**init, "cuda_visible_devices": gpus, "run_trace": pool.run_trace}

    async def _retire(self, pool: Pool, replica: Replica) -> None:
        """Take ``replica`` out of rotation, let its requests finish, stop it."""
        if replica in pool.replicas:
            pool.replicas.remove(replica)
        while replica.inflight and replica.alive:
            await asyncio.sleep(0.01)
        await self._stop_replica(pool, replica)

    def _retire_dead(self, pool: Pool, replica: Replica) -> None:
        if replica in pool.replicas:
            pool.replicas.remove(replica)
            code = replica.exit_code()
            how = "died" if code is None or code < 0 else f"exited with code {code}"
            _say(f"a replica of {pool.version.ref} (pid {replica.pid}) {how}")
            self._tasks.append(asyncio.create_task(self._stop_replica(pool, replica)))

    async def _stop_replica(self, pool: Pool, replica: Replica) -> None:
        await replica.stop()
        self._spawned.discard(replica)
        pool.replica_seconds += time.monotonic() - replica.started_at
        self._release(replica.lease_id)

    def _release(self, lease_id: str) -> None:
        self._leases.discard(lease_id)
        self._engine.backend.release(lease_id)

    # -- routing ----------------------------------------------------------------------

    def _targets(self) -> dict[int, float]:
        return state.targets(self._db, self.spec, self.settings.actor)

    async def _route(self, targets: dict[int, float]) -> None:
        """Serve ``targets``: start pools for new versions, move traffic once they are
        ready, drain the pools no longer routed."""
        from kiln.registry.models import models_for

        models = models_for(self._db, app=self.spec.app, actor=self.settings.actor)
        warm = any(p.replicas for p in self.pools.values())
        fresh: dict[int, Pool] = {}
        for version, weight in targets.items():
            if version in self.pools or weight <= 0:
                continue
            mv = await asyncio.to_thread(models.get, f"{self.spec.model_name}:{version}")
            pool = self._pool(mv)
            fresh[version] = pool
            start = max(self.spec.min_replicas, 1 if warm else 0)
            for _ in range(start):
                self._spawn(pool)
        pools = {**self.pools, **fresh}
        for pool in fresh.values():
            if pool.starting:
                self.pools = pools  # visible to _add_replica, not yet routed
                while pool.starting and not pool.replicas:
                    pool.ready.clear()
                    await pool.ready.wait()
                if not pool.replicas:
                    raise _Unavailable(f"{pool.version.ref} could not start: {pool.error}")
        old = [v for v in pools if targets.get(v, 0) <= 0]
        self.weights = {v: w for v, w in targets.items() if w > 0}
        self.split = Split(self.weights)
        self.pools = {v: p for v, p in pools.items() if v not in old}
        self._metrics.routing(self.weights, self.pools)
        for version in old:
            self._retired.append(pools[version])  # its requests still count
            self._tasks.append(asyncio.create_task(self._drain(pools[version])))
        if fresh or old:
            shares = ", ".join(
                f"{self.pools[v].version.ref} {p:.0f}%" for v, p in self.split.percentages().items()
            )
            _say(f"{self.spec.name}: serving {shares}")

    def _pool(self, mv: ModelVersion) -> Pool:
        path = str(self._db.blob_store.fetch(mv.artifact_sha256))
        scaler = Autoscaler(
            self.spec.min_replicas, self.spec.max_replicas, self.spec.target_concurrency,
            self.spec.idle_timeout, since=time.monotonic(),
        )  # fmt: skip
        run = self._db.get_run(mv.run_id)
        trace = (run.trace_id, run.span_id) if run.trace_id and run.span_id else None
        return Pool(mv, path, scaler, run_trace=trace)

    async def _drain(self, pool: Pool) -> None:
        while pool.inflight:
            await asyncio.sleep(0.01)
        await asyncio.gather(*(self._retire(pool, r) for r in list(pool.replicas)))
        self._metrics.forget(pool.version.version)

    # -- background work --------------------------------------------------------------

    async def _watch(self) -> None:
        """Follow the alias and the live split."""
        while not self._closing:
            await asyncio.sleep(POLL_S)
            try:
                targets = await asyncio.to_thread(self._targets)
                key = tuple(sorted(targets.items()))
                if targets != self.weights and key not in self._failed_targets:
                    await self._route(targets)
            except _Unavailable as exc:
                self._failed_targets.add(key)
                _say(f"{self.spec.name}: keeps serving what it served: {exc}")
            except KilnError as exc:
                _say(f"{self.spec.name}: cannot follow {self.spec.model}: {exc}")
            except Exception as exc:  # the store may be briefly unavailable; try again
                _log.warning("kiln: polling endpoint %s failed: %s", self.spec.name, exc)

    async def _scale(self) -> None:
        while not self._closing:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for pool in list(self.pools.values()):
                current = pool.size
                want = pool.autoscaler.desired(current=current, peak_inflight=pool.peak, now=now)
                pool.peak = pool.inflight
                if want > current and pool.error is None:
                    for _ in range(want - current):
                        self._spawn(pool)
                elif want < current:
                    surplus = sorted(pool.replicas, key=_inflight)[: current - want]
                    for replica in surplus:
                        self._tasks.append(asyncio.create_task(self._retire(pool, replica)))
            self._gauges()
            self._tasks = [t for t in self._tasks if not t.done()]

    async def _report(self) -> None:
        server_id = self._server_id
        while not self._closing and server_id is not None:
            await asyncio.sleep(REPORT_S)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(
                    state.report, self._db, server_id, self.stats(), url=self.url
                )
            await asyncio.to_thread(self._flush_logs)

    def _output(self, replica: Replica, stream: str, at: float, data: bytes) -> None:
        """What a replica printed (its pipe's thread): kept for the store, by version, up
        to :data:`~kiln.record.output.LOG_LIMIT_BYTES` a version."""
        version = replica.version
        with self._log_lock:
            kept = self._log_kept.get(version, 0)
            if kept + len(data) > LOG_LIMIT_BYTES:
                self._log_dropped[version] = self._log_dropped.get(version, 0) + len(data)
                return
            self._log_kept[version] = kept + len(data)
        text = clean(data)
        rows = [(self.spec.name, version, replica.pid, at, stream, text[i : i + LOG_CHUNK_CHARS])
                for i in range(0, len(text), LOG_CHUNK_CHARS)]  # fmt: skip
        with self._log_lock:
            self._log_rows.extend(rows)

    def _flush_logs(self) -> None:
        """Store what replicas printed since the last flush (and what was left out)."""
        with self._log_lock:
            rows, self._log_rows = self._log_rows, []
            dropped, self._log_dropped = self._log_dropped, {}
        now = time.time()
        for version, size in dropped.items():
            rows.append((self.spec.name, version, 0, now, "kiln",
                         f"[kiln] {size:,} bytes of replica output past the limit of "
                         f"{LOG_LIMIT_BYTES >> 20} MiB a version were not recorded\n"))  # fmt: skip
        if not rows:
            return
        try:
            self._db.write_endpoint_logs(rows)
        except Exception as exc:  # shown on the terminal all the same; not kept
            _say(f"{len(rows)} chunks of replica output were not recorded: {exc}")

    def _gauges(self) -> None:
        for pool in self.pools.values():
            self._metrics.replicas.labels(self.spec.name, str(pool.version.version)).set(
                len(pool.replicas)
            )
        self._metrics.inflight.set(self.inflight)

    def stats(self) -> dict[str, Any]:
        """Figures for ``kiln endpoints show``: requests, errors, latency, replicas, and
        resource-seconds and cost per request, by version and in all. Every version
        served since it started counts, also one no longer routed (a canary's)."""
        latencies = sorted(self._latencies)
        total = Usage()
        versions: dict[str, Any] = {}
        gpu_type = self._gpu_type()
        by_version: dict[int, list[Pool]] = {}
        for pool in [*self._retired, *self.pools.values()]:
            by_version.setdefault(pool.version.version, []).append(pool)
        for version, pools in sorted(by_version.items()):
            usage = self._usage(pools)
            total = total + usage
            versions[str(version)] = {
                "weight": self.weights.get(version, 0.0),
                "replicas": sum(len(p.replicas) for p in pools),
                "requests": usage.requests,
                "errors": sum(p.errors for p in pools),
                "cold_starts_s": [c for p in pools for c in p.cold_starts][-5:],
                "usage": usage.per_request(),
                "run_id": pools[0].version.run_id,
            }
        out: dict[str, Any] = {
            "requests": total.requests,
            "errors": sum(v["errors"] for v in versions.values()),
            "inflight": self.inflight,
            "replicas": sum(v["replicas"] for v in versions.values()),
            "latency_ms": {
                "p50": _quantile(latencies, 0.5) * 1000,
                "p99": _quantile(latencies, 0.99) * 1000,
            },
            "per_request": total.per_request(),
            "versions": versions,
            "gpu_type": gpu_type,
        }
        if self.prices is not None:
            out["cost_per_1k_requests"] = self.prices.per_1k_requests(total, gpu_type)
        return out

    def _usage(self, pools: list[Pool]) -> Usage:
        """What the requests of ``pools`` (one version's) used."""
        memory_gb = self.spec.resources.memory_bytes / 2**30
        total = Usage()
        for pool in pools:
            busy_s = pool.busy_ns / 1e9
            total = total + Usage(pool.requests, pool.cpu_ns / 1e9,
                                  busy_s * self.spec.resources.gpu, busy_s * memory_gb)  # fmt: skip
        return total

    def _gpu_type(self) -> str | None:
        names = self._engine.inventory.gpu_names if self._engine else ()
        return names[0] if names and self.spec.resources.gpu else None

    @property
    def store(self) -> KilnStore | None:
        return self._store

    @property
    def _db(self) -> KilnStore:
        """The store, once started."""
        if self._store is None:
            raise RuntimeError(f"{self.spec.name}: the endpoint server has not started")
        return self._store

    def describe(self) -> dict[str, Any]:
        return {
            "endpoint": self.spec.name,
            "model": self.spec.model,
            "serving": {
                self.pools[v].version.ref: w for v, w in self.weights.items() if v in self.pools
            },
            "ready": self.ready,
            "routes": [
                "POST /predict",
                "GET /healthz",
                "GET /readyz",
                "GET /metrics",
                "GET /openapi.json",
            ],
        }

    def openapi(self) -> dict[str, Any]:
        """The endpoint's OpenAPI document (see :mod:`kiln.serve.openapi`)."""
        if self._openapi is None:
            from kiln.serve.openapi import document

            self._openapi = document(
                self.endpoint.cls, title=f"{self.spec.name} (kiln endpoint)",
                description=f"Serves {self.spec.model}. {self.endpoint.__doc__ or ''}".strip(),
            )  # fmt: skip
        return self._openapi

    async def _prometheus(self, send: Send) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self._gauges()
        body = generate_latest(self.registry)
        headers = [(b"content-type", CONTENT_TYPE_LATEST.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- start and stop ------------------------------------------------------------------

    async def startup(self) -> None:
        from kiln.record.recorder import recorder_for

        self._engine = await asyncio.to_thread(self.endpoint.app._engine)
        self._engine.inventory.check(self.spec.resources)
        self._store = recorder_for(self.settings).store
        if self.spec.env is not None:
            from kiln.envs.manager import env_manager

            manager = env_manager(self.settings.home, self._db.blob_store)
            built = await asyncio.to_thread(manager.ensure, self.spec.env)
            self._python, self._env_lock = str(built.python), str(built.lock_file)
        with contextlib.suppress(OSError, ValueError):
            self._preload = list(json.loads(self._preload_file.read_text()))
        await asyncio.to_thread(
            state.check_declared_traffic, self._db, self.spec, self.settings.actor
        )
        self._refill()
        targets = await asyncio.to_thread(self._targets)
        await self._route(targets)
        self._server_id = await asyncio.to_thread(state.announce, self._db, self.spec, self.url)
        self.ready = True
        self._background = [asyncio.create_task(c()) for c in (self._watch, self._scale,
                                                               self._report)]  # fmt: skip

    async def shutdown(self) -> None:
        self._closing = True
        self.ready = False
        for task in getattr(self, "_background", []):
            task.cancel()
        pools = list(self.pools.values())
        for pool in pools:
            while pool.inflight:
                await asyncio.sleep(0.01)
        await asyncio.gather(*(self._retire(p, r) for p in pools for r in list(p.replicas)))
        if self._standby is not None:
            await _discard(self._standby)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for lease_id in list(self._leases):  # whatever a cancelled start still held
            self._release(lease_id)
        for replica in self._spawned:
            replica.close()
        if self._provider is not None:
            await asyncio.to_thread(self._provider.shutdown)  # stores its last spans
        await asyncio.sleep(0.05)  # the pipes' close callbacks run on the next turns
        await asyncio.to_thread(self._flush_logs)
        if self._server_id is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(
                    state.report,
                    self._db,
                    self._server_id,
                    self.stats(),
                    status="stopped",
                    url=self.url,
                )

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except BaseException as exc:
                    self.startup_error = exc
                    await self.shutdown()  # stop whatever started: standby, replicas
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    startup_error: BaseException | None = None


async def _discard(task: asyncio.Task[Replica]) -> None:
    with contextlib.suppress(Exception):
        await (await task).stop()


class _Unavailable(Exception):
    """No replica can answer (its version failed to start)."""


class _Metrics:
    """The Prometheus series of one endpoint."""

    def __init__(self, registry: Any, endpoint: str) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.endpoint = endpoint
        buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
        self.requests = Counter("kiln_requests", "Requests answered, by model version and "
                                "HTTP status", ["endpoint", "version", "code"],
                                registry=registry)  # fmt: skip
        self.errors = Counter("kiln_request_errors", "Requests not answered 200",
                              ["endpoint", "version", "code"], registry=registry)  # fmt: skip
        self.latency = Histogram("kiln_request_duration_seconds", "Request latency at the "
                                 "front door, by model version (a canary's beside the stable "
                                 "one's)", ["endpoint", "version"], buckets=buckets,
                                 registry=registry)  # fmt: skip
        self._latencies: dict[int | None, Any] = {}
        self.inflight = Gauge("kiln_inflight_requests", "Requests in flight", ["endpoint"],
                              registry=registry).labels(endpoint)  # fmt: skip
        self.replicas = Gauge("kiln_replicas", "Ready replicas by model version",
                              ["endpoint", "version"], registry=registry)  # fmt: skip
        self.model = Gauge("kiln_model_version_weight", "Traffic share (0 to 1) of each "
                           "model version served", ["endpoint", "model", "version"],
                           registry=registry)  # fmt: skip
        self.cold_start = Histogram("kiln_cold_start_seconds", "Time from a request finding "
                                    "no replica to a replica ready", ["endpoint"],
                                    buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60),
                                    registry=registry).labels(endpoint)  # fmt: skip
        self._counters: dict[tuple[int | None, int], Any] = {}

    def observe(self, version: int | None, code: int, elapsed: float) -> None:
        """One request answered ``code`` by ``version`` (None: routed to no version)
        after ``elapsed`` seconds."""
        self.count(version, code)
        latency = self._latencies.get(version)
        if latency is None:
            label = "none" if version is None else str(version)
            latency = self._latencies[version] = self.latency.labels(self.endpoint, label)
        latency.observe(elapsed)

    def count(self, version: int | None, code: int) -> None:
        """One request answered ``code`` by ``version`` (None: routed to no version)."""
        counter = self._counters.get((version, code))
        label = "none" if version is None else str(version)
        if counter is None:
            counter = self.requests.labels(self.endpoint, label, str(code))
            self._counters[(version, code)] = counter
        counter.inc()
        if code != 200:
            self.errors.labels(self.endpoint, label, str(code)).inc()

    def routing(self, weights: dict[int, float], pools: dict[int, Pool]) -> None:
        total = sum(weights.values()) or 1.0
        self.model.clear()
        for version, weight in weights.items():
            name = pools[version].version.name
            self.model.labels(self.endpoint, name, str(version)).set(weight / total)

    def forget(self, version: int) -> None:
        with contextlib.suppress(KeyError):
            self.replicas.remove(self.endpoint, str(version))


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]


_ROUTES = ["/predict", "/healthz", "/readyz", "/metrics", "/openapi.json", "/"]


def _request_headers(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, int]:
    """The caller's W3C trace context as a replica reads it (see ``REQUEST`` in
    :mod:`kiln.serve._replica`: ``traceparent``, then ``tracestate``, several combined,
    after a newline; parsed in the replica by OpenTelemetry's propagator; none if
    ``traceparent`` came twice, as W3C's test suite wants), and the declared body
    length (0 if none)."""
    parent = state = b""
    parents, length = 0, 0
    for name, value in headers:
        if name == b"traceparent":
            parent, parents = value, parents + 1
        elif name == b"tracestate":
            state = value if not state else state + b"," + value
        elif name == b"content-length" and value.isdigit():
            length = int(value)
    if parents != 1:
        return b"", length
    return (parent + b"\n" + state if state else parent), length


def _trace_context(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The caller's W3C trace context (see :func:`_request_headers`)."""
    return _request_headers(headers)[0]


class _Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


async def _read_body(receive: Receive, scope: Scope) -> bytes:
    """The request body, at most ``MAX_BODY`` bytes (its deadline is the protocol's)."""
    message = await receive()
    body: bytes = message.get("body", b"")
    while message.get("more_body") or message["type"] == "http.disconnect":
        if message["type"] == "http.disconnect":
            if scope.get("kiln.too_slow"):  # closed by the sweep, answered 408
                raise _Refused(408, "the request did not arrive in time")
            raise _Refused(499, "the client went away before sending the whole body")
        message = await receive()
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            raise _Refused(413, f"request body over {MAX_BODY} bytes")
    return body


async def _respond(
    send: Send, status: int, payload: Any, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload).encode()
    headers = [_JSON, (b"content-length", str(len(body)).encode()), *(extra or ())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _protocol() -> Any:
    """uvicorn's HTTP protocol with deadlines (see :mod:`kiln._deadlines`)."""
    from kiln._deadlines import deadline_protocol

    return deadline_protocol(header_s=HEADER_TIMEOUT_S, body_s=BODY_TIMEOUT_S,
                             too_slow=b'{"error": "the request did not arrive in time"}',
                             content_type=b"application/json")  # fmt: skip


@dataclass
class ServerHandle:
    """A server running in a background thread (``Endpoint.serve(block=False)``)."""

    url: str
    app: EndpointServer
    _server: Any
    _thread: threading.Thread

    def stop(self, timeout: float = 30.0) -> None:
        """Drain in-flight requests, stop the replicas, stop serving."""
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(
    endpoint: Endpoint[Any], *, host: str = "127.0.0.1", port: int = 8000, block: bool = True
) -> ServerHandle | None:
    """Serve ``endpoint`` on ``host:port`` (port 0: any free port)."""
    from kiln._optional import require

    require("uvicorn", extra="serve")
    import uvicorn

    app = EndpointServer(endpoint)
    # Bound here, before the app starts, so that the address it announces is the real
    # one even for port 0.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValidationError("port", f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound = sock.getsockname()[1]
    app.url = f"http://{'[' + host + ']' if family == socket.AF_INET6 else host}:{bound}"
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=30, http=_protocol(),
                            limit_concurrency=MAX_CONNECTIONS)  # fmt: skip
    server = uvicorn.Server(config)
    if block:
        _say(f"{endpoint.name}: listening on {app.url}")
        with sock:
            server.run(sockets=[sock])
        if app.startup_error is not None:
            raise app.startup_error
        return None

    def run() -> None:
        # uvicorn exits when startup fails; app.startup_error says why
        with sock, contextlib.suppress(SystemExit):
            server.run(sockets=[sock])

    thread = threading.Thread(target=run, name=f"kiln-serve-{endpoint.name}", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.01)
    if not server.started:
        thread.join(5)
        raise app.startup_error or RuntimeError(f"{endpoint.name} did not start serving")
    return ServerHandle(app.url, app, server, thread)
