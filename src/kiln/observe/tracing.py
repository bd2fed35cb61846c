"""Traces of inferences: OpenTelemetry spans named in OpenInference's conventions.

Each request an endpoint answers (and each shard of a batch job) becomes one span
made by the OpenTelemetry SDK, with

- OpenInference's attributes: ``openinference.span.kind``, ``input.value`` and
  ``output.value`` with their mime types, and for ``kind="llm"`` endpoints the
  ``llm.*`` attributes (model name, invocation parameters, messages, token counts);
- Kiln's attributes, which name the immutable identity behind the answer, never an
  alias: ``kiln.model.name``, ``kiln.model.version``, ``kiln.run.id``, ``kiln.endpoint``.

Spans are exported by a batch processor to the store's ``spans`` table (so that
``kiln why TRACE_ID`` can walk from an answer to the run, code, data and
environment behind it) and, when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, over OTLP.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from openinference.semconv.trace import (
    EmbeddingAttributes,
    MessageAttributes,
    OpenInferenceMimeTypeValues,
    OpenInferenceSpanKindValues,
    SpanAttributes,
    ToolAttributes,
    ToolCallAttributes,
)
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.semconv.attributes import (
    error_attributes,
    http_attributes,
    server_attributes,
    url_attributes,
)
from opentelemetry.trace import SpanKind, StatusCode

from kiln.record.store.rows import SpanRow

if TYPE_CHECKING:
    from kiln.record.store.base import KilnStore

MODEL_NAME = "kiln.model.name"
MODEL_VERSION = "kiln.model.version"
RUN_ID = "kiln.run.id"
ENDPOINT = "kiln.endpoint"
ROUTED_BY = "kiln.endpoint.model"  # the reference the endpoint serves (its alias)
BATCH_RUN_ID = "kiln.batch.run_id"
CPU_SECONDS = "kiln.cpu_seconds"

SPAN_KINDS = tuple(k.value.lower() for k in OpenInferenceSpanKindValues)
JSON_MIME = OpenInferenceMimeTypeValues.JSON.value
TEXT_MIME = OpenInferenceMimeTypeValues.TEXT.value
MAX_VALUE_CHARS = 64 * 1024  # longer inputs and outputs are cut, and say so
# How often the batch processor exports: short, so `kiln why` finds a span at once.
EXPORT_DELAY_MS = 500
FLUSH_SPANS = 256  # spans pickled together, on the thread that ended the last of them
LLM_PROVIDER = "kiln"  # the host of a model Kiln serves, unless the endpoint says otherwise

_log = logging.getLogger("kiln")


RUN_TRACE_ID = "kiln.run.trace_id"  # the trace of the run that trained the model


def identity_attributes(
    *, endpoint: str, model_name: str, model_version: int, run_id: str, kind: str
) -> dict[str, Any]:
    """The attributes every span of one endpoint replica carries."""
    attrs: dict[str, Any] = {
        SpanAttributes.OPENINFERENCE_SPAN_KIND: kind.upper(),
        ENDPOINT: endpoint,
        MODEL_NAME: model_name,
        MODEL_VERSION: model_version,
        RUN_ID: run_id,
    }
    if kind == "llm":
        attrs[SpanAttributes.LLM_PROVIDER] = LLM_PROVIDER
        attrs[SpanAttributes.LLM_SYSTEM] = LLM_PROVIDER
    return attrs


def server_span_attributes(url: str, route: str) -> dict[str, Any]:
    """HTTP semantic-convention attributes of the request spans of a server at ``url``."""
    where = urlsplit(url)
    attrs: dict[str, Any] = {
        http_attributes.HTTP_REQUEST_METHOD: "POST",
        http_attributes.HTTP_ROUTE: route,
        url_attributes.URL_PATH: route,
        url_attributes.URL_SCHEME: where.scheme or "http",
    }
    if where.hostname:
        attrs[server_attributes.SERVER_ADDRESS] = where.hostname
    if where.port:
        attrs[server_attributes.SERVER_PORT] = where.port
    return attrs


def http_status_attributes(code: int) -> dict[str, Any]:
    """The status code of an answer, and ``error.type`` for a server error."""
    attrs: dict[str, Any] = {http_attributes.HTTP_RESPONSE_STATUS_CODE: code}
    if code >= 500:
        attrs[error_attributes.ERROR_TYPE] = str(code)
    return attrs


def io_attributes(
    input_text: str, output_text: str | None, *, input_json: bool = True,
    output_json: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """``input.value`` / ``output.value`` with their mime types: JSON only for JSON
    text that was kept whole (a value cut at ``MAX_VALUE_CHARS`` is plain text)."""
    attrs: dict[str, Any] = {}
    for text, is_json, value, mime in (
        (input_text, input_json, SpanAttributes.INPUT_VALUE, SpanAttributes.INPUT_MIME_TYPE),
        (output_text, output_json, SpanAttributes.OUTPUT_VALUE, SpanAttributes.OUTPUT_MIME_TYPE),
    ):
        if text is None:
            continue
        cut = _cut(text)
        attrs[value] = cut
        attrs[mime] = JSON_MIME if is_json and cut is text else TEXT_MIME
    return attrs


def llm_attributes(model: str, request: Mapping[str, Any], response: Any) -> dict[str, Any]:
    """OpenInference's ``llm.*`` attributes for a chat-style request and response.

    Understood shapes: ``messages`` (a list of ``{"role", "content"}``, with OpenAI-style
    ``tool_calls`` and ``tool_call_id``) or ``prompt`` in the request, ``tools`` (the
    tools offered), the other request fields as invocation parameters; in the
    response, ``content`` (and ``tool_calls``) or OpenAI-style ``choices[0].message``,
    and ``usage`` with ``prompt_tokens`` / ``completion_tokens`` / ``total_tokens``.
    """
    attrs: dict[str, Any] = {SpanAttributes.LLM_MODEL_NAME: model}
    params = {k: v for k, v in request.items() if k not in ("messages", "prompt", "tools")}
    if params:
        attrs[SpanAttributes.LLM_INVOCATION_PARAMETERS] = json.dumps(params, default=str)
    messages = request.get("messages")
    if isinstance(messages, list):
        attrs.update(_messages(SpanAttributes.LLM_INPUT_MESSAGES, messages))
    elif isinstance(request.get("prompt"), str):
        attrs.update(_messages(SpanAttributes.LLM_INPUT_MESSAGES, [
            {"role": "user", "content": request["prompt"]}]))  # fmt: skip
    tools = request.get("tools")
    if isinstance(tools, list):
        for i, tool in enumerate(tools):
            attrs[f"{SpanAttributes.LLM_TOOLS}.{i}.{ToolAttributes.TOOL_JSON_SCHEMA}"] = json.dumps(
                tool, default=str
            )
    if isinstance(response, str):
        attrs.update(_messages(SpanAttributes.LLM_OUTPUT_MESSAGES, [
            {"role": "assistant", "content": response}]))  # fmt: skip
    elif isinstance(response, Mapping):
        message = _response_message(response)
        if message is not None:
            attrs.update(_messages(SpanAttributes.LLM_OUTPUT_MESSAGES, [message]))
        usage = response.get("usage")
        if isinstance(usage, Mapping):
            for key, attr in (
                ("prompt_tokens", SpanAttributes.LLM_TOKEN_COUNT_PROMPT),
                ("completion_tokens", SpanAttributes.LLM_TOKEN_COUNT_COMPLETION),
                ("total_tokens", SpanAttributes.LLM_TOKEN_COUNT_TOTAL),
            ):
                if isinstance(usage.get(key), int):
                    attrs[attr] = usage[key]
    return attrs


def _response_message(response: Mapping[str, Any]) -> dict[str, Any] | None:
    if isinstance(response.get("content"), str) or isinstance(response.get("tool_calls"), list):
        return {"role": "assistant", **response}
    choices = response.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        message = choices[0].get("message")
        if isinstance(message, Mapping):
            return dict(message)
    return None


def _messages(prefix: str, messages: Sequence[Any]) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            continue
        at = f"{prefix}.{i}."
        for key, attr in (
            ("role", MessageAttributes.MESSAGE_ROLE),
            ("content", MessageAttributes.MESSAGE_CONTENT),
            ("name", MessageAttributes.MESSAGE_NAME),
            ("tool_call_id", MessageAttributes.MESSAGE_TOOL_CALL_ID),
        ):
            if isinstance(message.get(key), str):
                attrs[at + attr] = message[key]
        calls = message.get("tool_calls")
        for j, call in enumerate(calls if isinstance(calls, list) else ()):
            if isinstance(call, Mapping):
                attrs.update(_tool_call(f"{at}{MessageAttributes.MESSAGE_TOOL_CALLS}.{j}.", call))
    return attrs


def _tool_call(at: str, call: Mapping[str, Any]) -> dict[str, Any]:
    """One OpenAI-style tool call (``{"id", "function": {"name", "arguments"}}``)."""
    attrs: dict[str, Any] = {}
    if isinstance(call.get("id"), str):
        attrs[at + ToolCallAttributes.TOOL_CALL_ID] = call["id"]
    function = call.get("function")
    if isinstance(function, Mapping):
        if isinstance(function.get("name"), str):
            attrs[at + ToolCallAttributes.TOOL_CALL_FUNCTION_NAME] = function["name"]
        arguments = function.get("arguments")
        if arguments is not None:
            attrs[at + ToolCallAttributes.TOOL_CALL_FUNCTION_ARGUMENTS_JSON] = (
                arguments if isinstance(arguments, str) else json.dumps(arguments, default=str)
            )
    return attrs


def embedding_attributes(model: str, request: Mapping[str, Any], response: Any) -> dict[str, Any]:
    """OpenInference's ``embedding.*`` attributes for an embedding request and answer.

    Understood shapes: the texts as ``input``, ``text`` or ``texts`` (a string or a
    list of them) in the request; the vectors as the answer itself (one vector or a
    list of them), as ``embedding`` / ``embeddings``, or OpenAI-style
    ``data[i].embedding``.
    """
    attrs: dict[str, Any] = {SpanAttributes.EMBEDDING_MODEL_NAME: model}
    texts = next((request[k] for k in ("input", "texts", "text") if k in request), None)
    if isinstance(texts, str):
        texts = [texts]
    vectors = _vectors(response)
    items = max(len(texts) if isinstance(texts, list) else 0, len(vectors))
    for i in range(items):
        at = f"{SpanAttributes.EMBEDDING_EMBEDDINGS}.{i}."
        if isinstance(texts, list) and i < len(texts) and isinstance(texts[i], str):
            attrs[at + EmbeddingAttributes.EMBEDDING_TEXT] = texts[i]
        if i < len(vectors):
            attrs[at + EmbeddingAttributes.EMBEDDING_VECTOR] = vectors[i]
    return attrs


def _vectors(response: Any) -> list[list[float]]:
    if isinstance(response, Mapping):
        if isinstance(response.get("data"), list):
            response = [d.get("embedding") for d in response["data"] if isinstance(d, Mapping)]
        else:
            response = response.get("embeddings", response.get("embedding"))
    if hasattr(response, "tolist"):
        response = response.tolist()
    if not isinstance(response, list) or not response:
        return []
    if all(isinstance(x, int | float) and not isinstance(x, bool) for x in response):
        response = [response]  # one vector
    out = []
    for vector in response:
        if hasattr(vector, "tolist"):
            vector = vector.tolist()
        if not isinstance(vector, list):
            return []
        out.append([float(x) for x in vector if isinstance(x, int | float)])
    return out


def _cut(text: str) -> str:
    if len(text) <= MAX_VALUE_CHARS:
        return text
    return text[:MAX_VALUE_CHARS] + f"... [{len(text) - MAX_VALUE_CHARS} more characters]"


def parent_context(raw: str) -> Context:
    """The context a caller's W3C headers give (``traceparent``, then ``tracestate``
    after a newline), read by OpenTelemetry's propagator: version ``ff``, upper-case
    hex, zero ids and bad flags are refused (an empty context: a new trace), a later
    version is read by its first four fields, and ``tracestate`` is kept."""
    parent, _, state = raw.partition("\n")
    carrier = {"traceparent": parent, "tracestate": state} if state else {"traceparent": parent}
    context: Context = _propagator().extract(carrier)
    return context


@functools.cache
def _propagator() -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def traceparent(span: Any) -> bytes:
    """The W3C ``traceparent`` naming ``span``, to answer with."""
    c = span.get_span_context()
    return b"00-%032x-%016x-%02x" % (c.trace_id, c.span_id, c.trace_flags)


def refused_request_span(
    tracer: Any, *, name: str, received_ns: int, context: str, attributes: dict[str, Any],
    code: int, message: str,
) -> bytes:  # fmt: skip
    """Record the span of a request the front door answered itself (no replica could:
    it died, or its version never started); returns its ``traceparent``."""
    span = tracer.start_span(
        name, context=parent_context(context) if context else None, kind=SpanKind.SERVER,
        start_time=received_ns or None, attributes=attributes,
    )  # fmt: skip
    span.set_attributes({**http_status_attributes(code), "kiln.error": message})
    if code >= 500:
        span.set_status(StatusCode.ERROR, message)
    span.end()
    return traceparent(span)


Compact = tuple[int, int, int | None, str, int, int, bool, dict[str, Any]]


def compact(span: ReadableSpan) -> Compact:
    """A finished span as a small tuple (cheap to make and to pickle)."""
    context = span.get_span_context()
    trace_id, span_id = (context.trace_id, context.span_id) if context else (0, 0)
    start = span.start_time or 0
    return (
        trace_id, span_id, span.parent.span_id if span.parent else None, span.name, start,
        span.end_time or start, span.status.status_code is StatusCode.ERROR,
        dict(span.attributes or {}),
    )  # fmt: skip


def compact_row(c: Compact) -> SpanRow:
    """A compact span as a row of the store's ``spans`` table."""
    trace_id, span_id, parent_id, name, start, end, error, attrs = c
    version = attrs.get(MODEL_VERSION)
    return SpanRow.model_construct(
        trace_id=f"{trace_id:032x}",
        span_id=f"{span_id:016x}",
        parent_id=None if parent_id is None else f"{parent_id:016x}",
        name=name,
        endpoint=attrs.get(ENDPOINT),
        model_name=attrs.get(MODEL_NAME),
        model_version=int(version) if isinstance(version, int) else None,
        run_id=attrs.get(RUN_ID),
        start_ns=start,
        duration_ns=max(0, end - start),
        status="error" if error else _unset_status(attrs),
        attributes={k: _plain(v) for k, v in attrs.items()},
    )


