"""The store interfaces, one per aggregate (runs, endpoints, spans, blobs), so that the
SQL store, a team server's HTTP client and test fakes can all stand behind them.
Run writes arrive as batches, one transaction each; reads return records.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from kiln.errors import ValidationError
from kiln.record.model import LogChunk, MetricPoint, RunRecord, RunStatus
from kiln.record.store.rows import ArtifactRow, RunRow, RunUpdate, SpanRow, cut_text

if TYPE_CHECKING:
    from kiln.record import audit
    from kiln.record.lineage import Lineage

# (run_id, key, step, time, value); value None stands for NaN where the database
# cannot store NaN (SQLite turns NaN into NULL).
MetricRow = tuple[str, str, int, float, float | None]
# (run_id, time, stream, text): whole lines a run printed on ``stream``, read at ``time``
LogRow = tuple[str, float, str, str]
LOG_STREAMS = ("stdout", "stderr", "kiln")
LOG_CHUNK_CHARS = 65_536  # the most text one log row holds


@dataclass(slots=True)
class WriteBatch:
    """Everything one flush writes, in one transaction.

    Rows are typed (:mod:`kiln.record.store.rows`); metric points are tuples, being
    many. ``summaries`` are (run_id, app, key, value) upserts of a run's latest value
    per metric.
    """

    new_runs: list[RunRow] = field(default_factory=list)
    metrics: list[MetricRow] = field(default_factory=list)
    summaries: list[tuple[str, str, str, float]] = field(default_factory=list)
    artifacts: list[ArtifactRow] = field(default_factory=list)
    updates: list[RunUpdate] = field(default_factory=list)
    seal: list[str] = field(default_factory=list)  # ended runs to seal in the audit log
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (run_id, what was dropped)
    logs: list[LogRow] = field(default_factory=list)
    # Where ``new_runs`` came from, if not from this store's own processes (a bundle):
    # their events are then this store's actor's, and a ``run.import`` event says so.
    origin: dict[str, Any] | None = None
    # An idempotency key: a store applies a batch with a key it has applied before as a
    # no-op, so a client that sends a batch again (it did not hear back) writes it once.
    key: str | None = None
    digest: str | None = None  # the batch's sha256 as sent: a key reused for another is refused
    actor: str | None = None  # who wrote it, for its audit events (None: the store's actor)

    def __bool__(self) -> bool:
        return any(getattr(self, part) for part in WRITE_PARTS)

    def cut_texts(self) -> None:
        """Cut warnings longer than :data:`~kiln.record.store.rows.TEXT_CHARS` to their
        last part, saying so, so that every store keeps them (a row's error is cut when
        the row is built)."""
        self.warnings = [(run_id, cut_text(m)) for run_id, m in self.warnings]

    def blobs(self) -> dict[str, str]:
        """The blobs this batch's rows name, each with where (a field's path): artifacts
        (not datasets, which name files outside the store) and the code and environment
        files of runs."""
        named: dict[str, str] = {}
        for i, art in enumerate(self.artifacts):
            if art.kind != "dataset":
                named.setdefault(art.sha256, f"artifacts.{i}.sha256")
        for part, rows in (("new_runs", self.new_runs), ("updates", self.updates)):
            for i, row in enumerate(rows):
                for field_name in ("code", "environment"):
                    found = getattr(row, field_name) or {}
                    for key in BLOB_KEYS:
                        sha = found.get(key)
                        if isinstance(sha, str):
                            named.setdefault(sha, f"{part}.{i}.{field_name}.{key}")
        return named

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


# Where a run's code and environment name blobs (kiln.record.snapshot).
BLOB_KEYS = ("patch_sha256", "source_blob", "packages_sha256", "lock_sha256")
WRITE_PARTS = (
    "new_runs", "metrics", "summaries", "artifacts", "logs", "updates", "seal", "warnings",
)  # fmt: skip


METRIC_OPS = ("<", "<=", ">", ">=", "=", "!=")


def check_key(name: str, field: str) -> None:
    """A param or tag name a query can look up: a JSON path cannot hold ``"`` or ``\\``
    as the databases quote it, nor a control character (NUL ends it), so such a name is
    refused rather than matching nothing or failing in the database."""
    if '"' in name or "\\" in name or any(ord(c) < 32 for c in name):
        raise ValidationError(field, f"{name!r} holds a quote, backslash or control "
                              "character, which a query cannot look up",
                              allowed="names without \", \\ or control characters")  # fmt: skip


@dataclass(frozen=True, slots=True)
class RunQuery:
    """A filter and order over runs.

    ``order_by`` is a run field (``created``, ``started``, ``ended``, ``name``, ``status``)
    or a summary metric (``accuracy`` or ``metrics.accuracy``), with a leading ``-``
    for descending. Ordering by a metric puts runs that lack it (or hold NaN) last.
    ``metrics`` holds comparisons of summary metrics, ``(key, op, value)`` with ``op``
    one of :data:`METRIC_OPS` (a run without the metric never matches); ``text`` finds
    runs whose id starts with it or whose name or app contains it; ``offset`` skips
    that many runs of the order (pages).
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
    metrics: tuple[tuple[str, str, float], ...] = ()
    text: str | None = None
    offset: int = 0


