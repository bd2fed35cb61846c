"""The wire schema of ``/api/v1``: typed rows with the limits of the store's columns.

What a client sends is untrusted: every row is checked here (unknown fields, wrong
types, names longer than their column) before the store sees it, and a refusal names
the field. Non-finite floats travel as ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``
(see :mod:`kiln.record.store._wire`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

from kiln.record.store.base import LOG_CHUNK_CHARS
from kiln.record.store.rows import (
    JSON,
    MAX_DEPTH,
    NAME_PATTERN,
    ArtifactRow,
    Id,
    Int32,
    Int64,
    Key,
    ModelName,
    Name,
    RunId,
    RunRow,
    RunUpdate,
    Sha,
    Short,
    SpanRow,
    Status,
    Strict,
    Text,
    plain_json,
)

ALIAS_PATTERN = r"^[a-z][a-z0-9_-]{0,99}$"  # kiln.registry.refs
REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}(:[1-9][0-9]{0,8}|@[a-z][a-z0-9_-]{0,99})$"
TRACE_PATTERN = r"^[0-9a-fA-F]{8,32}$"
Ref = Annotated[str, StringConstraints(pattern=REF_PATTERN)]
Number = float | Literal["NaN", "Infinity", "-Infinity"] | None

__all__ = [
    "JSON",
    "MAX_DEPTH",
    "NAME_PATTERN",
    "ArtifactRow",
    "Id",
    "Int64",
    "Key",
    "ModelName",
    "Name",
    "RunId",
    "RunRow",
    "RunUpdate",
    "Sha",
    "Short",
    "SpanRow",
    "Status",
    "Strict",
    "Text",
    "plain_json",
]  # fmt: skip


Time = Annotated[float, Field(allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Comparison = Literal["<", "<=", ">", ">=", "=", "!="]
LogStream = Literal["stdout", "stderr", "kiln"]
# Whole lines a run printed, as the capture cuts them (no NUL: PostgreSQL text has none).
LogText = Annotated[str, StringConstraints(max_length=LOG_CHUNK_CHARS, pattern=r"^[^\x00]*$")]


class Batch(Strict):
    """What one flush of a client writes, applied in one transaction. Metric points are
    ``[run_id, key, step, time, value]``; summaries ``[run_id, app, key, value]``."""

    new_runs: list[RunRow] = Field(default_factory=list)
    metrics: list[tuple[RunId, Key, Int64, float, Number]] = Field(default_factory=list)
    summaries: list[tuple[RunId, ModelName, Key, Number]] = Field(default_factory=list)
    artifacts: list[ArtifactRow] = Field(default_factory=list)
    updates: list[RunUpdate] = Field(default_factory=list)
    seal: list[RunId] = Field(default_factory=list)
    warnings: list[tuple[RunId, Text]] = Field(default_factory=list)
    logs: list[tuple[RunId, Time, LogStream, LogText]] = Field(default_factory=list)
    origin: dict[str, JSON] | None = None


class BatchApplied(BaseModel):
    points: int


class MetricFilter(Strict):
    """Runs whose summary metric ``key`` compares so with ``value`` (NaN: never)."""

    key: Key
    op: Comparison
    value: Finite


class Query(Strict):
    """A filter and order over runs (see :class:`kiln.record.store.base.RunQuery`)."""

    app: Name | None = None
    status: list[Status] = Field(default_factory=list)
    params: dict[str, JSON] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    parent_id: Id | None = None
    env_id: Short | None = None
    order_by: Annotated[str, StringConstraints(min_length=1, max_length=260)] = "-created"
    limit: Annotated[int, Field(ge=1, le=100_000)] | None = 100
    reproductions: bool = True
    metrics: list[MetricFilter] = Field(default_factory=list, max_length=50)
    text: Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00]*$")] | None = None
    offset: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    total: bool = False  # also count every run that matches (a table's pages)


class Run(BaseModel):
    """A run record: its row, summary (non-finite values as strings) and artifacts."""

    run: dict[str, JSON]
    summary: dict[str, Number]
    artifacts: list[dict[str, JSON]]


class Runs(BaseModel):
    runs: list[Run]
    total: int | None = None  # with ``total``: how many runs match in all


class GroupQuery(Strict):
    """Runs of ``query`` grouped by ``by`` (``params.NAME`` or ``tags.NAME``), with the
    spread of each metric of ``metrics`` in each group."""

    query: Query = Field(default_factory=lambda: Query())
    by: Annotated[str, StringConstraints(min_length=1, max_length=260)]
    metrics: list[Key] = Field(default_factory=list, max_length=20)


class Spread(BaseModel):
    mean: float
    median: float
    min: float
    max: float
    n: int


class Group(BaseModel):
    value: JSON
    runs: int
    metrics: dict[str, Spread]


class Groups(BaseModel):
    groups: list[Group]


class Columns(BaseModel):
    """The param, tag and metric names of the newest 1,000 runs that match."""

    params: list[str]
    tags: list[str]
    metrics: list[str]


class SeriesQuery(Strict):
    """Metric series of runs for a chart: up to ``points`` points each, the extremes
    of each step bucket kept; between ``min_step`` and ``max_step`` (a zoom) exact
    where that holds no more than ``points``."""

    runs: list[RunId] = Field(min_length=1, max_length=1000)
    keys: list[Key] = Field(min_length=1, max_length=50)
    points: Annotated[int, Field(ge=2, le=20_000)] = 2000
    min_step: Int64 | None = None
    max_step: Int64 | None = None


class Series(BaseModel):
    run: str
    key: str
    points: list[tuple[int, Number]]  # [step, value]
    total: int  # points held in the range


class SeriesOut(BaseModel):
    series: list[Series]


class Points(BaseModel):
    """``[step, time, value]`` in step then time order."""

    points: list[list[JSON]]


class Rows(BaseModel):
    run: dict[str, JSON]
    metrics: list[list[JSON]]  # [key, step, time, value]
    summary: dict[str, Number]
    artifacts: list[dict[str, JSON]]
    logs: list[list[JSON]] = Field(default_factory=list)  # [time, stream, text]


LogItem = tuple[Int32 | None, Int32, Time, LogStream, LogText]


class EndpointLogsIn(Strict):
    """What replicas of the endpoint printed: ``[version, replica pid, time, stream,
    text]`` chunks (version null: a standby's)."""

    logs: list[LogItem] = Field(max_length=10_000)


class LogChunk(BaseModel):
    """Whole lines of one stream (``stdout``, ``stderr``, or ``kiln`` for Kiln's own
    notes), read at ``time``; ``id`` orders chunks (ask with ``after`` for the next)."""

    id: int
    time: float
    stream: str
    text: str


class EndpointLogChunk(LogChunk):
    """A chunk a replica printed, with the model ``version`` it served (null: a standby
    before it loaded one) and its process id (``replica``)."""

    version: int | None
    replica: int


class EndpointLogs(BaseModel):
    """What replicas of an endpoint printed, oldest first."""

    logs: list[EndpointLogChunk]


class Logs(BaseModel):
    """What a run printed, oldest first; ask again with ``after`` set to the last id for
    what follows."""

    logs: list[LogChunk]


class Names(BaseModel):
    items: list[str]


class Problem(BaseModel):
    """An error (RFC 9457)."""

    type: str
    title: str
    status: int
    detail: str


class Event(BaseModel):
    seq: int
    time: float
    actor: str
    action: str
    target: str
    payload: str
    payload_sha256: str
    prev_hash: str
    hash: str


class Events(BaseModel):
    events: list[Event]


class Head(BaseModel):
    seq: int
    hash: str


class Verdict(BaseModel):
    problems: list[dict[str, JSON]]


class GcRequest(Strict):
    min_age_s: Annotated[float, Field(ge=0)] = 3600.0
    dry_run: bool = False


class GcDone(BaseModel):
    removed: list[str]
    kept: int


# -- serving ----------------------------------------------------------------------------


class EndpointIn(Strict):
    name: Name
    app: Name
    model: Annotated[str, StringConstraints(min_length=1, max_length=300)]
    spec: dict[str, JSON]
    traffic: dict[str, float] | None
    updated_at: float


class ServerOut(BaseModel):
    id: str
    endpoint: str
    url: str | None
    host: str | None
    pid: int | None
    status: str
    stats: dict[str, JSON]
    started_at: float
    updated_at: float


class ServerIn(Strict):
    """A server of the endpoint it is announced with."""

    id: Id
    url: Short | None
    host: Annotated[str, StringConstraints(max_length=255)] | None
    pid: Annotated[int, Field(ge=0, le=2**31 - 1)] | None
    status: Literal["serving", "stopped"]
    stats: dict[str, JSON]
    started_at: float
    updated_at: float


class Announce(Strict):
    endpoint: EndpointIn
    server: ServerIn
    forget: list[Id] = Field(default_factory=list)


class Report(Strict):
    status: Literal["serving", "stopped"]
    stats: dict[str, JSON] | None = None
    url: Short | None = None


class Traffic(Strict):
    """A live split to check and set (null: follow the declared model again); the server
    writes the audit event itself."""

    traffic: Annotated[dict[Ref, float], Field(min_length=1, max_length=100)] | None
    override_reason: Annotated[str, StringConstraints(min_length=1, max_length=10_000)] | None = (
        None
    )


class TrafficSet(BaseModel):
    traffic: dict[str, float] | None


class Endpoints(BaseModel):
    endpoints: list[EndpointIn]


class Servers(BaseModel):
    servers: list[ServerOut]


class SpansIn(Strict):
    spans: list[SpanRow]


class Spans(BaseModel):
    spans: list[dict[str, JSON]]


# -- the registry -----------------------------------------------------------------------


class Register(Strict):
    app: Annotated[str, StringConstraints(pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,199})?$")] = ""
    run_id: Id
    artifact: Annotated[str, StringConstraints(min_length=1, max_length=500)]
    signature: JSON = None


class Promote(Strict):
    version: Annotated[int, Field(ge=1, le=999_999_999)]
    alias: Annotated[str, StringConstraints(pattern=ALIAS_PATTERN)] = "production"
    reason: Text | None = None
    policy: dict[str, JSON] | None = None


class Rollback(Strict):
    alias: Annotated[str, StringConstraints(pattern=ALIAS_PATTERN)] = "production"
    reason: Text | None = None


class SetPolicy(Strict):
    policy: dict[str, JSON] | None
    weaken: bool = False
    reason: Text | None = None


class Reject(Strict):
    reason: Text | None = None


class Outcome(BaseModel):
    """What a promotion did: ``move`` (the alias moved) or ``request`` (it waits)."""

    kind: Literal["move", "request"]
    value: dict[str, JSON]
