"""The server's own figures in Prometheus' format, at ``/metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
REQUESTS = Counter(
    "kiln_server_requests", "Requests answered, by route template, method and status code.",
    ["route", "method", "code"], registry=REGISTRY,
)  # fmt: skip
LATENCY = Histogram(
    "kiln_server_request_duration_seconds", "Time to answer a request, by route template.",
    ["route"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)  # fmt: skip
INGESTED = Counter(
    "kiln_server_ingested_points", "Metric points applied from batches.", registry=REGISTRY
)