class RunStore(Protocol):
    """Where run records live: runs, their metric points, summaries, artifact rows and
    the links between them. Writes arrive as batches, one transaction each."""

    url: str

    def write(self, batch: WriteBatch) -> None:
        """Apply ``batch`` atomically."""

    def get_run(self, run_id: str) -> RunRecord:
        """The run with this id or unique id prefix; RunNotFoundError or AmbiguousIdError."""

    def query_runs(self, query: RunQuery) -> list[RunRecord]:
        """Runs matching ``query``, in its order."""

    def metric_history(self, run_id: str, key: str) -> list[MetricPoint]:
        """Every point of one metric of one run, by step then time."""

    def run_logs(self, run_id: str, *, after: int = 0, limit: int = 1000) -> list[LogChunk]:
        """What a run printed, oldest first: up to ``limit`` chunks past the chunk id
        ``after`` (0: from the start)."""

    def lineage(self, ref: str, *, depth: int = 20) -> Lineage:
        """The graph up and down from a run (id or prefix) or an artifact (sha256 or a
        prefix of 8 or more)."""

    def export_rows(self, run_id: str) -> dict[str, Any]:
        """A run's rows as stored (for bundles): ``run``, ``metrics`` (key, step, time,
        value), ``summary`` and ``artifacts``."""

    def dependants(self, run_id: str) -> list[str]:
        """What depends on a run (model versions, runs that used its outputs, its sweep's
        runs, its reproductions), each said in a line."""

    def delete_run(self, run_id: str, *, with_runs: bool = False, force: bool = False) -> list[str]:
        """Remove a run (with ``with_runs``, a sweep and its runs); the ids removed.
        DependencyError while anything depends on it or it is still recording (unless
        ``force``)."""

    def close(self) -> None:
        """Release connections. The store is unusable afterwards."""


Store = RunStore  # the name callers used before the interfaces were split