def span_row(span: ReadableSpan) -> SpanRow:
    """A finished span as a row of the store's ``spans`` table."""
    return compact_row(compact(span))


def _unset_status(attrs: Mapping[str, Any]) -> str:
    """A span whose status is unset: "invalid" for a request refused with a 4xx (not
    an error of the server's, per the HTTP conventions, but not a good answer)."""
    code = attrs.get(http_attributes.HTTP_RESPONSE_STATUS_CODE)
    return "invalid" if isinstance(code, int) and 400 <= code < 500 else "ok"


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class StoreSpanProcessor(SpanProcessor):
    """Sends finished spans to a writer process of its own
    (:mod:`kiln.observe._span_writer`), which stores them in the ``spans`` table.

    Each span becomes a compact tuple as it ends, and every ``FLUSH_SPANS`` of them
    are pickled there too, a little at a time; a sender thread only writes the
    bytes to the pipe (the GIL released) and, every ``EXPORT_DELAY_MS``, sends what
    a quiet endpoint has gathered. A batch processor would instead convert
    thousands of spans in bursts on a thread of its own, holding the GIL that
    ``predict`` needs: at a few thousand requests a second that made the tail
    latency five times worse. The writer process is started by the first full
    batch; until then (a quiet endpoint, a batch job's few shard spans) the sender
    thread stores the little there is itself.
    """

    def __init__(self, store_url: str) -> None:
        self._url = store_url
        self._pending: list[Compact] = []
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue[bytes | list[Compact] | None] = queue.SimpleQueue()
        self._writer: subprocess.Popen[bytes] | None = None
        self._store: KilnStore | None = (
            None  # for the few spans of a quiet spell, before any writer
        )
        self._sender = threading.Thread(target=self._send, name="kiln-spans", daemon=True)
        self._sender.start()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        """Nothing to do until the span ends."""

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            self._pending.append(compact(span))
            if len(self._pending) < FLUSH_SPANS:
                return
            batch, self._pending = self._pending, []
        self._outbox.put(pickle.dumps(batch, protocol=5))

    def _take(self) -> list[Compact] | None:
        with self._lock:
            batch, self._pending = self._pending, []
        return batch or None

    def _send(self) -> None:
        while True:
            try:
                data = self._outbox.get(timeout=EXPORT_DELAY_MS / 1000)
            except queue.Empty:  # a quiet spell: send what has gathered
                data = self._take()
                if data is None:
                    continue
            if data is None:  # shutdown
                return
            if isinstance(data, list) and self._writer is None:
                self._store_here(data)
            else:
                self._write(data if isinstance(data, bytes) else pickle.dumps(data, protocol=5))

    def _store_here(self, batch: list[Compact]) -> None:
        try:
            if self._store is None:
                from kiln.record.store import open_store

                self._store = open_store(self._url, create=False)
            self._store.write_spans([compact_row(c) for c in batch])
        except Exception as exc:  # spans must not take the server down
            _log.warning("kiln: %d spans were not stored: %s", len(batch), exc)

    def _write(self, data: bytes) -> None:
        try:
            frames = [data]
            if self._writer is None or self._writer.poll() is not None:
                self._writer = subprocess.Popen(
                    [sys.executable, "-m", "kiln.observe._span_writer"], stdin=subprocess.PIPE
                )
                frames.insert(0, self._url.encode())  # not in argv: it may hold a password
            pipe = self._writer.stdin
            assert pipe is not None  # noqa: S101  made with stdin=PIPE
            pipe.write(b"".join(struct.pack("!Q", len(f)) + f for f in frames))
            pipe.flush()
        except Exception as exc:  # spans must not take the server down
            _log.warning("kiln: spans were not stored: %s", exc)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        data = self._take()
        if data is not None:
            self._outbox.put(data)
        return True

    def shutdown(self) -> None:
        """Send what is pending, close the pipe; the writer stores it all, then exits."""
        self.force_flush()
        self._outbox.put(None)
        self._sender.join(timeout=30)
        if self._store is not None:
            self._store.close()
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.stdin.close()  # type: ignore[union-attr]
            try:
                self._writer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._writer.kill()
                self._writer.wait()


