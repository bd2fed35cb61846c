"""The record as JSON on the wire between ``kiln server`` and its HTTP clients.

JSON has no NaN or infinity, and metric values and summaries may be either: on the
wire they are the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (what
pydantic reads back as floats). Everything else a run holds is plain JSON already
(:func:`kiln.record.values.to_json` refuses the rest before it is recorded).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from kiln.record.model import Artifact, MetricPoint, RunRecord, record_from_row
from kiln.record.store.base import EndpointRow, RunQuery, ServerRow, WriteBatch

if TYPE_CHECKING:
    from kiln.record.store.base import BlobStore, RunStore

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
RUN_COLUMNS = (
    "id", "app", "name", "function", "status", "actor", "host", "pid", "engine", "parent_id",
    "created_at", "started_at", "ended_at", "heartbeat_at", "params", "tags", "result", "error",
    "code", "environment", "usage", "attempt", "resources", "volatile_metrics", "trace_id",
    "span_id",
)  # fmt: skip


def number(value: float | None) -> float | str | None:
    """A float as the wire holds it (non-finite values as strings)."""
    if value is None or math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def from_number(value: float | str | None) -> float | None:
    """A float from the wire (see :func:`number`)."""
    if isinstance(value, str):
        return _NON_FINITE[value]
    return None if value is None else float(value)


def batch_to_wire(batch: WriteBatch) -> dict[str, Any]:
    """``batch`` as JSON data (its ``key`` and ``actor`` travel as headers)."""
    return {
        "new_runs": [row.model_dump(mode="json") for row in batch.new_runs],
        "metrics": [[r, k, s, t, number(v)] for r, k, s, t, v in batch.metrics],
        "summaries": [[r, a, k, number(v)] for r, a, k, v in batch.summaries],
        "artifacts": [art.model_dump(mode="json") for art in batch.artifacts],
        "updates": [u.model_dump(mode="json", exclude_unset=True) for u in batch.updates],
        "seal": batch.seal,
        "warnings": [list(w) for w in batch.warnings],
        "logs": [list(r) for r in batch.logs],
        "origin": batch.origin,
    }


def record_to_wire(record: RunRecord) -> dict[str, Any]:
    """A run record as JSON data: its row, its summary and its artifacts."""
    row: dict[str, Any] = {name: getattr(record, name) for name in RUN_COLUMNS}
    row["status"] = str(record.status)
    for part in ("code", "environment", "usage"):
        row[part] = asdict(row[part])
    row["volatile_metrics"] = list(record.volatile_metrics)
    return {
        "run": row,
        "summary": {k: number(v) for k, v in record.summary.items()},
        "artifacts": [asdict(a) for a in record.artifacts],
    }


def record_from_wire(
    data: dict[str, Any], store: RunStore | None, blobs: BlobStore | None
) -> RunRecord:
    """A run record read from the wire, bound to ``store`` and ``blobs``."""
    summary = {k: v for k, raw in data["summary"].items() if (v := from_number(raw)) is not None}
    arts = tuple(Artifact(**a) for a in data["artifacts"])
    return record_from_row(data["run"], summary, arts, store, blobs)


def query_to_wire(query: RunQuery) -> dict[str, Any]:
    out = asdict(query)
    out["status"] = [str(s) for s in query.status]
    out["metrics"] = [{"key": k, "op": o, "value": v} for k, o, v in query.metrics]
    return out


def points_to_wire(points: list[MetricPoint]) -> list[list[float | int | str | None]]:
    return [[p.step, p.time, number(p.value)] for p in points]


def points_from_wire(rows: list[list[Any]]) -> list[MetricPoint]:
    return [MetricPoint(int(s), float(t), from_number(v) or 0.0) if v is not None
            else MetricPoint(int(s), float(t), math.nan) for s, t, v in rows]  # fmt: skip


def endpoint_from_wire(data: dict[str, Any]) -> EndpointRow:
    return EndpointRow(**data)


def server_from_wire(data: dict[str, Any]) -> ServerRow:
    return ServerRow(**data)