class AuditLog(Protocol):
    """The hash chain of every mutating action, and its verification."""

    def audit_events(
        self, *, actor: str | None = None, action: str | None = None,
        target: str | None = None, limit: int | None = 100,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """Events, newest first, filtered by actor, action and target (a prefix)."""

    def chain_head(self) -> tuple[int, str]:
        """The newest event's number and hash; (0, genesis) for an empty log."""

    def event_hash(self, seq: int) -> str | None:
        """The hash of event ``seq``; None if there is none."""

    def verify(self) -> Iterator[audit.Problem]:
        """The chain, every seal against its data and every referenced blob, checked by the
        side that owns the database; the problems found (none: intact)."""


@dataclass(frozen=True, slots=True)
class PrincipalRow:
    """Who may act on a team server: a ``user``, a ``service`` account (CI, endpoints) or
    an ``agent`` (with a human ``sponsor``, ``scopes``, an expiry and a ``budget``).
    ``role`` is the widest it may act with."""

    name: str
    kind: str
    role: str
    created_at: float
    created_by: str
    sponsor: str | None = None
    scopes: list[str] | None = None
    budget: float | None = None
    expires_at: float | None = None
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class TokenRow:
    """A bearer token: its visible ``id``, the SHA-256 of its secret, whose it is and the
    role it acts with. ``kind`` ``enrol``: the one-time token of a new server."""

    id: str
    digest: str
    principal: str
    kind: str
    role: str
    created_at: float
    name: str | None = None
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None
    project: str = "default"  # the one project it acts in


@dataclass(frozen=True, slots=True)
class MemberRow:
    """A principal's role in a project."""

    project: str
    principal: str
    role: str
    added_at: float
    added_by: str


@dataclass(frozen=True, slots=True)
class EndpointRow:
    """What is declared of an endpoint, and its live traffic split (None: follow ``model``)."""

    name: str
    app: str
    model: str
    spec: dict[str, Any]
    traffic: dict[str, float] | None
    updated_at: float


# (endpoint, version or None, replica pid, time, stream, text): whole lines a replica
# printed, read by its serving process
EndpointLogRow = tuple[str, int | None, int, float, str, str]


@dataclass(frozen=True, slots=True)
class EndpointLog:
    """Part of what a replica of an endpoint printed (see :class:`LogChunk`), with the
    model version it served (None: a standby, before it loaded one) and its pid."""

    id: int
    time: float
    stream: str
    text: str
    version: int | None
    replica: int


@dataclass(frozen=True, slots=True)
class ServerRow:
    """One process serving an endpoint, as it last reported (``serving`` or ``stopped``)."""

    id: str
    endpoint: str
    url: str | None
    host: str | None
    pid: int | None
    status: str
    stats: dict[str, Any]
    started_at: float
    updated_at: float


class EndpointStore(Protocol):
    """Where endpoints announce themselves, report their figures and find their split."""

    def announce_server(
        self, endpoint: EndpointRow, server: ServerRow, *, forget: Sequence[str] = ()
    ) -> None:
        """Declare ``endpoint`` (its live split kept), add ``server`` and remove the rows of
        the servers ``forget`` names, in one transaction with an ``endpoint.serve`` event."""

    def report_server(
        self, server_id: str, *, status: str, stats: dict[str, Any] | None, url: str | None
    ) -> None:
        """A server's heartbeat (``stats`` None: keep its last figures), or its end."""

    def endpoint(self, name: str) -> EndpointRow | None:
        """The endpoint ``name``, if declared."""

    def endpoints(self) -> list[EndpointRow]:
        """Every declared endpoint, by name."""

    def servers(self, names: Sequence[str]) -> list[ServerRow]:
        """The servers of the endpoints ``names``, newest first."""

    def write_endpoint_logs(self, rows: list[EndpointLogRow]) -> None:
        """Store what replicas printed."""

    def endpoint_logs(
        self, name: str, *, version: int | None = None, after: int = 0, limit: int = 1000
    ) -> list[EndpointLog]:
        """What the replicas of ``name`` (of one ``version``) printed, oldest first, past
        the chunk id ``after``."""

    def set_live_traffic(
        self, name: str, split: dict[str, float] | None, *, actor: str, payload: dict[str, Any]
    ) -> None:
        """Set (None: clear) the live split of ``name``, in one transaction with its
        ``endpoint.traffic`` event (``payload``, by ``actor``)."""


class SpanStore(Protocol):
    """Where inference spans are kept and traces found."""

    def write_spans(self, rows: list[SpanRow]) -> None:
        """Insert finished spans (rows as :func:`kiln.observe.tracing.span_row` makes)."""

    def list_spans(
        self, *, endpoint: str | None = None, run_id: str | None = None,
        errors_only: bool = False, limit: int | None = 50,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """Recorded spans, newest first."""

    def find_trace(self, trace_id: str) -> list[dict[str, Any]]:
        """The spans of one trace, by its id or a unique prefix of 8 or more, oldest first."""


def trace_prefix(trace_id: str) -> str:
    """A trace id or a prefix of one (8 to 32 hex digits), lower-cased; ValidationError
    naming ``TRACE_ID`` if it is neither."""
    ref = trace_id.strip().lower()
    if not 8 <= len(ref) <= 32 or not set(ref) <= set("0123456789abcdef"):
        allowed = "32 hex characters, or a unique prefix of 8 or more"
        raise ValidationError("TRACE_ID", f"{trace_id!r} is not a trace id", allowed=allowed)
    return ref


class BlobStore(Protocol):
    """Content-addressed bytes: each blob is named by the sha256 of its bytes."""

    def exists(self, sha256: str) -> bool:
        """Whether the blob is stored."""

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; its sha256."""

    def put_file(self, source: Path) -> tuple[str, int]:
        """Store the file at ``source``; its sha256 and size."""

    def put_stream(self, source: IO[bytes], sha256: str) -> None:
        """Store what ``source`` reads, which must hash to ``sha256`` (else ValueError,
        and nothing is stored)."""

    def read(self, sha256: str) -> bytes:
        """The blob's bytes; NotFoundError if it is missing."""

    def fetch(self, sha256: str) -> Path:
        """A local file holding the blob, to read (never to write); NotFoundError if it
        is missing."""


class IdentityStore(Protocol):
    """Principals and tokens, on the side that owns the database (a team server): each
    change in one transaction with its audit event."""

    def note(self, event: Any) -> None:
        """Append one audit event (an :class:`kiln.record.audit.Event`) on its own."""

    def principal(self, name: str) -> PrincipalRow | None: ...

    def principals(self) -> list[PrincipalRow]: ...

    def add_principal(self, row: PrincipalRow) -> None:
        """Add ``row`` (a ``principal.add`` event); refused if the name is taken."""

    def disable_principal(self, name: str) -> None:
        """Disable ``name`` (its tokens stop working at once)."""

    def add_token(self, row: TokenRow) -> None: ...

    def token(self, token_id: str) -> TokenRow | None: ...

    def tokens(self, principal: str | None = None) -> list[TokenRow]: ...

    def revoke_token(self, token_id: str) -> None: ...

    def token_used(self, token_id: str, when: float) -> None:
        """Note a token's use (no event: uses are many)."""

    def consume_enrolment(self, token_id: str, admin: PrincipalRow, token: TokenRow) -> bool:
        """Revoke enrolment token ``token_id`` and add the first admin and its token, in
        one transaction; False if it was used already."""

    def projects(self, principal: str | None = None) -> list[str]:
        """Every project's name (or those ``principal`` is a member of)."""

    def add_project(self, name: str, admin: str) -> None:
        """Add project ``name`` with ``admin`` as its first admin; refused if it exists."""

    def member(self, project: str, principal: str) -> MemberRow | None: ...

    def members(self, project: str) -> list[MemberRow]: ...

    def set_member(self, row: MemberRow) -> None:
        """Give a principal a role in a project (or change it)."""

    def remove_member(self, project: str, principal: str) -> None: ...

    def note_blob(self, sha256: str) -> None:
        """Note that this store's project holds blob ``sha256`` (it uploaded it)."""

    def holds_blob(self, sha256: str) -> bool:
        """Whether this store's project may read blob ``sha256``."""


class KilnStore(RunStore, AuditLog, EndpointStore, SpanStore, Protocol):
    """Every interface of the record behind one handle: what :func:`open_store` returns,
    a SQL store or a team server's HTTP client."""

    actor: str

    @property
    def blob_store(self) -> BlobStore:
        """Where this record's blobs are."""

    def __enter__(self) -> KilnStore: ...

    def __exit__(self, *exc_info: object) -> None: ...


@dataclass(frozen=True, slots=True)
class PoolRow:
    """Hardware an engine runs on, with its capacity in admission units (``cpu`` in
    thousandths of a core, ``memory`` in MiB, ``gpu`` in thousandths of a device, all
    of the pool's one ``gpu_type``)."""

    name: str
    capacity: dict[str, int]
    gpu_type: str | None = None
    updated_at: float = 0.0
    updated_by: str = ""


@dataclass(frozen=True, slots=True)
class QueueRow:
    """A project's quota on a pool (see :class:`kiln.govern.admission.Queue`)."""

    project: str
    pool: str
    nominal: dict[str, int]
    cohort: str | None = None
    borrowing_limit: dict[str, int] = field(default_factory=dict)
    lending_limit: dict[str, int] = field(default_factory=dict)
    weight: float = 1.0
    strategy: str = "best-effort"
    fair_sharing: bool = False
    updated_at: float = 0.0
    updated_by: str = ""


@dataclass(frozen=True, slots=True)
class BudgetRow:
    """Dollars a project (``principal`` empty) or one principal of it may spend per
    ``period``: ``day``, ``week``, ``month`` (UTC) or ``total``."""

    project: str
    principal: str
    amount: float
    period: str = "month"
    updated_at: float = 0.0
    updated_by: str = ""


@dataclass(frozen=True, slots=True)
class WorkloadRow:
    """A run asking a pool for admission: what it requests, its state (``pending``,
    ``admitted``, ``finished``, ``refused``), its most possible cost (charged to its
    budget while it is live) and what it cost (the quota it held, priced)."""

    id: str
    project: str
    pool: str
    principal: str
    requests: dict[str, int]
    state: str
    submitted_at: float
    priority: int = 0
    agent: bool = False
    timeout_s: float | None = None
    max_cost: float = 0.0
    cost: float = 0.0
    admitted_at: float | None = None
    ended_at: float | None = None
    cause: str | None = None


@dataclass(frozen=True, slots=True)
class ApprovalRow:
    """An agent's action waiting for a human: the ``operation`` and its exact ``args``
    (``args_hash``, their SHA-256), ``pending`` until decided, then ``approved`` (usable
    once, until ``expires_at``), ``rejected`` or ``used``."""

    id: str
    project: str
    principal: str
    operation: str
    args: dict[str, Any]
    args_hash: str
    status: str
    created_at: float
    expires_at: float
    sponsor: str | None = None
    preview: dict[str, Any] | None = None  # what it would change, when it was asked
    decided_by: str | None = None
    decided_at: float | None = None
    reason: str | None = None
    used_at: float | None = None
