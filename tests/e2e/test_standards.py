"""A served endpoint checked by the standards' own tools: an OTLP/HTTP receiver built
on opentelemetry-proto, OpenInference's conventions, OpenTelemetry's W3C propagator,
schemathesis against its OpenAPI document, and raw sockets for HTTP's limits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from openinference.semconv.trace import SpanAttributes
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client.parser import text_string_to_metric_families
from serving_app import Fragile, Typed, app, register
from typer.testing import CliRunner

from kiln import _deadlines
from kiln.cli import app as cli
from kiln.config import Settings
from kiln.errors import NotFoundError, ValidationError
from kiln.observe.why import explain, find_trace
from kiln.record.recorder import recorder_for
from kiln.serve import server
from kiln.serve.server import ServerHandle

CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def serve() -> Iterator[Callable[..., ServerHandle]]:
    handles: list[ServerHandle] = []

    def start(cls: type[Any], **spec: Any) -> ServerHandle:
        register(1.0)
        app.models.promote("scorer", 1, alias="production", reason="test")
        endpoint = app.endpoint(**{"model": "scorer@production", "cpu": 0.5, **spec})(cls)
        handle = endpoint.serve(port=0, block=False)
        assert handle is not None
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


class Receiver:
    """An OTLP/HTTP trace receiver: decodes each export with opentelemetry-proto."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.content_types: list[str] = []
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.path == "/v1/traces"
                received.content_types.append(self.headers["Content-Type"])
                received.requests.append(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def spans(self) -> dict[str, tuple[dict[str, Any], Span]]:
        """Every span received, by trace id: (its resource's attributes, the span)."""
        out = {}
        for request in self.requests:
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        out[span.trace_id.hex()] = (resource, span)
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _attributes(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        value = pair.value
        kind = value.WhichOneof("value")
        out[pair.key] = getattr(value, kind) if kind else None
    return out


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    receiving = Receiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiving.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "fraud-api")
    monkeypatch.setenv(
        "OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=fraud-7d9,openinference.project.name=fraud"
    )
    yield receiving
    receiving.close()


def test_an_otlp_receiver_gets_server_spans_by_the_conventions(
    receiver: Receiver, serve: Callable[..., ServerHandle]
) -> None:
    handle = serve(Fragile)
    with httpx.Client(base_url=handle.url, timeout=60) as client:
        headers = {"traceparent": CALLER, "tracestate": "rojo=00f067aa0ba902b7"}
        ok = client.post("/predict", json={"x": [1, 2]}, headers=headers)
        invalid = client.post("/predict", content=b"not json")
        not_json = client.post("/predict", json={"x": [1], "scale": 2})
    assert ok.status_code == 200 and invalid.status_code == 422
    # An answer JSON cannot carry is refused as a server error naming where it is.
    assert not_json.status_code == 500
    assert "answer.score is inf" in not_json.json()["error"]
    # The answer names its span: the caller's trace, a new span of ours, sampled.
    traced = ok.headers["traceparent"]
    version, trace_id, span_id, flags = traced.split("-")
    assert (version, trace_id, flags) == ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
    assert ok.headers["x-kiln-trace-id"] == trace_id and span_id != "00f067aa0ba902b7"
    ids = {r.headers["x-kiln-trace-id"] for r in (ok, invalid, not_json)}
    spans = wait_for(lambda: ids <= receiver.spans().keys() and receiver.spans(), what="OTLP")
    assert set(receiver.content_types) == {"application/x-protobuf"}
    resource, span = spans[trace_id]
    assert resource["service.name"] == "fraud-api"  # OTEL_SERVICE_NAME
    assert resource["k8s.pod.name"] == "fraud-7d9"  # OTEL_RESOURCE_ATTRIBUTES
    assert resource["openinference.project.name"] == "fraud"
    assert resource["telemetry.sdk.name"] == "opentelemetry"
    assert span.kind == Span.SPAN_KIND_SERVER and span.name == "POST /predict"
    assert span.span_id.hex() == span_id and span.parent_span_id.hex() == "00f067aa0ba902b7"
    assert span.trace_state == "rojo=00f067aa0ba902b7"
    assert span.status.code == Status.STATUS_CODE_UNSET
    attrs = _attributes(span.attributes)
    assert attrs["http.request.method"] == "POST" and attrs["http.route"] == "/predict"
    assert attrs["url.scheme"] == "http" and attrs["url.path"] == "/predict"
    assert attrs["server.address"] == "127.0.0.1"
    assert attrs["server.port"] == int(handle.url.rsplit(":", 1)[1])
    assert attrs["http.response.status_code"] == 200
    assert attrs[SpanAttributes.OPENINFERENCE_SPAN_KIND] == "CHAIN"
    assert attrs[SpanAttributes.INPUT_MIME_TYPE] == "application/json"
    assert attrs["kiln.model.name"] == "scorer" and attrs["kiln.model.version"] == 1
    # A 4xx leaves the status unset (the HTTP conventions); a 5xx is an error.
    _, refused = spans[invalid.headers["x-kiln-trace-id"]]
    assert refused.status.code == Status.STATUS_CODE_UNSET
    assert _attributes(refused.attributes)["http.response.status_code"] == 422
    assert _attributes(refused.attributes)[SpanAttributes.INPUT_MIME_TYPE] == "text/plain"
    _, failed = spans[not_json.headers["x-kiln-trace-id"]]
    assert failed.status.code == Status.STATUS_CODE_ERROR
    assert _attributes(failed.attributes)["error.type"] == "500"


def test_a_request_whose_replica_dies_is_a_span_with_a_trace_id_and_a_latency(
    receiver: Receiver, serve: Callable[..., ServerHandle]
) -> None:
    handle = serve(Fragile)
    with httpx.Client(base_url=handle.url, timeout=60) as client:
        died = client.post("/predict", json={"x": [1], "crash": True}, headers={
            "traceparent": CALLER})  # fmt: skip
        assert died.status_code == 503
        assert died.json() == {"error": "the replica answering it died"}  # no pid, no code
        after = client.post("/predict", json={"x": [1]})  # a new replica answers
        metrics = client.get("/metrics").text
    assert after.status_code == 200
    trace_id = died.headers["x-kiln-trace-id"]
    assert trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert died.headers["traceparent"].startswith(f"00-{trace_id}-")
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    latency = families["kiln_request_duration_seconds"].samples
    counts = {s.labels["version"]: s.value for s in latency if s.name.endswith("_count")}
    assert counts == {"1": 2.0}  # the 503 was observed too
    requests = {(s.labels["code"], s.value) for s in families["kiln_requests"].samples
                if s.name == "kiln_requests_total"}  # fmt: skip
    assert requests == {("503", 1.0), ("200", 1.0)}
    # Kiln's store has it, so `kiln why` can say which version it was routed to ...
    store = recorder_for(Settings.from_env()).store
    (row,) = wait_for(lambda: _trace(store, trace_id), what="the stored span")
    assert row["status"] == "error" and row["model_version"] == 1
    assert row["parent_id"] == "00f067aa0ba902b7"
    assert row["attributes"]["http.response.status_code"] == 503
    # ... and so does the OTLP receiver, with the resource of the front door.
    resource, span = wait_for(lambda: receiver.spans().get(trace_id), what="the OTLP span")
    assert resource["service.name"] == "fraud-api"
    assert span.kind == Span.SPAN_KIND_SERVER and span.status.code == Status.STATUS_CODE_ERROR


def test_why_needs_the_answers_traceparent_when_a_callers_trace_holds_several(
    serve: Callable[..., ServerHandle],
) -> None:
    handle = serve(Fragile)
    with httpx.Client(base_url=handle.url, timeout=60) as client:
        first, second = (client.post("/predict", json={"x": [x]}, headers={"traceparent": CALLER})
                         for x in (1, 2))  # fmt: skip
        twice = client.post("/predict", json={"x": [3]}, headers=[
            ("traceparent", CALLER), ("traceparent", CALLER.replace("4b", "5b"))])  # fmt: skip
    host, port = handle.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\ncontent-length: %d\r\n\r\n{" % 2**40)
        conn.settimeout(30)
        assert conn.recv(1024).startswith(b"HTTP/1.1 413 ")  # from the length it declared
    # two traceparent headers: no parent (as W3C's test suite wants), a new trace
    assert twice.headers["x-kiln-trace-id"] not in (CALLER[3:35], CALLER[3:35].replace("4b", "5b"))
    trace_id = first.headers["x-kiln-trace-id"]
    assert second.headers["x-kiln-trace-id"] == trace_id  # one trace, two answers
    store = recorder_for(Settings.from_env()).store
    wait_for(lambda: len(_trace(store, trace_id) or []) == 2, what="both spans")
    with pytest.raises(ValidationError, match="holds 2 answers"):
        explain(store, trace_id)
    for answer, x in ((first, 1), (second, 2)):
        info = explain(store, answer.headers["traceparent"])  # names the answer's own span
        assert json.loads(info["input"]) == {"x": [x]}
        assert info["span_id"] == answer.headers["traceparent"].split("-")[2]
    shown = CliRunner().invoke(cli, ["why", second.headers["traceparent"]])
    assert shown.exit_code == 0 and '{"x":[2]}' in shown.output, shown.output


def _trace(store: Any, trace_id: str) -> list[dict[str, Any]] | None:
    try:
        return find_trace(store, trace_id)
    except NotFoundError:
        return None


def test_schemathesis_finds_no_fault_in_the_openapi_document(
    serve: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    handle = serve(Typed)
    document = httpx.get(f"{handle.url}/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    request = document["components"]["schemas"]["TypedRequest"]
    assert request["required"] == ["features"] and request["additionalProperties"] is False
    answer = document["paths"]["/predict"]["post"]["responses"]["200"]
    assert answer["content"]["application/json"]["schema"]["$ref"].endswith("/TypedAnswer")
    score = document["components"]["schemas"]["TypedAnswer"]
    assert set(score["properties"]) == {"above", "share", "label"}
    report = tmp_path / "report.json"
    found = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{handle.url}/openapi.json",
         "--checks", "all", "--max-examples", "25", "--seed", "1", "--workers", "1",
         "--generation-deterministic", "--no-color",
         "--request-timeout", "30", "--report", "json", "--report-json-path", str(report)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"},
    )  # fmt: skip
    assert found.returncode == 0, found.stdout[-6000:] + found.stderr[-2000:]
    checked = json.loads(report.read_text())
    assert checked["failures"] == [] and checked["errors"] == []
    assert checked["operations"]["tested"] == checked["operations"]["selected"] >= 5
    assert checked["test_cases"]["generated"] > 50 and "POST /predict" in checked["valid_rates"]


def test_connections_that_never_finish_their_headers_are_closed(
    serve: Callable[..., ServerHandle], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "HEADER_TIMEOUT_S", 0.5)
    monkeypatch.setattr(server, "BODY_TIMEOUT_S", 0.5)
    monkeypatch.setattr(_deadlines, "SWEEP_S", 0.1)
    handle = serve(Typed)
    host, port = handle.url.removeprefix("http://").split(":")
    slow = [
        b"",
        b"POST /predict HTTP/1.1\r\nHost: x\r\n",  # nothing, half the headers,
        b"POST /predict HTTP/1.1\r\nHost: x\r\ncontent-length: 100\r\n\r\n{",
    ]  # some body
    half_open = []
    for i in range(60):
        conn = socket.create_connection((host, int(port)))
        conn.sendall(slow[i % 3])
        conn.settimeout(30)
        half_open.append(conn)
    for conn in half_open:
        answer = b""
        while chunk := conn.recv(1024):  # until the server closes it
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive in time" in answer
        conn.close()
    families = {f.name: f for f in text_string_to_metric_families(
        httpx.get(f"{handle.url}/metrics").text)}  # fmt: skip
    codes = {s.labels["code"]: s.value for s in families["kiln_requests"].samples
             if s.name == "kiln_requests_total"}  # fmt: skip
    assert codes == {"408": 20.0}  # the slow bodies: recorded as what they were answered
    answered = httpx.post(f"{handle.url}/predict", json={"features": [1.0]})
    assert answered.status_code == 200 and answered.json()["above"] == 1
