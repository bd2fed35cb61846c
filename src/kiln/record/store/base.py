"""The store interface. Writes arrive as batches, one transaction each; reads return records.

Five methods and a lifecycle, so that the SQL store, a team server's HTTP client
and test fakes can all stand behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from kiln.record.model import MetricPoint, RunRecord, RunStatus

# (run_id, key, step, time, value); value None stands for NaN where the database
# cannot store NaN (SQLite turns NaN into NULL).
MetricRow = tuple[str, str, int, float, float | None]


@dataclass(slots=True)
class WriteBatch:
    """Everything one flush writes, in one transaction.

    ``new_runs`` and ``artifacts`` are column dicts; ``updates`` are partial
    column dicts that each carry ``id``; ``summaries`` are (run_id, app, key, value)
    upserts of a run's latest value per metric.
    """

    new_runs: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[MetricRow] = field(default_factory=list)
    summaries: list[tuple[str, str, str, float]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    seal: list[str] = field(default_factory=list)  # ended runs to seal in the audit log
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (run_id, what was dropped)
    # Where ``new_runs`` came from, if not from this store's own processes (a bundle):
    # their events are then this store's actor's, and a ``run.import`` event says so.
    origin: dict[str, Any] | None = None

    def __bool__(self) -> bool:
        return any(getattr(self, part) for part in WRITE_PARTS)

    def halves(self) -> tuple[WriteBatch, WriteBatch] | None:
        """This batch's rows in two batches, in the order they are written; None if it
        holds a single row (to find the rows a store refuses, by bisection)."""
        rows = [(part, row) for part in WRITE_PARTS for row in getattr(self, part)]
        if len(rows) < 2:
            return None
        first, second = WriteBatch(), WriteBatch()
        for i, (part, row) in enumerate(rows):
            getattr(first if i < len(rows) // 2 else second, part).append(row)
        return first, second


WRITE_PARTS = ("new_runs", "metrics", "summaries", "artifacts", "updates", "seal", "warnings")


@dataclass(frozen=True, slots=True)
class RunQuery:
    """A filter and order over runs.

    ``order_by`` is a run field (``created``, ``started``, ``ended``, ``name``, ``status``)
    or a summary metric (``accuracy`` or ``metrics.accuracy``), with a leading ``-``
    for descending. Ordering by a metric puts runs that lack it (or hold NaN) last.
    """

    app: str | None = None
    status: tuple[RunStatus, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    parent_id: str | None = None
    env_id: str | None = None  # runs in this declared environment
    order_by: str = "-created"
    limit: int | None = 100
    reproductions: bool = True  # False: leave out reproductions (tagged reproduced_from)


class Store(Protocol):
    """Where run records live."""

    url: str

    def write(self, batch: WriteBatch) -> None:
        """Apply ``batch`` atomically."""

    def get_run(self, run_id: str) -> RunRecord:
        """The run with this id or unique id prefix; RunNotFoundError or AmbiguousIdError."""

    def query_runs(self, query: RunQuery) -> list[RunRecord]:
        """Runs matching ``query``, in its order."""

    def metric_history(self, run_id: str, key: str) -> list[MetricPoint]:
        """Every point of one metric of one run, by step then time."""

    def close(self) -> None:
        """Release connections. The store is unusable afterwards."""
