"""In-memory stores implementing Kiln's store interfaces, for unit tests of the
layers above them. They pass the same contract suite as the SQL stores
(``tests/contract``), so a test built on them tests what the real ones do."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import operator
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from kiln.errors import (
    AmbiguousIdError,
    DependencyError,
    NotFoundError,
    RunNotFoundError,
    StoreRefusedError,
    ValidationError,
)
from kiln.record import audit
from kiln.record.lineage import Lineage
from kiln.record.model import Artifact, LogChunk, MetricPoint, RunRecord, record_from_row
from kiln.record.store._wire import RUN_COLUMNS
from kiln.record.store.base import (
    METRIC_OPS,
    EndpointLog,
    EndpointLogRow,
    EndpointRow,
    RunQuery,
    ServerRow,
    WriteBatch,
    check_key,
    trace_prefix,
)
from kiln.record.store.rows import SpanRow


def _equal(row: dict[str, Any], checks: list[Any]) -> bool:
    """Whether the run's params and tags hold each value of ``checks`` (1 == 1.0)."""
    for _, part, name, wanted in checks:
        held = (row.get(part) or {}).get(name)
        if isinstance(wanted, bool) or isinstance(held, bool):
            if held is not wanted:
                return False
        elif isinstance(wanted, int | float):
            if not isinstance(held, int | float) or float(held) != float(wanted):
                return False
        elif held != wanted:
            return False
    return True


_COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
            "=": operator.eq, "!=": operator.ne}  # fmt: skip


