"""The EndpointStore and SpanStore interfaces, on every implementation (SQLite,
PostgreSQL, a real ``kiln server`` on each over HTTP, and the in-memory fake of
kiln.testing). Tests see the interfaces only
(and the audit events they write): no SQL, no schema."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from conftest import SERVER_STORES, STORES, record_settings
from kiln.errors import AmbiguousIdError, NotFoundError, ValidationError
from kiln.record.blobs import FileBlobStore
from kiln.record.store import open_store
from kiln.record.store.base import EndpointRow, EndpointStore, ServerRow, SpanStore
from kiln.record.store.rows import SpanRow
from kiln.record.store.sql import SqlStore
from kiln.testing import MemoryEndpointStore


class Both(EndpointStore, SpanStore, Protocol):
    """What the fixture yields: the two interfaces, and the events they write."""

    def audit_events(
        self, *, actor: str | None = None, action: str | None = None,
        target: str | None = None, limit: int | None = 100,
    ) -> list[dict[str, Any]]: ...  # fmt: skip


@pytest.fixture(params=[*STORES, *SERVER_STORES, "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Both]:
    if request.param == "memory":
        yield MemoryEndpointStore()
        return
    if str(request.param).startswith("http"):
        monkeypatch = request.getfixturevalue("monkeypatch")
        with open_store(record_settings(request, str(request.param), monkeypatch)) as s:
            yield s
        return
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else (
        f"sqlite:///{tmp_path / 'kiln.db'}")  # fmt: skip
    with SqlStore(url, FileBlobStore(tmp_path / "blobs")) as s:
        yield s


def declared(name: str = "fraud", model: str = "fraud@production") -> EndpointRow:
    return EndpointRow(name=name, app="a", model=model, spec={"min_replicas": 1}, traffic=None,
                       updated_at=time.time())  # fmt: skip


def server(server_id: str, started: float, endpoint: str = "fraud") -> ServerRow:
    return ServerRow(id=server_id, endpoint=endpoint, url=f"http://h:{started:.0f}", host="h",
                     pid=7, status="serving", stats={}, started_at=started,
                     updated_at=started)  # fmt: skip


def test_servers_announce_report_and_are_forgotten(store: Both) -> None:
    assert store.endpoint("fraud") is None and store.endpoints() == []
    store.announce_server(declared(), server("s1", 100.0))
    store.announce_server(declared(), server("s2", 200.0))
    store.announce_server(declared("other"), server("s3", 300.0, "other"))
    assert [e.name for e in store.endpoints()] == ["fraud", "other"]
    assert [s.id for s in store.servers(["fraud"])] == ["s2", "s1"]  # newest first
    store.report_server("s1", status="serving", stats={"requests": 5}, url=None)
    store.report_server("s1", status="stopped", stats=None, url="http://h:1")
    (s1,) = [s for s in store.servers(["fraud"]) if s.id == "s1"]
    assert (s1.status, s1.stats, s1.url) == ("stopped", {"requests": 5}, "http://h:1")
    store.announce_server(declared(model="fraud:2"), server("s4", 400.0), forget=["s1", "s3"])
    assert [s.id for s in store.servers(["fraud", "other"])] == ["s4", "s3", "s2"]
    found = store.endpoint("fraud")
    assert found is not None and found.model == "fraud:2"  # the declaration is the latest


@pytest.fixture(params=[*STORES, "memory"])
def owner(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Both]:
    """The stores that own their database: a split is set there unchecked (on a server
    the server checks it, see tests/contract/test_registry.py)."""
    if request.param == "memory":
        yield MemoryEndpointStore()
        return
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else (
        f"sqlite:///{tmp_path / 'kiln.db'}")  # fmt: skip
    with SqlStore(url, FileBlobStore(tmp_path / "blobs")) as s:
        yield s


def test_a_live_split_survives_announcements_and_is_audited(owner: Both) -> None:
    store = owner
    store.announce_server(declared(), server("s1", 100.0))
    split = {"fraud:1": 90.0, "fraud:2": 10.0}
    store.set_live_traffic("fraud", split, actor="alice", payload={"traffic": split})
    store.announce_server(declared(), server("s2", 200.0))  # another server starts
    found = store.endpoint("fraud")
    assert found is not None and found.traffic == split
    (event,) = store.audit_events(action="endpoint.traffic", target="fraud")
    assert event["actor"] == "alice" and json.loads(event["payload"])["traffic"] == split
    assert len(store.audit_events(action="endpoint.serve", target="fraud")) == 2
    store.set_live_traffic("fraud", None, actor="bob", payload={"traffic": None})
    cleared = store.endpoint("fraud")
    assert cleared is not None and cleared.traffic is None
    with pytest.raises(NotFoundError, match="no endpoint 'nope'"):
        store.set_live_traffic("nope", split, actor="alice", payload={})
    assert len(store.audit_events(action="endpoint.traffic")) == 2  # nothing for 'nope'


def span(trace: str, span_id: str, start: int, *, endpoint: str = "fraud",
         status: str = "ok", run_id: str = "r" * 32) -> SpanRow:  # fmt: skip
    return SpanRow.model_validate({
        "trace_id": trace, "span_id": span_id, "parent_id": None, "name": "POST /predict",
        "endpoint": endpoint, "model_name": "fraud", "model_version": 1, "run_id": run_id,
        "start_ns": start, "duration_ns": 5, "status": status,
        "attributes": {"http.response.status_code": 200}})  # fmt: skip


def test_spans_are_listed_and_traces_found_by_prefix(store: Both) -> None:
    a, b = "ab" * 16, "abababab" + "cd" * 12  # one prefix of 8, told apart at 10
    store.write_spans([span(a, "1" * 16, 10), span(a, "2" * 16, 5, status="error"),
                       span(b, "3" * 16, 20, endpoint="other", run_id="s" * 32)])  # fmt: skip
    assert [s["span_id"] for s in store.list_spans()] == ["3" * 16, "1" * 16, "2" * 16]
    assert [s["span_id"] for s in store.list_spans(endpoint="fraud", limit=1)] == ["1" * 16]
    assert [s["span_id"] for s in store.list_spans(errors_only=True)] == ["2" * 16]
    assert [s["trace_id"] for s in store.list_spans(run_id="sss")] == [b]
    trace = store.find_trace(a[:10].upper())
    assert [s["span_id"] for s in trace] == ["2" * 16, "1" * 16]  # oldest first
    assert trace[0]["attributes"] == {"http.response.status_code": 200}
    with pytest.raises(AmbiguousIdError):
        store.find_trace("abababab")
    with pytest.raises(NotFoundError, match="no trace"):
        store.find_trace("ffffffff")
    for bad in ("abc", "not-hex!", "abab abab"):
        with pytest.raises(ValidationError, match="TRACE_ID"):
            store.find_trace(bad)


def test_endpoint_logs_are_kept_in_order_by_version(store: Both) -> None:
    store.announce_server(declared(), server("s1", 1.0))
    store.write_endpoint_logs([
        ("fraud", None, 11, 1.0, "stdout", "warming up\n"),
        ("fraud", 2, 11, 2.0, "stdout", "loaded v2\n"),
        ("fraud", 3, 12, 3.0, "stderr", "loaded v3\n"),
    ])  # fmt: skip
    every = store.endpoint_logs("fraud")
    assert [(c.version, c.replica, c.stream, c.text) for c in every] == [
        (None, 11, "stdout", "warming up\n"), (2, 11, "stdout", "loaded v2\n"),
        (3, 12, "stderr", "loaded v3\n")]  # fmt: skip
    assert [c.text for c in store.endpoint_logs("fraud", version=3)] == ["loaded v3\n"]
    assert [c.text for c in store.endpoint_logs("fraud", after=every[0].id, limit=1)] == [
        "loaded v2\n"]  # fmt: skip
    assert store.endpoint_logs("other") == []
