"""In-memory stores implementing Kiln's store interfaces, for unit tests of the
layers above them. They pass the same contract suite as the SQL stores
(``tests/contract``), so a test built on them tests what the real ones do."""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from kiln.errors import AmbiguousIdError, NotFoundError
from kiln.record.store.base import EndpointRow, ServerRow, trace_prefix


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

    def write_spans(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            self._spans.extend(dict(r) for r in rows)

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
