"""The rows a write carries, typed: what the SDK builds, what every store takes and what
``kiln server`` reads off the wire (its schema re-exports these).

Each field has the limits of its column, so a row that a store could not keep exactly
is refused where it is built, naming the field: names longer than their column, JSON
with non-finite numbers, integers wider than 64 bits or nesting deeper than
:data:`MAX_DEPTH`. Construction is strict (``0`` is not ``false``) and unknown fields
are refused; a status is a :class:`~kiln.record.model.RunStatus` (or its value).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from kiln.record.model import RunStatus

Id = Annotated[str, StringConstraints(min_length=1, max_length=32)]
RunId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]  # kiln.record.runs
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"  # kiln.record.values.check_name
ModelName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Key = Annotated[str, StringConstraints(min_length=1, max_length=250)]
Sha = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
TEXT_CHARS = 1_000_000  # the longest error or warning a run keeps


def cut_text(text: str, limit: int = TEXT_CHARS) -> str:
    """``text`` if it fits in ``limit`` characters, else its end, after a line saying
    how much was cut."""
    if len(text) <= limit:
        return text
    keep = limit - 100
    return f"[{len(text) - keep:,} characters cut here]\n" + text[-keep:]


Text = Annotated[str, StringConstraints(max_length=TEXT_CHARS)]
# A run's error: a longer one (the traceback of a huge message) keeps its end.
Error = Annotated[str, AfterValidator(cut_text)]
Short = Annotated[str, StringConstraints(max_length=500)]
TraceId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
SpanId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
Host = Annotated[str, StringConstraints(max_length=255)]
Engine = Annotated[str, StringConstraints(max_length=32)]
Int32 = Annotated[int, Field(ge=0, le=2**31 - 1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
# A status from Python is a RunStatus; from the wire, its value.
Status = Annotated[RunStatus, Field(strict=False)]
MAX_DEPTH = 64


def plain_json(value: Any, depth: int = 0) -> Any:
    """``value`` if it is JSON every store keeps and reads back exactly: finite numbers,
    integers of up to 64 bits, nested at most :data:`MAX_DEPTH` deep."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not a JSON number (send finite numbers)")
    if isinstance(value, int) and not isinstance(value, bool) and not (
        -(2**63) <= value <= 2**64 - 1
    ):  # fmt: skip
        raise ValueError("an integer of more than 64 bits (send it as a string)")
    if isinstance(value, dict | list):
        if depth >= MAX_DEPTH:
            raise ValueError(f"nested more than {MAX_DEPTH} deep")
        for item in value.values() if isinstance(value, dict) else value:
            plain_json(item, depth + 1)
    return value


JSON = Annotated[Any, AfterValidator(plain_json)]


class Strict(BaseModel):
    """Typed input: no unknown fields, no coercion, no non-finite floats."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class RunRow(Strict):
    """A new run's row."""

    id: RunId
    app: ModelName
    status: Status
    created_at: float
    name: ModelName | None = None
    function: Short | None = None
    actor: Name | None = None
    host: Host | None = None
    pid: Int32 | None = None
    engine: Engine | None = None
    parent_id: RunId | None = None
    started_at: float | None = None
    ended_at: float | None = None
    heartbeat_at: float | None = None
    params: dict[str, JSON] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    result: JSON = None
    error: Error | None = None
    code: dict[str, JSON] | None = None
    environment: dict[str, JSON] | None = None
    usage: dict[str, JSON] | None = None
    attempt: Int32 | None = None
    resources: dict[str, JSON] | None = None
    volatile_metrics: list[Key] | None = None
    trace_id: TraceId | None = None  # the run's OpenTelemetry span (kiln.observe.runtrace)
    span_id: SpanId | None = None

    def columns(self) -> dict[str, Any]:
        """The row as the runs table's columns."""
        row = self.model_dump()
        row["status"] = str(self.status)
        return row


class RunUpdate(Strict):
    """Some fields of a run (``id`` names it): only the fields given are written, so
    ``result=None`` clears the result while leaving ``result`` out keeps it."""

    id: RunId
    status: Status | None = None
    name: ModelName | None = None
    started_at: float | None = None
    ended_at: float | None = None
    heartbeat_at: float | None = None
    params: dict[str, JSON] | None = None
    tags: dict[str, str] | None = None
    result: JSON = None
    error: Error | None = None
    code: dict[str, JSON] | None = None
    environment: dict[str, JSON] | None = None
    usage: dict[str, JSON] | None = None
    host: Host | None = None
    pid: Int32 | None = None
    engine: Engine | None = None
    attempt: Int32 | None = None
    resources: dict[str, JSON] | None = None
    volatile_metrics: list[Key] | None = None
    trace_id: TraceId | None = None
    span_id: SpanId | None = None

    def columns(self) -> dict[str, Any]:
        """The fields given, as the runs table's columns (``id`` among them)."""
        row = self.model_dump(exclude_unset=True)
        if self.status is not None:
            row["status"] = str(self.status)
        return row

    def then(self, later: RunUpdate) -> RunUpdate:
        """This update followed by ``later`` (of the same run), as one."""
        fields = {name: getattr(self, name) for name in self.model_fields_set}
        fields.update({name: getattr(later, name) for name in later.model_fields_set})
        return RunUpdate.model_construct(_fields_set=set(fields), **fields)


class SpanRow(Strict):
    """A finished span, as the ``spans`` table holds it. Serving makes thousands a
    second from OpenTelemetry's own spans, so it builds them with ``model_construct``
    (no checks); the server checks every one a client sends."""

    trace_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    span_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
    parent_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")] | None = None
    name: Name
    endpoint: Name | None = None
    model_name: Name | None = None
    model_version: Int32 | None = None
    run_id: Id | None = None
    start_ns: Int64
    duration_ns: Int64
    status: Literal["ok", "error", "invalid"]
    attributes: dict[str, JSON]


class ArtifactRow(Strict):
    """A file, object or dataset a run read (``in``) or wrote (``out``)."""

    run_id: RunId
    direction: Literal["in", "out"]
    name: Annotated[str, StringConstraints(min_length=1, max_length=500)]
    kind: Literal["file", "pickle", "dataset"]
    sha256: Sha
    size: Annotated[int, Field(ge=0, le=2**63 - 1)]
    uri: Text | None = None