class MemoryEndpointStore:
    """An :class:`~kiln.record.store.base.EndpointStore` and
    :class:`~kiln.record.store.base.SpanStore` in memory, with the audit events they
    write (``audit_events``, newest first, as the SQL store answers them)."""

    def __init__(self, actor: str = "tester") -> None:
        self.actor = actor
        self._lock = threading.Lock()
        self._endpoints: dict[str, EndpointRow] = {}
        self._servers: dict[str, ServerRow] = {}
        self._spans: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._endpoint_logs: list[tuple[str, EndpointLog]] = []

    # -- EndpointStore ------------------------------------------------------------------

    def announce_server(
        self, endpoint: EndpointRow, server: ServerRow, *, forget: Sequence[str] = ()
    ) -> None:
        with self._lock:
            old = self._endpoints.get(endpoint.name)
            traffic = old.traffic if old is not None else None
            self._endpoints[endpoint.name] = replace(endpoint, traffic=traffic)
            for server_id in forget:
                found = self._servers.get(server_id)
                if found is not None and found.endpoint == endpoint.name:
                    del self._servers[server_id]
            self._servers[server.id] = replace(server, endpoint=endpoint.name)
            self._event("endpoint.serve", endpoint.name, {"model": endpoint.model,
                        "url": server.url, "server": server.id, "pid": server.pid},
                        self.actor, server.started_at)  # fmt: skip

    def report_server(
        self, server_id: str, *, status: str, stats: dict[str, Any] | None, url: str | None
    ) -> None:
        with self._lock:
            found = self._servers.get(server_id)
            if found is None:
                return  # as an UPDATE of no row
            self._servers[server_id] = replace(
                found, status=status, updated_at=time.time(),
                stats=found.stats if stats is None else stats, url=url or found.url,
            )  # fmt: skip

    def endpoint(self, name: str) -> EndpointRow | None:
        return self._endpoints.get(name)

    def endpoints(self) -> list[EndpointRow]:
        return [self._endpoints[n] for n in sorted(self._endpoints)]

    def servers(self, names: Sequence[str]) -> list[ServerRow]:
        wanted = set(names)
        found = [s for s in self._servers.values() if s.endpoint in wanted]
        return sorted(found, key=lambda s: s.started_at, reverse=True)

    def write_endpoint_logs(self, rows: list[EndpointLogRow]) -> None:
        with self._lock:
            for e, v, p, t, s, x in rows:
                chunk = EndpointLog(len(self._endpoint_logs) + 1, t, s, x, v, p)
                self._endpoint_logs.append((e, chunk))

    def endpoint_logs(
        self, name: str, *, version: int | None = None, after: int = 0, limit: int = 1000
    ) -> list[EndpointLog]:
        with self._lock:
            found = [c for e, c in self._endpoint_logs if e == name and c.id > after
                     and (version is None or c.version == version)]  # fmt: skip
        return found[:limit]

    def set_live_traffic(
        self, name: str, split: dict[str, float] | None, *, actor: str, payload: dict[str, Any]
    ) -> None:
        with self._lock:
            found = self._endpoints.get(name)
            if found is None:
                raise NotFoundError(f"no endpoint {name!r}; `kiln endpoints ls` lists them")
            self._endpoints[name] = replace(found, traffic=dict(split) if split else None)
            self._event("endpoint.traffic", name, payload, actor, time.time())

    # -- SpanStore --------------------------------------------------------------------

    def write_spans(self, rows: list[SpanRow]) -> None:
        with self._lock:
            self._spans.extend(r.model_dump() for r in rows)

    def list_spans(
        self, *, endpoint: str | None = None, run_id: str | None = None,
        errors_only: bool = False, limit: int | None = 50,
    ) -> list[dict[str, Any]]:  # fmt: skip
        found = [
            s for s in self._spans
            if (not endpoint or s["endpoint"] == endpoint)
            and (not run_id or (s["run_id"] or "").startswith(run_id))
            and (not errors_only or s["status"] == "error")
        ]  # fmt: skip
        found.sort(key=lambda s: s["start_ns"], reverse=True)
        return found[:limit] if limit is not None else found

    def find_trace(self, trace_id: str) -> list[dict[str, Any]]:
        ref = trace_prefix(trace_id)
        ids = sorted({s["trace_id"] for s in self._spans if s["trace_id"].startswith(ref)})
        if not ids:
            raise NotFoundError(
                f"no trace {trace_id!r} in the store (spans are written about a second "
                "after the request); `kiln traces ls` lists recent ones"
            )
        if len(ids) > 1:
            raise AmbiguousIdError(trace_id, ids[:5])
        return sorted((s for s in self._spans if s["trace_id"] == ids[0]),
                      key=lambda s: s["start_ns"])  # fmt: skip

    # -- the events it wrote ---------------------------------------------------------

    def audit_events(
        self, *, actor: str | None = None, action: str | None = None,
        target: str | None = None, limit: int | None = 100,
    ) -> list[dict[str, Any]]:  # fmt: skip
        found = [
            e for e in reversed(self._events)
            if (not actor or e["actor"] == actor) and (not action or e["action"] == action)
            and (not target or e["target"].startswith(target))
        ]  # fmt: skip
        return found[:limit] if limit is not None else found

    def _event(
        self, action: str, target: str, payload: dict[str, Any], actor: str, at: float
    ) -> None:
        self._events.append({"seq": len(self._events) + 1, "action": action, "target": target,
                             "payload": json.dumps(payload, sort_keys=True, default=str),
                             "actor": actor, "time": at})  # fmt: skip


class MemoryBlobStore:
    """A :class:`~kiln.record.store.base.BlobStore` in memory. ``fetch`` writes the blob
    into a cache folder, as a store whose blobs live elsewhere would download it."""

    def __init__(self, cache: Path | None = None) -> None:
        self._blobs: dict[str, bytes] = {}
        self._cache = cache

    def exists(self, sha256: str) -> bool:
        return sha256 in self._blobs

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self._blobs.setdefault(sha, bytes(data))
        return sha

    def put_file(self, source: Path) -> tuple[str, int]:
        data = source.read_bytes()
        return self.put_bytes(data), len(data)

    def put_stream(self, source: IO[bytes], sha256: str) -> None:
        data = source.read()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"content does not hash to {sha256}")
        self._blobs.setdefault(sha256, data)

    def read(self, sha256: str) -> bytes:
        try:
            return self._blobs[sha256]
        except KeyError:
            raise NotFoundError(f"blob {sha256} is missing from memory") from None

    def fetch(self, sha256: str) -> Path:
        data = self.read(sha256)
        if self._cache is None:
            self._cache = Path(tempfile.mkdtemp(prefix="kiln-blobs-"))
        self._cache.mkdir(parents=True, exist_ok=True)
        path = self._cache / sha256
        if not path.is_file():
            path.write_bytes(data)
            path.chmod(0o444)
        return path