class RecordEverything(Sampler):
    """``sampler``'s decision, except that a span it drops is still recorded (not
    sampled): Kiln's store keeps every span, and the exporters, which take only
    sampled spans, see what the standard sampling settings choose. The sampled flag
    of the ``traceparent`` an endpoint answers with says which it was."""

    def __init__(self, sampler: Sampler) -> None:
        self._sampler = sampler

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str,
                      kind: SpanKind | None = None, attributes: Any = None, links: Any = None,
                      trace_state: Any = None) -> SamplingResult:  # fmt: skip
        result = self._sampler.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )
        if result.decision is Decision.DROP:
            return SamplingResult(Decision.RECORD_ONLY, attributes, result.trace_state)
        return result

    def get_description(self) -> str:
        return f"RecordEverything{{{self._sampler.get_description()}}}"


def tracer_provider(
    service: str,
    *,
    store_url: str | None,
    exporters: Sequence[SpanExporter] = (),
    environ: Mapping[str, str] | None = None,
) -> TracerProvider:
    """A provider exporting to the store (if ``store_url``), to each of ``exporters``,
    and over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or its traces variant) is set.

    Every span is recorded and stored, whatever ``OTEL_TRACES_SAMPLER`` and
    ``OTEL_SDK_DISABLED`` say: every answer must stay explainable by ``kiln why``.
    They decide what is exported: the sampler decides which spans are sampled (and
    so exported, see :class:`RecordEverything`), and a disabled SDK exports nothing.
    The resource is OpenTelemetry's own (``Resource.create``: ``telemetry.sdk.*``,
    ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``), with ``service`` as the
    service name unless those set one.
    """
    env = os.environ if environ is None else environ
    export_sampler = TracerProvider(shutdown_on_exit=False).sampler  # OTEL_TRACES_SAMPLER
    provider = TracerProvider(
        sampler=RecordEverything(export_sampler), resource=_resource(service, env)
    )
    provider._disabled = False  # OTEL_SDK_DISABLED stops the export only
    targets = list(exporters)
    if store_url:
        provider.add_span_processor(StoreSpanProcessor(store_url))
    disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    if not disabled and (
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        from kiln._optional import require

        require("opentelemetry.exporter.otlp.proto.http", extra="serve")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        targets.append(OTLPSpanExporter())
    for exporter in [] if disabled else targets:
        batch = BatchSpanProcessor(
            exporter, max_queue_size=65536, schedule_delay_millis=EXPORT_DELAY_MS
        )
        provider.add_span_processor(batch)
    return provider


def _resource(service: str, env: Mapping[str, str]) -> Resource:
    named = env.get("OTEL_SERVICE_NAME") or any(
        pair.split("=", 1)[0].strip() == "service.name"
        for pair in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    )
    return Resource.create({} if named else {"service.name": service})
