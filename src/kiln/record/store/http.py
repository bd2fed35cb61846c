"""The record over HTTP: a client of ``kiln server`` behind the same interfaces as the
SQL store, so the SDK never knows which it has (``KILN_SERVER`` picks this one).

Writes never slow or stop a run. Each batch is sent gzipped with an idempotency key;
one the server did not acknowledge is sent again with the same key, so it is applied
exactly once. While the server cannot be reached, batches go to a spool file under
``KILN_HOME/spool`` (one clear warning) and are sent, in order, before anything newer
once it answers again; at exit the client waits a bounded time for them, then names
the spool file, and ``kiln sync`` sends what is left.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from kiln._hashing import sha256_file
from kiln.errors import (
    AccessDeniedError,
    ConfigError,
    KilnError,
    NotFoundError,
    RunNotFoundError,
    StoreRefusedError,
    StoreUnavailableError,
)
from kiln.record import audit
from kiln.record.blobs import FileBlobStore
from kiln.record.lineage import Lineage
from kiln.record.model import LogChunk, MetricPoint, RunRecord
from kiln.record.store import _wire
from kiln.record.store.base import (
    EndpointLog,
    EndpointLogRow,
    EndpointRow,
    RunQuery,
    ServerRow,
    WriteBatch,
    trace_prefix,
)
from kiln.record.store.rows import SpanRow

if TYPE_CHECKING:
    import httpx

API = "/api/v1"
SYNC_WAIT_S = 10.0  # at exit, how long a client waits for the server to take its spool
_RETRY_AFTER_S = 1.0  # after a failed send, spooled batches wait this long before the next
_TRANSIENT = (502, 503, 504)
_log = logging.getLogger("kiln")


class Client:
    """One connection pool to the server, its errors turned into Kiln's."""

    def __init__(
        self, url: str, *, actor: str, token: str | None = None, project: str | None = None
    ) -> None:
        from kiln._optional import require

        require("httpx", extra="server")
        import httpx

        self.url = url
        headers = {**actor_header(actor), **project_header(project), "User-Agent": "kiln"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=url, headers=headers,
            timeout=httpx.Timeout(60.0, connect=5.0),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
        )  # fmt: skip
        self._transport_errors: tuple[type[Exception], ...] = (httpx.TransportError,)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request; its JSON answer (None for an empty one). A problem answer
        raises the Kiln error it names; a server that cannot be reached raises
        :class:`StoreUnavailableError`."""
        response = self.send(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        reads = method in ("GET", "HEAD")
        for attempt in range(3 if reads else 1):  # reads are safe to repeat
            try:
                response = self._http.request(method, API + path, **kwargs)
            except self._transport_errors as e:
                if attempt < 2 and reads:
                    time.sleep(0.2 * (attempt + 1))
                    continue
                raise StoreUnavailableError(
                    self.url,
                    f"cannot be reached ({e}); is `kiln server` running there? (KILN_SERVER)",
                ) from None
            if response.status_code in _TRANSIENT and reads and attempt < 2:
                time.sleep(0.2 * (attempt + 1))
                continue
            if response.status_code >= 400:
                raise error_of(response, self.url)
            return response
        raise AssertionError("unreachable")

    def stream(self, method: str, path: str, **kwargs: Any) -> contextlib.AbstractContextManager[
        httpx.Response
    ]:  # fmt: skip
        return self._http.stream(method, API + path, **kwargs)

    @property
    def transport_errors(self) -> tuple[type[Exception], ...]:
        return self._transport_errors

    def close(self) -> None:
        self._http.close()


def error_of(response: httpx.Response, url: str) -> KilnError:
    """The Kiln error a problem answer (RFC 9457) names, with its context."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    detail = str(body.get("detail") or response.reason_phrase or response.status_code)
    kind = str(body.get("type", ""))
    if response.status_code in _TRANSIENT:
        return StoreUnavailableError(url, f"answered {response.status_code}: {detail}")
    if response.status_code in (401, 403, 429):
        denied = AccessDeniedError(f"{url} answered {response.status_code}: {detail}")
        denied.status = response.status_code
        return denied
    cls = _error_class(kind.removeprefix("urn:kiln:error:")) if kind.startswith("urn:") else None
    if cls is None:
        if response.status_code == 404:
            return NotFoundError(detail)
        return StoreRefusedError(url, f"answered {response.status_code}: {detail}")
    error = cls.__new__(cls)
    Exception.__init__(error, detail)
    for key, value in body.items():
        if key not in ("type", "title", "status", "detail", "errors"):
            setattr(error, key, value)
    return error