class MemoryStore(MemoryEndpointStore):
    """Every interface of the record in memory: runs (:class:`RunStore`), the audit log
    (hash-chained as in the SQL store), endpoints, spans and blobs. What
    ``open_store`` returns, for unit tests of the SDK, registry and serving layers."""

    url = "memory://"

    def __init__(self, actor: str = "tester", blobs: MemoryBlobStore | None = None) -> None:
        super().__init__(actor)
        self.blobs = blobs or MemoryBlobStore()
        self._runs: dict[str, dict[str, Any]] = {}
        self._points: dict[str, list[tuple[str, int, float, float | None]]] = {}
        self._summary: dict[str, dict[str, tuple[str, float]]] = {}
        self._artifacts: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        self._logs: dict[str, list[LogChunk]] = {}
        self._log_ids = 0
        self._keys: dict[str, str | None] = {}  # idempotency key: the batch's digest
        self._chain: list[dict[str, Any]] = []

    @property
    def blob_store(self) -> MemoryBlobStore:
        return self.blobs

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    # -- RunStore ----------------------------------------------------------------------

    def _applied(self, batch: WriteBatch) -> bool:
        """Whether ``batch`` is a retried copy of one applied already."""
        if batch.key is None or batch.key not in self._keys:
            return False
        noted = self._keys[batch.key]
        if batch.digest is not None and noted is not None and noted != batch.digest:
            raise StoreRefusedError(
                self.url, f"idempotency key {batch.key!r} was used for another batch"
            )
        return True

    def write(self, batch: WriteBatch) -> None:
        batch.cut_texts()
        with self._lock:
            if self._applied(batch):
                return
            for row in batch.new_runs:
                if row.id in self._runs or sum(r.id == row.id for r in batch.new_runs) > 1:
                    raise StoreRefusedError(self.url, f"UNIQUE constraint failed: runs.id {row.id}")
            if batch.key is not None:
                self._keys[batch.key] = batch.digest
            gone = (
                {r[0] for r in batch.metrics} - self._runs.keys() - {r.id for r in batch.new_runs}
            )
            for row in batch.new_runs:
                self._runs[row.id] = row.columns()
            for run_id, key, step, t, value in batch.metrics:
                if run_id not in gone:
                    self._points.setdefault(run_id, []).append((key, step, t, value))
            for run_id, app, key, value in batch.summaries:
                self._summary.setdefault(run_id, {})[key] = (app, value)
            self._add_logs(batch)
            for art in batch.artifacts:
                self._artifacts.setdefault(art.run_id, {})[(art.direction, art.name)] = (
                    art.model_dump()
                )
            for update in batch.updates:
                if update.id in self._runs:
                    self._runs[update.id].update(update.columns())
            actor = batch.actor or self.actor
            events = audit.events_for_writes(batch.new_runs, batch.updates, batch.artifacts,
                                             actor=actor, now=time.time(),
                                             imported=batch.origin is not None)  # fmt: skip
            self._append(events)

    def _append(self, events: list[audit.Event]) -> None:
        seq, prev = (self._chain[-1]["seq"], self._chain[-1]["hash"]) if self._chain else (
            0, audit.GENESIS)  # fmt: skip
        if not events:
            return
        for row in audit.chain(events, seq, prev):
            self._chain.append(row)
            self._events.append(dict(row))

    def _event(
        self, action: str, target: str, payload: dict[str, Any], actor: str, at: float
    ) -> None:
        self._append([audit.Event(action, target, payload, at, actor)])

    def get_run(self, run_id: str) -> RunRecord:
        prefix = run_id.strip().lower()
        if not prefix or not set(prefix) <= set("0123456789abcdef"):
            raise RunNotFoundError(run_id)
        with self._lock:
            found = sorted(r for r in self._runs if r.startswith(prefix))
        if not found:
            raise RunNotFoundError(run_id)
        if len(found) > 1 and prefix not in found:
            raise AmbiguousIdError(run_id, found[:5])
        return self._record(prefix if prefix in found else found[0])

    def _record(self, run_id: str) -> RunRecord:
        row = {name: self._runs[run_id].get(name) for name in RUN_COLUMNS}
        summary = {k: (math.nan if v is None else v)
                   for k, (_, v) in self._summary.get(run_id, {}).items()}  # fmt: skip
        arts = tuple(Artifact(**{k: a[k] for k in ("name", "direction", "kind", "sha256",
                                                     "size", "uri")})
                     for _, a in sorted(self._artifacts.get(run_id, {}).items()))  # fmt: skip
        return record_from_row(row, summary, arts, self, self.blobs)

    def query_runs(self, query: RunQuery) -> list[RunRecord]:
        if query.limit is not None and query.limit < 0:
            raise ValidationError("limit", f"must be >= 0, got {query.limit}")
        checks = [(f"params.{k}", "params", k, v) for k, v in query.params.items()]
        checks += [(f"tags.{k}", "tags", k, v) for k, v in query.tags.items()]
        for field, _, name, value in checks:
            check_key(name, field)
            if value is not None and not isinstance(value, bool | int | float | str):
                raise ValidationError(field, f"cannot filter on a {type(value).__name__}",
                                      allowed=["str", "int", "float", "bool"])  # fmt: skip
        with self._lock:
            rows = [r for r in self._runs.values() if self._matches(r, query, checks)]
            key = query.order_by.lstrip("-+")
            descending = query.order_by.startswith("-")
            fields = {"created": "created_at", "started": "started_at", "ended": "ended_at",
                      "name": "name", "status": "status", "app": "app"}  # fmt: skip
            if key in fields:
                column = fields[key]
                rows.sort(key=lambda r: r["id"])
                rows.sort(key=lambda r: (r.get(column) is None, r.get(column) or 0)
                          if column.endswith("_at") else (r.get(column) or ""),
                          reverse=descending)  # fmt: skip
            else:
                metric = key.removeprefix("metrics.")
                if not metric:
                    raise ValidationError("order_by", "is empty",
                                          allowed=["a run field", "a metric"])  # fmt: skip

                def value(r: dict[str, Any]) -> float | None:
                    v = self._summary.get(r["id"], {}).get(metric, (None, None))[1]
                    return None if v is None or math.isnan(v) else v

                held = sorted((r for r in rows if value(r) is not None),
                              key=lambda r: (r["created_at"], r["id"]))  # fmt: skip
                held.sort(key=lambda r: value(r) or 0.0, reverse=descending)
                rest = sorted((r for r in rows if value(r) is None),
                              key=lambda r: (-r["created_at"], r["id"]))  # fmt: skip
                rows = held + rest
            if query.offset < 0:
                raise ValidationError("offset", f"must be >= 0, got {query.offset}")
            rows = rows[query.offset :]
            if query.limit is not None:
                rows = rows[: query.limit]
            return [self._record(r["id"]) for r in rows]

    def _metrics_and_text(self, row: dict[str, Any], query: RunQuery) -> bool:
        held = self._summary.get(row["id"], {})
        for i, (name, op, wanted) in enumerate(query.metrics):
            if op not in METRIC_OPS:
                raise ValidationError(f"metrics[{i}]", f"{op!r} is not a comparison",
                                      allowed=list(METRIC_OPS))  # fmt: skip
            value = held.get(name, (None, None))[1]
            if value is None or math.isnan(value) or not _COMPARE[op](value, wanted):
                return False
        text = query.text
        return not text or (row["id"].startswith(text) or text in (row.get("name") or "")
                            or text in row["app"])  # fmt: skip

    def _matches(self, row: dict[str, Any], query: RunQuery, checks: list[Any]) -> bool:
        if query.app is not None and row["app"] != query.app:
            return False
        if query.status and row["status"] not in {str(s) for s in query.status}:
            return False
        if query.parent_id is not None and row.get("parent_id") != query.parent_id:
            return False
        if (
            query.env_id is not None
            and (row.get("environment") or {}).get("env_id") != query.env_id
        ):
            return False
        if not query.reproductions and "reproduced_from" in (row.get("tags") or {}):
            return False
        return self._metrics_and_text(row, query) and _equal(row, checks)

    def metric_history(self, run_id: str, key: str) -> list[MetricPoint]:
        with self._lock:
            points = sorted((s, t, v) for k, s, t, v in self._points.get(run_id, []) if k == key)
        return [MetricPoint(s, t, math.nan if v is None else v) for s, t, v in points]

    def _add_logs(self, batch: WriteBatch) -> None:
        for run_id, t, stream, text in batch.logs:
            if run_id in self._runs:
                self._log_ids += 1
                chunk = LogChunk(self._log_ids, t, stream, text)
                self._logs.setdefault(run_id, []).append(chunk)

    def run_logs(self, run_id: str, *, after: int = 0, limit: int = 1000) -> list[LogChunk]:
        with self._lock:
            return [c for c in self._logs.get(run_id, []) if c.id > after][:limit]

    def lineage(self, ref: str, *, depth: int = 20) -> Lineage:
        root = self.get_run(ref).id
        graph = Lineage(root)
        graph.runs[root] = {k: self._runs[root].get(k) for k in ("app", "function", "status",
                                                                  "name")}  # fmt: skip
        for (direction, _), art in sorted(self._artifacts.get(root, {}).items()):
            graph.artifacts[art["sha256"]] = {k: art[k] for k in ("name", "kind", "size")}
            edge = (art["sha256"], root, "consumed") if direction == "in" else (
                root, art["sha256"], "produced")  # fmt: skip
            graph.edges.append(edge)  # type: ignore[arg-type]
        return graph

    def export_rows(self, run_id: str) -> dict[str, Any]:
        with self._lock:
            if run_id not in self._runs:
                raise RunNotFoundError(run_id)
            return {
                "run": dict(self._runs[run_id]),
                "metrics": sorted(self._points.get(run_id, [])),
                "summary": {k: v for k, (_, v) in self._summary.get(run_id, {}).items()},
                "artifacts": [dict(a) for _, a in sorted(self._artifacts.get(run_id, {}).items())],
                "logs": [(c.time, c.stream, c.text) for c in self._logs.get(run_id, [])],
            }

    def dependants(self, run_id: str) -> list[str]:
        with self._lock:
            return [f"run {r} belongs to it (a sweep)" for r, row in self._runs.items()
                    if row.get("parent_id") == run_id]  # fmt: skip

    def delete_run(self, run_id: str, *, with_runs: bool = False, force: bool = False) -> list[str]:
        record = self.get_run(run_id)
        doomed = [r for r in self._runs if self._runs[r].get("parent_id") == record.id] if (
            with_runs) else []  # fmt: skip
        blocking = [] if with_runs else self.dependants(record.id)
        if not force and not record.status.terminal:
            blocking.append("it is still recording: wait for it to end, or pass --force")
        if blocking:
            raise DependencyError(f"run {record.id}", blocking)
        with self._lock:
            for rid in [*doomed, record.id]:
                for table in (self._runs, self._points, self._summary, self._artifacts,
                              self._logs):  # fmt: skip
                    table.pop(rid, None)
            self._append([audit.Event("run.delete", rid, {}, time.time(), self.actor)
                          for rid in [*doomed, record.id]])  # fmt: skip
        return [*doomed, record.id]

    # -- AuditLog ----------------------------------------------------------------------

    def chain_head(self) -> tuple[int, str]:
        with self._lock:
            return (self._chain[-1]["seq"], self._chain[-1]["hash"]) if self._chain else (
                0, audit.GENESIS)  # fmt: skip

    def event_hash(self, seq: int) -> str | None:
        with self._lock:
            return self._chain[seq - 1]["hash"] if 0 < seq <= len(self._chain) else None

    def verify(self) -> Iterator[audit.Problem]:
        with self._lock:
            rows = [tuple(r[k] for k in ("seq", "time", "actor", "action", "target", "payload",
                                         "payload_sha256", "prev_hash", "hash"))
                    for r in self._chain]  # fmt: skip
        yield from audit.verify_chain(iter(rows))


