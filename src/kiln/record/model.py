"""The run record as typed values: what a store returns and what the SDK and CLI show."""

from __future__ import annotations

import enum
import math
import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kiln.errors import NotFoundError

if TYPE_CHECKING:
    from kiln.record.lineage import Lineage
    from kiln.record.store.base import BlobStore, Store


class RunStatus(enum.StrEnum):
    """Where a run is in its life. Terminal states never change again."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"  # the process that owned it died without saying how it ended
    # Stopped to give its quota back (see kiln.govern.admission); it waits to run again.
    PREEMPTED = "preempted"

    @property
    def terminal(self) -> bool:
        return self not in LIVE_STATUSES


LIVE_STATUSES = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.PREEMPTED)


ArtifactKind = Literal["file", "pickle", "dataset"]
Direction = Literal["in", "out"]


@dataclass(frozen=True, slots=True)
class MetricPoint:
    """One logged value: ``step`` as given (or counted), ``time`` in Unix seconds."""

    step: int
    time: float
    value: float


@dataclass(frozen=True, slots=True)
class LogChunk:
    """Part of what a run printed: whole lines of one ``stream`` (``stdout``, ``stderr``,
    or ``kiln`` for Kiln's own notes), read at ``time``; ``id`` orders the chunks."""

    id: int
    time: float
    stream: str
    text: str


@dataclass(frozen=True, slots=True)
class Artifact:
    """A file or object a run read (``in``) or wrote (``out``), stored by content."""

    name: str
    direction: Direction
    kind: ArtifactKind
    sha256: str
    size: int
    uri: str | None = None

    def __kiln_json__(self) -> dict[str, Any]:
        """As a param: what it is and its hash, so that lineage can follow it."""
        return {"artifact": self.name, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class CodeSnapshot:
    """The code a run executed.

    With git: ``commit``, ``branch`` and, when the tree has uncommitted or untracked
    changes, ``patch_sha256`` naming a blob that recreates them on top of the commit.
    Always: the calling module's path, the sha256 of its source and the source itself
    as the blob ``source_blob`` (what a run without a commit is reproduced from).
    """

    module_path: str | None = None
    source_sha256: str | None = None
    source_blob: str | None = None
    repo_root: str | None = None
    commit: str | None = None
    branch: str | None = None
    dirty: bool = False
    patch_sha256: str | None = None
    untracked_skipped: tuple[str, ...] = ()
    # One line per untracked file left out of the patch: why (binary, too large), its
    # size and its sha256, so what the run saw is still known.
    left_out: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EnvSnapshot:
    """The interpreter and installed distributions (``packages_sha256`` names the list blob)."""

    python: str = ""
    implementation: str = ""
    platform: str = ""
    executable: str = ""
    packages_sha256: str | None = None
    package_count: int = 0
    env_id: str | None = None  # a declared kiln.Env: its identity
    lock_sha256: str | None = None  # ... and the blob of its lock
    # The thread variables the run had (OMP_NUM_THREADS, ...), from its CPU request
    # or the user's environment; kiln reproduce runs with the same.
    threads: dict[str, str] = field(default_factory=dict)
    # A sandboxed run's: the layers that were active and whether bubblewrap was used.
    sandbox: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Resources a run used: wall and CPU seconds, peak resident memory (of its process
    tree where it was sampled), the kernel's counts of major page faults and disk bytes;
    and, from the samples of :mod:`kiln.observe.sysmetrics` (runs longer than a
    second), CPUs busy on average, swap traffic of the machine and its GPUs' use."""

    wall_s: float | None = None
    cpu_s: float | None = None
    peak_rss_bytes: int | None = None
    major_faults: int | None = None
    disk_read_bytes: int | None = None
    disk_write_bytes: int | None = None
    cpu_cores_mean: float | None = None
    peak_rss_tree_bytes: int | None = None
    swap_in_bytes: float | None = None
    swap_out_bytes: float | None = None
    sys_samples: int | None = None
    gpu_utilization_mean: float | None = None
    gpu_memory_peak_bytes: int | None = None
    gpu_samples: int | None = None


_USAGE_FIELDS = frozenset(f.name for f in fields(Usage))


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC)


@dataclass(frozen=True, slots=True)
class RunRecord:
    """Everything recorded about one run. Returned by :func:`kiln.get_run` and :func:`kiln.runs`.

    Example::

        run = kiln.get_run("3f2a9c")
        run.params["lr"], run.summary["accuracy"]
        [p.value for p in run.metric_history("loss")]
        model = run.load("model.pkl")
    """

    id: str
    app: str
    status: RunStatus
    created_at: float
    name: str | None = None
    function: str | None = None
    actor: str | None = None
    host: str | None = None
    pid: int | None = None
    engine: str | None = None
    parent_id: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    heartbeat_at: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    result: Any = None
    error: str | None = None
    summary: dict[str, float] = field(default_factory=dict)
    artifacts: tuple[Artifact, ...] = ()
    code: CodeSnapshot = field(default_factory=CodeSnapshot)
    environment: EnvSnapshot = field(default_factory=EnvSnapshot)
    usage: Usage = field(default_factory=Usage)
    attempt: int | None = None
    resources: dict[str, Any] = field(default_factory=dict)
    # Metrics logged with volatile=True (timings): shown by reproduce, not in its verdict.
    volatile_metrics: tuple[str, ...] = ()
    trace_id: str | None = None  # its OpenTelemetry trace and span, if it was traced
    span_id: str | None = None
    _store: Store | None = field(default=None, repr=False, compare=False)
    _blobs: BlobStore | None = field(default=None, repr=False, compare=False)

    @property
    def created(self) -> datetime:
        return datetime.fromtimestamp(self.created_at, tz=UTC)

    @property
    def ended(self) -> datetime | None:
        return _ts(self.ended_at)

    @property
    def duration_s(self) -> float | None:
        if self.ended_at is None or self.started_at is None:
            return None
        return self.ended_at - self.started_at

    @property
    def datasets(self) -> tuple[Artifact, ...]:
        """The datasets this run read, with their sha256."""
        return tuple(a for a in self.artifacts if a.kind == "dataset")

    def metric_history(self, key: str) -> list[MetricPoint]:
        """Every point logged for ``key``, ordered by step then time."""
        if self._store is None:
            raise NotFoundError("this record is detached from its store")
        return self._store.metric_history(self.id, key)

    def lineage(self) -> Lineage:
        """The runs and artifacts upstream and downstream of this run."""
        if self._store is None:
            raise NotFoundError("this record is detached from its store")
        return self._store.lineage(self.id)

    def artifact(self, name: str) -> Artifact:
        """The output artifact called ``name``."""
        for a in self.artifacts:
            if a.name == name and a.direction == "out":
                return a
        names = ", ".join(a.name for a in self.artifacts if a.direction == "out") or "none"
        raise NotFoundError(f"run {self.id} has no artifact {name!r} (it has: {names})")

    def artifact_path(self, name: str) -> Path:
        """Path of the stored bytes of artifact ``name`` (read-only)."""
        if self._blobs is None:
            raise NotFoundError("this record is detached from its blob store")
        return self._blobs.fetch(self.artifact(name).sha256)

    def load(self, name: str) -> Any:
        """The artifact's value: the object for a saved object, the bytes for a saved file.

        Objects are unpickled: load only runs whose record you trust, as with any pickle.
        """
        art = self.artifact(name)
        data = self.artifact_path(name).read_bytes()
        return pickle.loads(data) if art.kind == "pickle" else data  # noqa: S301

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the record (non-finite numbers become strings)."""
        out: dict[str, Any] = {
            "id": self.id,
            "app": self.app,
            "name": self.name,
            "function": self.function,
            "status": str(self.status),
            "actor": self.actor,
            "host": self.host,
            "pid": self.pid,
            "engine": self.engine,
            "parent_id": self.parent_id,
            "created_at": self.created.isoformat(),
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "duration_s": self.duration_s,
            "params": self.params,
            "tags": self.tags,
            "result": self.result,
            "error": self.error,
            "summary": {k: json_number(v) for k, v in self.summary.items()},
            "artifacts": [asdict(a) for a in self.artifacts],
            "code": asdict(self.code),
            "environment": asdict(self.environment),
            "usage": asdict(self.usage),
            "attempt": self.attempt,
            "resources": self.resources,
            "volatile_metrics": list(self.volatile_metrics),
            "trace_id": self.trace_id,
            "span_id": self.span_id,
        }
        return out


def _iso(ts: float | None) -> str | None:
    dt = _ts(ts)
    return None if dt is None else dt.isoformat()


def json_number(value: float) -> float | str:
    """JSON has no NaN or infinity: write those as the strings "nan", "inf", "-inf"."""
    return value if math.isfinite(value) else str(value)


def _code(data: dict[str, Any] | None) -> CodeSnapshot:
    data = dict(data or {})
    data["untracked_skipped"] = tuple(data.get("untracked_skipped", ()))
    data["left_out"] = tuple(data.get("left_out", ()))
    return CodeSnapshot(**data)


def record_from_row(
    row: Mapping[Any, Any],
    summary: dict[str, float],
    artifacts: tuple[Artifact, ...],
    store: Store | None,
    blobs: BlobStore | None,
) -> RunRecord:
    """Build a :class:`RunRecord` from a ``runs`` row and its children."""
    return RunRecord(
        id=row["id"],
        app=row["app"],
        status=RunStatus(row["status"]),
        created_at=row["created_at"],
        name=row["name"],
        function=row["function"],
        actor=row["actor"],
        host=row["host"],
        pid=row["pid"],
        engine=row["engine"],
        parent_id=row["parent_id"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        heartbeat_at=row["heartbeat_at"],
        params=row["params"] or {},
        tags=row["tags"] or {},
        result=row["result"],
        error=row["error"],
        summary=summary,
        artifacts=artifacts,
        code=_code(row["code"]),
        environment=EnvSnapshot(**(row["environment"] or {})),
        usage=Usage(**{k: v for k, v in (row["usage"] or {}).items() if k in _USAGE_FIELDS}),
        attempt=row["attempt"],
        resources=row["resources"] or {},
        volatile_metrics=tuple(row.get("volatile_metrics") or ()),
        trace_id=row.get("trace_id"),
        span_id=row.get("span_id"),
        _store=store,
        _blobs=blobs,
    )