def _error_class(name: str) -> type[KilnError] | None:
    todo: list[type[KilnError]] = [KilnError]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo.extend(cls.__subclasses__())
    return None


class HttpBlobStore:
    """Blobs on the server, with a local cache of the ones read (``fetch`` returns a file
    of the cache). Uploads ask first and stream; downloads stream and are checked."""

    def __init__(
        self, client: Client, cache: FileBlobStore, spool: Spool | None = None,
        on_spool: Any = None,
    ) -> None:  # fmt: skip
        self._client = client
        self.cache = cache
        self._spool = spool  # while the server is down, blobs wait in the cache
        self._on_spool = on_spool

    def _keep(self, sha: str, error: StoreUnavailableError) -> None:
        """The server cannot be reached: the blob (in the cache) goes in the spool."""
        if self._spool is None:
            raise error
        self._spool.add_blob(sha)
        if self._on_spool is not None:
            self._on_spool(error)

    def upload_cached(self, sha256: str, project: str | None = None) -> None:
        """Send a spooled blob from the cache (if the server lacks it), for ``project``
        (None: the client's)."""
        headers = project_header(project)
        try:
            self._client.send("HEAD", f"/blobs/{sha256}", headers=headers)
        except NotFoundError:
            path = self.cache.path(sha256)
            with path.open("rb") as f:
                self._upload(sha256, f, path.stat().st_size, headers)

    def exists(self, sha256: str) -> bool:
        try:
            self._client.send("HEAD", f"/blobs/{sha256}")
        except NotFoundError:
            return False
        return True

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        try:
            if not self.exists(sha):
                self._client.send("PUT", f"/blobs/{sha}", content=data,
                                  headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        except StoreUnavailableError as e:
            self.cache.put_bytes(data)
            self._keep(sha, e)
        return sha

    def put_file(self, source: Path) -> tuple[str, int]:
        sha, size = sha256_file(source)
        try:
            if not self.exists(sha):
                with source.open("rb") as f:
                    self._upload(sha, f, size)
        except StoreUnavailableError as e:
            self.cache.put_file(source)
            self._keep(sha, e)
        return sha, size

    def put_stream(self, source: IO[bytes], sha256: str) -> None:
        if self.exists(sha256):
            return
        try:
            self._upload(sha256, source, None)
        except KilnError as e:
            if getattr(e, "field", None) == "sha256":
                raise ValueError(str(e)) from None
            raise

    def _upload(
        self, sha: str, source: IO[bytes], size: int | None, extra: dict[str, str] | None = None
    ) -> None:
        def chunks() -> Iterator[bytes]:
            while chunk := source.read(1 << 20):
                yield chunk

        headers = {"Content-Type": "application/octet-stream", **(extra or {})}
        if size is not None:
            headers["Content-Length"] = str(size)
        self._client.send("PUT", f"/blobs/{sha}", content=chunks(), headers=headers)

    def read(self, sha256: str) -> bytes:
        return self.fetch(sha256).read_bytes()

    def fetch(self, sha256: str) -> Path:
        if self.cache.exists(sha256):
            return self.cache.path(sha256)
        out, tmp = self.cache.incoming(sha256)
        digest = hashlib.sha256()
        try:
            with out, self._client.stream("GET", f"/blobs/{sha256}") as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_of(response, self._client.url)
                for chunk in response.iter_bytes(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != sha256:
                raise StoreRefusedError(self._client.url,
                                        f"sent bytes for blob {sha256[:12]} that hash to "
                                        f"{digest.hexdigest()[:12]}")  # fmt: skip
            self.cache.adopt(tmp, sha256)
        except self._client.transport_errors as e:
            raise StoreUnavailableError(self._client.url, f"cannot be reached ({e})") from None
        finally:
            tmp.unlink(missing_ok=True)
        return self.cache.path(sha256)


class Spool:
    """What the server has not taken yet, in the order it was written, in this process's
    file: one JSON line per batch (its idempotency key, its actor, its project, the
    batch) or per blob (its sha256 and project; the bytes wait in the client's cache)."""

    def __init__(self, folder: Path, project: str | None = None) -> None:
        self.folder = folder
        self.project = project  # each entry is sent to this project, by whoever sends it
        self.path = folder / f"{time.time_ns()}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        self.pending = 0
        self._lock = threading.Lock()  # the writer thread, code capture and callers add

    def add(self, batch: WriteBatch, wire: dict[str, Any]) -> None:
        self._line({"key": batch.key, "actor": batch.actor, "project": self.project,
                    "batch": wire})  # fmt: skip

    def add_blob(self, sha256: str) -> None:
        self._line({"blob": sha256, "project": self.project})

    def _line(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
            self.pending += 1

    def entries(self) -> list[dict[str, Any]]:
        return read_spool(self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self.pending = 0


def read_spool(path: Path) -> list[dict[str, Any]]:
    """The entries of a spool file; a last line cut short (the writer was killed while
    writing it) is left out: that batch was never acknowledged by anyone."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class HttpStore:
    """Every interface of the record (runs, audit, endpoints, spans, blobs) on a server."""

    remote = True  # each write is a round trip: the recorder sends run starts in the background

    def __init__(
        self, url: str, *, cache: Path, actor: str = "unknown", token: str | None = None,
        spool_dir: Path | None = None, project: str | None = None,
    ) -> None:  # fmt: skip
        self.url = url
        self.actor = actor
        self.project = project  # None: the token's
        self.client = Client(url, actor=actor, token=token, project=project)
        self._spool = Spool(spool_dir, project) if spool_dir is not None else None
        self.blobs = HttpBlobStore(self.client, FileBlobStore(cache), self._spool, self._warn)
        self._send_lock = threading.Lock()  # batches go out one at a time, in order
        self._next_try = 0.0
        self._warned = False

    @property
    def blob_store(self) -> HttpBlobStore:
        return self.blobs

    def __enter__(self) -> HttpStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Send what is spooled (waiting up to :data:`SYNC_WAIT_S`, or ``KILN_SYNC_WAIT_S``
        seconds), then let go."""
        try:
            self.flush_spool(wait_s=sync_wait_s())
        finally:
            self.client.close()

    # -- RunStore --------------------------------------------------------------------

    def write(self, batch: WriteBatch) -> None:
        """Send ``batch`` (spooled if the server cannot take it now; see the module)."""
        if not batch:
            return
        batch.cut_texts()
        if batch.key is None:
            batch.key = secrets.token_urlsafe(24)
        batch.actor = batch.actor or self.actor
        wire = _wire.batch_to_wire(batch)
        with self._send_lock:
            if self._spool is not None and self._spool.pending:
                self._spool.add(batch, wire)  # after the older ones, whatever happens
                self._drain()
                return
            try:
                self._post(batch.key, batch.actor, wire)
            except StoreUnavailableError as e:
                if self._spool is None:
                    raise
                self._spool.add(batch, wire)
                self._next_try = time.monotonic() + _RETRY_AFTER_S
                self._warn(e)

    def _post(
        self, key: str | None, actor: str | None, wire: dict[str, Any], project: str | None = None
    ) -> None:
        body = gzip.compress(json.dumps(wire).encode(), compresslevel=1)
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json",
                   **project_header(project)}  # fmt: skip
        if key:
            headers["Idempotency-Key"] = key
        if actor:
            headers.update(actor_header(actor))
        for attempt in range(3):  # the same key each time: applied once whatever happens
            try:
                self.client.send("POST", "/batches", content=body, headers=headers)
                return
            except StoreUnavailableError:
                if attempt == 2:
                    raise
                time.sleep(0.1 * (attempt + 1))
            except StoreRefusedError:
                raise
            except AccessDeniedError as e:  # kept, not dropped: `kiln login`, then `kiln sync`
                raise StoreUnavailableError(self.url, f"refused this client ({e})") from e
            except KilnError as e:  # refused for what it holds: the recorder bisects it
                raise StoreRefusedError(self.url, str(e)) from e

    def _drain(self) -> bool:
        """Send the spooled batches in order; True once none is left."""
        if self._spool is None:
            return True
        if time.monotonic() < self._next_try:
            return False
        entries = self._spool.entries()
        for entry in entries:
            try:
                self._send_entry(entry, self._spool.path)
            except StoreUnavailableError:
                self._next_try = time.monotonic() + _RETRY_AFTER_S
                return False
        self._spool.clear()
        if self._warned:
            _log.warning("kiln: %s answers again; the spooled batches are sent", self.url)
            self._warned = False
        return True

    def _send_entry(self, entry: dict[str, Any], spool: Path) -> bool:
        """Send one spooled entry; False if the server refused it, which is then set
        aside beside ``spool`` (in ``….refused``, with the reason) for a person to see,
        so that the entries after it still go."""
        try:
            project = entry.get("project")
            if "blob" in entry:
                self.blobs.upload_cached(str(entry["blob"]), project)
            else:
                self._post(entry["key"], entry["actor"], entry["batch"], project)
            return True
        except StoreUnavailableError:
            raise
        except (KilnError, OSError, KeyError, TypeError) as e:
            reason = f"the cached blob is gone ({e})" if isinstance(e, OSError) else str(e)
            aside = refused_path(spool)
            with aside.open("a") as f:
                f.write(json.dumps({"refused": reason, **entry}) + "\n")
            _log.warning("kiln: %s refused a spooled %s (%s); it is kept in %s", self.url,
                         "blob" if "blob" in entry else "batch", reason, aside)  # fmt: skip
            return False

    def flush_spool(self, *, wait_s: float) -> Path | None:
        """Try for up to ``wait_s`` to send the spool; the spool file if some is left."""
        if self._spool is None or not self._spool.pending:
            return None
        deadline = time.monotonic() + wait_s
        with self._send_lock:
            while not self._drain():
                if time.monotonic() >= deadline:
                    _log.warning(
                        "kiln: %s could not be reached; %d batches of this process wait in "
                        "%s: `kiln sync` sends them", self.url, self._spool.pending,
                        self._spool.path,
                    )  # fmt: skip
                    return self._spool.path
                time.sleep(min(0.5, max(0.0, self._next_try - time.monotonic())))
        return None

    def _warn(self, error: Exception) -> None:
        if not self._warned and self._spool is not None:
            _log.warning("kiln: %s; the run goes on, and what it records is kept in %s until "
                         "the server answers", error, self._spool.path)  # fmt: skip
            self._warned = True

    def get_run(self, run_id: str) -> RunRecord:
        if not run_id.strip():  # no path segment to ask for: no run has that id
            raise RunNotFoundError(run_id)
        self._quiet_spool()
        return _wire.record_from_wire(self.client.call("GET", f"/runs/{_q(run_id)}"), self,
                                      self.blobs)  # fmt: skip

    def query_runs(self, query: RunQuery) -> list[RunRecord]:
        self._quiet_spool()
        found = self.client.call("POST", "/runs:search", json=_wire.query_to_wire(query))
        return [_wire.record_from_wire(r, self, self.blobs) for r in found["runs"]]

    def metric_history(self, run_id: str, key: str) -> list[MetricPoint]:
        self._quiet_spool()
        found = self.client.call("GET", f"/runs/{_q(run_id)}/metrics/{_q(key)}")
        return _wire.points_from_wire(found["points"])

    def lineage(self, ref: str, *, depth: int = 20) -> Lineage:
        found = self.client.call("GET", f"/lineage/{_q(ref)}", params={"depth": depth})
        edges = [(e["from"], e["to"], e["kind"]) for e in found["edges"]]
        return Lineage(found["root"], found["runs"], found["artifacts"], edges)

    def export_rows(self, run_id: str) -> dict[str, Any]:
        found = self.client.call("GET", f"/runs/{_q(run_id)}/rows")
        found["metrics"] = [(k, s, t, _wire.from_number(v)) for k, s, t, v in found["metrics"]]
        found["summary"] = {k: _wire.from_number(v) for k, v in found["summary"].items()}
        found["logs"] = [tuple(r) for r in found.get("logs", [])]
        return dict(found)

    def run_logs(self, run_id: str, *, after: int = 0, limit: int = 1000) -> list[LogChunk]:
        self._quiet_spool()
        params = {"after": after, "limit": limit}
        found = self.client.call("GET", f"/runs/{_q(run_id)}/logs", params=params)
        return [LogChunk(**chunk) for chunk in found["logs"]]

    def dependants(self, run_id: str) -> list[str]:
        return list(self.client.call("GET", f"/runs/{_q(run_id)}/dependants")["items"])

    def delete_run(self, run_id: str, *, with_runs: bool = False, force: bool = False) -> list[str]:
        params = {"with_runs": with_runs, "force": force}
        return list(self.client.call("DELETE", f"/runs/{_q(run_id)}", params=params)["items"])

    def _quiet_spool(self) -> None:
        """Before a read, send what is spooled (if the server answers), so that a process
        reads what it wrote."""
        if self._spool is not None and self._spool.pending:
            with self._send_lock:
                self._drain()

    # -- AuditLog --------------------------------------------------------------------

    def audit_events(
        self, *, actor: str | None = None, action: str | None = None,
        target: str | None = None, limit: int | None = 100,
    ) -> list[dict[str, Any]]:  # fmt: skip
        params = {k: v for k, v in (("actor", actor), ("action", action), ("target", target),
                                    ("limit", limit or 100_000)) if v is not None}  # fmt: skip
        return list(self.client.call("GET", "/audit/events", params=params)["events"])

    def chain_head(self) -> tuple[int, str]:
        found = self.client.call("GET", "/audit/head")
        return int(found["seq"]), str(found["hash"])

    def event_hash(self, seq: int) -> str | None:
        try:
            return str(self.client.call("GET", f"/audit/events/{seq}")["hash"])
        except NotFoundError:
            return None

    def verify(self) -> Iterator[audit.Problem]:
        for p in self.client.call("POST", "/audit/verify")["problems"]:
            yield audit.Problem(p["seq"], p["message"])

    def collect_garbage(self, *, min_age_s: float, dry_run: bool) -> tuple[list[str], int]:
        """``kiln gc`` run by the server on its blobs: removed (or, dry, removable), kept."""
        found = self.client.call("POST", "/gc", json={"min_age_s": min_age_s,
                                                       "dry_run": dry_run})  # fmt: skip
        return list(found["removed"]), int(found["kept"])

    # -- EndpointStore ---------------------------------------------------------------

    def announce_server(
        self, endpoint: EndpointRow, server: ServerRow, *, forget: Sequence[str] = ()
    ) -> None:
        server_fields = {k: v for k, v in asdict(server).items() if k != "endpoint"}
        body = {"endpoint": asdict(endpoint), "server": server_fields, "forget": list(forget)}
        self.client.call("POST", "/servers", json=body)

    def report_server(
        self, server_id: str, *, status: str, stats: dict[str, Any] | None, url: str | None
    ) -> None:
        body = {"status": status, "stats": stats, "url": url}
        self.client.call("PATCH", f"/servers/{_q(server_id)}", json=body)

    def endpoint(self, name: str) -> EndpointRow | None:
        try:
            return _wire.endpoint_from_wire(self.client.call("GET", f"/endpoints/{_q(name)}"))
        except NotFoundError:
            return None

    def endpoints(self) -> list[EndpointRow]:
        found = self.client.call("GET", "/endpoints")["endpoints"]
        return [_wire.endpoint_from_wire(e) for e in found]

    def servers(self, names: Sequence[str]) -> list[ServerRow]:
        if not names:
            return []
        found = self.client.call("GET", "/servers", params={"endpoint": list(names)})
        return [_wire.server_from_wire(s) for s in found["servers"]]

    def write_endpoint_logs(self, rows: list[EndpointLogRow]) -> None:
        by_endpoint: dict[str, list[list[Any]]] = {}
        for e, v, p, t, s, x in rows:
            by_endpoint.setdefault(e, []).append([v, p, t, s, x])
        for name, logs in by_endpoint.items():
            for i in range(0, len(logs), 10_000):
                self.client.call("POST", f"/endpoints/{_q(name)}/logs",
                                 json={"logs": logs[i : i + 10_000]})  # fmt: skip

    def endpoint_logs(
        self, name: str, *, version: int | None = None, after: int = 0, limit: int = 1000
    ) -> list[EndpointLog]:
        params: dict[str, Any] = {"after": after, "limit": limit}
        if version is not None:
            params["version"] = version
        found = self.client.call("GET", f"/endpoints/{_q(name)}/logs", params=params)
        return [EndpointLog(**chunk) for chunk in found["logs"]]

    def set_live_traffic(
        self, name: str, split: dict[str, float] | None, *, actor: str, payload: dict[str, Any]
    ) -> None:
        """On a server this is checked there (see :func:`kiln.registry.traffic.set_traffic`),
        which writes the event itself: of ``payload`` only an override's reason is sent."""
        reason = (payload.get("override_policy") or {}).get("reason")
        self.client.call("PUT", f"/endpoints/{_q(name)}/traffic",
                         json={"traffic": split, "override_reason": reason},
                         headers=actor_header(actor))  # fmt: skip

    # -- SpanStore -------------------------------------------------------------------

    def write_spans(self, rows: list[SpanRow]) -> None:
        if rows:
            data = {"spans": [r.model_dump() for r in rows]}
            body = gzip.compress(json.dumps(data, default=str).encode(), compresslevel=1)
            headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
            self.client.send("POST", "/spans", content=body, headers=headers)

    def list_spans(
        self, *, endpoint: str | None = None, run_id: str | None = None,
        errors_only: bool = False, limit: int | None = 50,
    ) -> list[dict[str, Any]]:  # fmt: skip
        params: dict[str, Any] = {"errors_only": errors_only, "limit": limit or 100_000}
        if endpoint is not None:
            params["endpoint"] = endpoint
        if run_id is not None:
            params["run_id"] = run_id
        return list(self.client.call("GET", "/spans", params=params)["spans"])

    def find_trace(self, trace_id: str) -> list[dict[str, Any]]:
        ref = trace_prefix(trace_id)
        return list(self.client.call("GET", f"/traces/{ref}")["spans"])


def sync_wait_s() -> float:
    raw = os.environ.get("KILN_SYNC_WAIT_S")
    try:
        return SYNC_WAIT_S if raw is None else max(0.0, float(raw))
    except ValueError:
        raise ConfigError("KILN_SYNC_WAIT_S", f"{raw!r} is not a number of seconds") from None


def actor_header(actor: str) -> dict[str, str]:
    """The ``Kiln-Actor`` header naming ``actor`` (percent-encoded: a header is ASCII,
    a name need not be); none for ``""`` (the store's own actor)."""
    from urllib.parse import quote

    return {"Kiln-Actor": quote(actor, safe="")} if actor else {}


def project_header(project: str | None) -> dict[str, str]:
    """The ``Kiln-Project`` header naming ``project``; none for None (the token's)."""
    return {"Kiln-Project": project} if project else {}


def _q(part: str) -> str:
    """A path segment, quoted (an id or name never holds ``/``, but a hostile one might)."""
    from urllib.parse import quote

    return quote(part, safe="")


def refused_path(spool: Path) -> Path:
    """Where the entries of ``spool`` that the server refused are kept."""
    return spool.with_suffix(".refused")


@dataclass
class Synced:
    """What :func:`sync` did: batches sent, spool files left (the server is down) and
    files of entries the server refused."""

    sent: int = 0
    left: list[Path] = field(default_factory=list)
    refused: list[Path] = field(default_factory=list)


def sync(folder: Path, store: HttpStore) -> Synced:
    """Send every spool file under ``folder`` (oldest first), each batch with its key (so
    a batch the server took already is not applied twice). An entry the server refuses
    is set aside and the rest still go."""
    done = Synced()
    for path in sorted(folder.glob("*.jsonl")):
        try:
            for entry in read_spool(path):
                if store._send_entry(entry, path):
                    done.sent += "blob" not in entry
                elif refused_path(path) not in done.refused:
                    done.refused.append(refused_path(path))
        except StoreUnavailableError:
            done.left.append(path)
            continue
        path.unlink()
    return done