class MemoryRegistryRows:
    """The rows of the model registry in memory, as
    :class:`kiln.record.store._registry.RegistryRows` hands them to
    :class:`kiln.registry.models.Models` (which holds the rules)."""

    def __init__(self, tables: dict[str, Any], append: Any) -> None:
        self._t = tables
        self._append = append

    def has_model(self, name: str) -> bool:
        return name in self._t["models"]

    def add_model(self, name: str, *, app: str, at: float, by: str) -> None:
        self._t["models"][name] = {"name": name, "app": app, "created_at": at, "created_by": by}

    def model_names(self) -> list[str]:
        return sorted(self._t["models"])

    def latest_version(self, name: str) -> int | None:
        found = [v for (n, v) in self._t["versions"] if n == name]
        return max(found) if found else None

    def add_version(self, row: dict[str, Any]) -> None:
        self._t["versions"][(row["name"], row["version"])] = dict(row)

    def version(self, name: str, version: int) -> dict[str, Any] | None:
        found = self._t["versions"].get((name, version))
        return None if found is None else dict(found)

    def versions(self, name: str) -> list[dict[str, Any]]:
        return [dict(r) for (n, _), r in sorted(self._t["versions"].items()) if n == name]

    def holder(self, name: str, alias: str) -> int | None:
        found: int | None = self._t["aliases"].get((name, alias))
        return found

    def aliases(self, name: str) -> dict[str, int]:
        return dict(sorted((a, v) for (n, a), v in self._t["aliases"].items() if n == name))

    def move_alias(self, name: str, alias: str, *, from_version: int | None, to_version: int,
                   reason: str | None, actor: str, at: float) -> None:  # fmt: skip
        self._t["aliases"][(name, alias)] = to_version
        moves = self._t["moves"]
        moves.append({"id": len(moves) + 1, "name": name, "alias": alias,
                      "from_version": from_version, "to_version": to_version, "reason": reason,
                      "actor": actor, "at": at})  # fmt: skip

    def installed_from(self, name: str, alias: str, version: int) -> int | None:
        for move in reversed(self._t["moves"]):
            if (move["name"], move["alias"], move["to_version"]) == (name, alias, version):
                found: int | None = move["from_version"]
                return found
        return None

    def moves(self, name: str, alias: str | None = None) -> list[dict[str, Any]]:
        return [dict(m) for m in self._t["moves"]
                if m["name"] == name and alias in (None, m["alias"])]  # fmt: skip

    def policy(self, name: str, alias: str) -> dict[str, Any] | None:
        found = self._t["policies"].get((name, alias))
        return None if found is None else dict(found["policy"])

    def replace_policy(self, name: str, alias: str, row: dict[str, Any] | None) -> None:
        self._t["policies"].pop((name, alias), None)
        if row is not None:
            self._t["policies"][(name, alias)] = dict(row)

    def add_request(self, row: dict[str, Any]) -> None:
        self._t["requests"][row["id"]] = dict(row)

    def requests_starting(self, prefix: str, limit: int) -> list[dict[str, Any]]:
        return [dict(r) for i, r in self._t["requests"].items() if i.startswith(prefix)][:limit]

    def update_request(self, request_id: str, **values: Any) -> None:
        self._t["requests"][request_id].update(values)

    def requests(self, status: str | None) -> list[dict[str, Any]]:
        rows = sorted(self._t["requests"].values(), key=lambda r: r["requested_at"])
        return [dict(r) for r in rows if status in (None, r["status"])]

    def applied(self, name: str, alias: str, version: int) -> bool:
        return any((r["name"], r["alias"], r["version"], r["status"])
                   == (name, alias, version, "applied")
                   for r in self._t["requests"].values())  # fmt: skip

    def event(self, event: audit.Event) -> None:
        self._append([event])


