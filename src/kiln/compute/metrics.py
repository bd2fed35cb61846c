"""An engine's figures in Prometheus' format, and the HTTP server a driver serves them on.

- ``kiln_engine_queue_depth``: tasks waiting for admission;
- ``kiln_engine_running_tasks``: tasks admitted and running;
- ``kiln_engine_resources{resource, gpu_type, state}``: ``cpu`` (cores),
  ``memory_bytes`` and ``gpu`` (devices, a fractional share counted as its fraction,
  per model in ``gpu_type``), each as ``capacity``, ``admitted`` and ``free``;
- ``kiln_engine_reservations{state}``: serving replicas ``queued`` for resources, or
  ``held`` (what they hold is in ``admitted``);
- ``kiln_engine_worker_starts_total``: worker processes started;
- ``kiln_engine_tasks_finished_total{status}``: tasks ended ``succeeded``, ``failed``
  or ``cancelled``;
- ``kiln_engine_task_failures_total{cause}``: tasks that did not succeed, by cause:
  ``error``, ``timeout``, ``worker_died`` or ``cancelled``.

Every label takes values from a small fixed set (the GPU models of the machine), never
a run's id or message. The collector asks its engine for a snapshot at each scrape
(:mod:`kiln.compute.figures`): nothing is updated between scrapes, and the engine's
state is read by the thread that owns it. Counts are of attempts, and start at zero
with the engine.

prometheus_client comes with the ``server`` extra; this module is imported only
when metrics are asked for (``KILN_METRICS_PORT``).
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from kiln.compute.figures import Figures
from kiln.errors import ConfigError, MissingDependencyError

try:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the extra is installed in development
    raise MissingDependencyError("prometheus_client", "server") from exc


class EngineCollector(Collector):
    """The figures of one engine, read at each scrape from ``figures`` (a backend's
    :meth:`~kiln.compute.figures.Measured.figures`)."""

    def __init__(self, figures: Callable[[], Figures]) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        f = self._figures()
        yield GaugeMetricFamily(
            "kiln_engine_queue_depth", "Tasks waiting for admission.", value=f.queued
        )
        yield GaugeMetricFamily(
            "kiln_engine_running_tasks", "Tasks admitted and running.", value=f.running
        )
        resources = GaugeMetricFamily(
            "kiln_engine_resources",
            "The engine's resources: capacity = admitted + free. CPUs in cores, memory in "
            "bytes, GPUs in devices (a fractional share counts as its fraction), per model.",
            labels=["resource", "gpu_type", "state"],
        )
        for pool in f.resources:
            for state, value in (("capacity", pool.capacity), ("admitted", pool.admitted),
                                 ("free", pool.free)):  # fmt: skip
                resources.add_metric([pool.resource, pool.gpu_type, state], value)
        yield resources
        reservations = GaugeMetricFamily(
            "kiln_engine_reservations",
            "Serving replicas waiting for resources (queued) or holding them (held).",
            labels=["state"],
        )
        reservations.add_metric(["queued"], f.reservations_queued)
        reservations.add_metric(["held"], f.reservations_held)
        yield reservations
        yield CounterMetricFamily(
            "kiln_engine_worker_starts", "Worker processes started.", value=f.worker_starts
        )
        finished = CounterMetricFamily(
            "kiln_engine_tasks_finished", "Tasks (attempts) ended, by status.", labels=["status"]
        )
        for status, count in f.finished.items():
            finished.add_metric([status], count)
        yield finished
        failures = CounterMetricFamily(
            "kiln_engine_task_failures",
            "Tasks (attempts) that did not succeed, by cause: error, timeout, worker_died, "
            "cancelled.",
            labels=["cause"],
        )
        for cause, count in f.failures.items():
            failures.add_metric([cause], count)
        yield failures


def engine_registry(figures: Callable[[], Figures]) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) with one engine's
    figures: a process may hold several engines, and tests build many."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(figures))
    return registry


@dataclass
class Served:
    """A registry served over HTTP at ``http://host:port/metrics``; :meth:`close` stops it."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(registry: CollectorRegistry, host: str, port: int) -> Served:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    Raises :class:`ConfigError` naming ``KILN_METRICS_PORT`` (or ``KILN_METRICS_HOST``)
    when the port is in use or the address cannot be bound."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except socket.gaierror as e:
        raise ConfigError("KILN_METRICS_HOST", f"cannot resolve {host!r}: {e.strerror}") from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                "KILN_METRICS_PORT",
                f"port {port} on {host} is already in use (another driver or service "
                "listens there); choose a free port for this driver's engine metrics",
            ) from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(
                "KILN_METRICS_HOST", f"{host} is not an address of this machine"
            ) from None
        raise ConfigError(
            "KILN_METRICS_PORT", f"cannot serve metrics on {host}:{port}: {e.strerror or e}"
        ) from None
    thread.name = "kiln-metrics"
    return Served(host, server.server_port, server, thread)
