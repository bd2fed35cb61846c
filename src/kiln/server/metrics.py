"""The server's own figures in Prometheus' format, at ``/metrics``.

Besides requests, latency and ingested points, ``kiln_runs{project, status}``: the
runs of the record that are ``queued`` or ``running``, by project, counted in one
query at each scrape (a project with no such run has no series). Only those live
states: ended runs only grow (a count of them says nothing a rate of the engines'
``kiln_engine_tasks_finished_total`` does not), and counting them would read the
whole table. Labels are the project and status, never the app or the run: their
number stays that of the projects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kiln.errors import KilnError
from kiln.record.model import LIVE_STATUSES, RunStatus

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
LIVE = LIVE_STATUSES
CountRuns = Callable[[Sequence[RunStatus]], list[tuple[str, str, int]]]
_log = logging.getLogger("kiln")


class RunsCollector(Collector):
    """``kiln_runs{project, status}`` from ``count`` (the store's ``count_runs``) at
    each scrape. A store that cannot answer leaves the family out, with a warning:
    the server's own figures are still served."""

    def __init__(self, count: CountRuns) -> None:
        self._count = count

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self._count(LIVE)
        except KilnError as e:
            _log.warning("kiln server: /metrics without kiln_runs: %s", e)
            return
        found = {(project, status): n for project, status, n in counts}
        family = GaugeMetricFamily(
            "kiln_runs", "Runs queued or running in the record, by project and status.",
            labels=["project", "status"],
        )  # fmt: skip
        for project in sorted({project for project, _ in found}):
            for status in LIVE:  # both, 0 where none: a sum never loses a series
                family.add_metric([project, status.value], found.get((project, status.value), 0))
        yield family


def exposition(count: CountRuns) -> bytes:
    """The text of ``/metrics``: the server's figures, then the runs counted now."""
    runs = CollectorRegistry(auto_describe=False)
    runs.register(RunsCollector(count))
    return generate_latest(REGISTRY) + generate_latest(runs)