class MemoryRegistryStore(MemoryStore):
    """:class:`MemoryStore` with the registry's rows too, so that
    :class:`kiln.registry.models.Models` runs over memory: a transaction works on a copy
    of the tables and its events, and keeps both only if its block returns."""

    def __init__(self, actor: str = "tester", blobs: MemoryBlobStore | None = None) -> None:
        super().__init__(actor, blobs)
        self._registry: dict[str, Any] = {"models": {}, "versions": {}, "aliases": {},
                                          "moves": [], "policies": {}, "requests": {}}  # fmt: skip
        self._registry_lock = threading.RLock()

    @contextmanager
    def registry_transaction(self) -> Iterator[MemoryRegistryRows]:
        with self._registry_lock:
            tables = copy.deepcopy(self._registry)
            events: list[audit.Event] = []
            yield MemoryRegistryRows(tables, events.extend)
            self._registry = tables
            if events:
                with self._lock:
                    self._append(events)

    @contextmanager
    def registry_reader(self) -> Iterator[MemoryRegistryRows]:
        with self._registry_lock:
            yield MemoryRegistryRows(copy.deepcopy(self._registry), _read_only)


def _read_only(events: list[audit.Event]) -> None:
    raise RuntimeError("registry_reader() is for reading; use registry_transaction() to write")
