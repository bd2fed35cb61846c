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
from typing import Any

from openinference.semconv.trace import (
    MessageAttributes,
    OpenInferenceMimeTypeValues,
    OpenInferenceSpanKindValues,
    SpanAttributes,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, Sampler
from opentelemetry.trace import StatusCode

MODEL_NAME = "kiln.model.name"
MODEL_VERSION = "kiln.model.version"
RUN_ID = "kiln.run.id"
ENDPOINT = "kiln.endpoint"
ROUTED_BY = "kiln.endpoint.model"  # the reference the endpoint serves (its alias)
BATCH_RUN_ID = "kiln.batch.run_id"
CPU_SECONDS = "kiln.cpu_seconds"

SPAN_KINDS = tuple(k.value.lower() for k in OpenInferenceSpanKindValues)
JSON_MIME = OpenInferenceMimeTypeValues.JSON.value
MAX_VALUE_CHARS = 64 * 1024  # longer inputs and outputs are cut, and say so
# How often the batch processor exports: short, so `kiln why` finds a span at once.
EXPORT_DELAY_MS = 500
FLUSH_SPANS = 256  # spans pickled together, on the thread that ended the last of them

_log = logging.getLogger("kiln")


def identity_attributes(
    *, endpoint: str, model_name: str, model_version: int, run_id: str, kind: str
) -> dict[str, Any]:
    """The attributes every span of one endpoint replica carries."""
    return {
        SpanAttributes.OPENINFERENCE_SPAN_KIND: kind.upper(),
        ENDPOINT: endpoint,
        MODEL_NAME: model_name,
        MODEL_VERSION: model_version,
        RUN_ID: run_id,
    }


def io_attributes(input_text: str, output_text: str | None) -> dict[str, Any]:
    """``input.value`` / ``output.value`` (JSON text) with their mime types."""
    attrs: dict[str, Any] = {
        SpanAttributes.INPUT_VALUE: _cut(input_text),
        SpanAttributes.INPUT_MIME_TYPE: JSON_MIME,
    }
    if output_text is not None:
        attrs[SpanAttributes.OUTPUT_VALUE] = _cut(output_text)
        attrs[SpanAttributes.OUTPUT_MIME_TYPE] = JSON_MIME
    return attrs


def llm_attributes(model: str, request: Mapping[str, Any], response: Any) -> dict[str, Any]:
    """OpenInference's ``llm.*`` attributes for a chat-style request and response.

    Understood shapes: ``messages`` (a list of ``{"role", "content"}``) or ``prompt`` in
    the request, the other request fields as invocation parameters; in the response,
    ``content`` or OpenAI-style ``choices[0].message``, and ``usage`` with
    ``prompt_tokens`` / ``completion_tokens`` / ``total_tokens``.
    """
    attrs: dict[str, Any] = {SpanAttributes.LLM_MODEL_NAME: model}
    params = {k: v for k, v in request.items() if k not in ("messages", "prompt")}
    if params:
        attrs[SpanAttributes.LLM_INVOCATION_PARAMETERS] = json.dumps(params, default=str)
    messages = request.get("messages")
    if isinstance(messages, list):
        attrs.update(_messages(SpanAttributes.LLM_INPUT_MESSAGES, messages))
    elif isinstance(request.get("prompt"), str):
        attrs.update(_messages(SpanAttributes.LLM_INPUT_MESSAGES, [
            {"role": "user", "content": request["prompt"]}]))  # fmt: skip
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
    if isinstance(response.get("content"), str):
        return {"role": response.get("role", "assistant"), "content": response["content"]}
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
        for key, attr in (
            ("role", MessageAttributes.MESSAGE_ROLE),
            ("content", MessageAttributes.MESSAGE_CONTENT),
        ):
            if isinstance(message.get(key), str):
                attrs[f"{prefix}.{i}.{attr}"] = message[key]
    return attrs


def _cut(text: str) -> str:
    if len(text) <= MAX_VALUE_CHARS:
        return text
    return text[:MAX_VALUE_CHARS] + f"... [{len(text) - MAX_VALUE_CHARS} more characters]"


class PresetIdGenerator(IdGenerator):
    """Random ids, except that the next root span may be given its trace id, so a
    span made in a replica joins the trace the front door announced."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self._local = threading.local()

    def preset_trace_id(self, trace_id: int) -> None:
        self._local.trace_id = trace_id

    def generate_span_id(self) -> int:
        return self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        preset = getattr(self._local, "trace_id", 0)
        if preset:
            self._local.trace_id = 0
            return int(preset)
        return self._random.generate_trace_id()


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


def compact_row(c: Compact) -> dict[str, Any]:
    """A compact span as a row of the store's ``spans`` table."""
    trace_id, span_id, parent_id, name, start, end, error, attrs = c
    version = attrs.get(MODEL_VERSION)
    return {
        "trace_id": f"{trace_id:032x}",
        "span_id": f"{span_id:016x}",
        "parent_id": None if parent_id is None else f"{parent_id:016x}",
        "name": name,
        "endpoint": attrs.get(ENDPOINT),
        "model_name": attrs.get(MODEL_NAME),
        "model_version": int(version) if isinstance(version, int) else None,
        "run_id": attrs.get(RUN_ID),
        "start_ns": start,
        "duration_ns": max(0, end - start),
        "status": "error" if error else "ok",
        "attributes": {k: _plain(v) for k, v in attrs.items()},
    }


def span_row(span: ReadableSpan) -> dict[str, Any]:
    """A finished span as a row of the store's ``spans`` table."""
    return compact_row(compact(span))


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
        self._store: Any = None  # for the few spans of a quiet spell, before any writer
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
                from kiln.record.store.sql import SqlStore

                self._store = SqlStore(self._url, create=False)
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


class SampledExport(SpanProcessor):
    """Hands ``processor`` only the spans ``sampler`` keeps (decided by trace id, so a
    trace is exported whole or not at all). Kiln's own store sees every span: the
    standard sampling settings are about what leaves the process."""

    def __init__(self, processor: SpanProcessor, sampler: Sampler) -> None:
        self._processor, self._sampler = processor, sampler

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        """Nothing to do until the span ends."""

    def on_end(self, span: ReadableSpan) -> None:
        context = span.get_span_context()
        if context is None:
            return
        decision = self._sampler.should_sample(None, context.trace_id, span.name)
        if decision.decision is Decision.RECORD_AND_SAMPLE:
            self._processor.on_end(span)

    def shutdown(self) -> None:
        self._processor.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._processor.force_flush(timeout_millis)


def tracer_provider(
    service: str,
    *,
    store_url: str | None,
    exporters: Sequence[SpanExporter] = (),
    environ: Mapping[str, str] | None = None,
) -> tuple[TracerProvider, PresetIdGenerator]:
    """A provider exporting to the store (if ``store_url``), to each of ``exporters``,
    and over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or its traces variant) is set.

    Every span is recorded and stored, whatever ``OTEL_TRACES_SAMPLER`` and
    ``OTEL_SDK_DISABLED`` say: every answer must stay explainable by ``kiln why``.
    They decide what is exported: the sampler filters the exporters' spans, and a
    disabled SDK exports nothing. The resource is OpenTelemetry's own
    (``Resource.create``: ``telemetry.sdk.*``, ``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_SERVICE_NAME``), with ``service`` as the service name unless those set one.
    """
    env = os.environ if environ is None else environ
    ids = PresetIdGenerator()
    export_sampler = TracerProvider(shutdown_on_exit=False).sampler  # OTEL_TRACES_SAMPLER
    provider = TracerProvider(sampler=ALWAYS_ON, resource=_resource(service, env), id_generator=ids)
    provider._disabled = False
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
        provider.add_span_processor(SampledExport(batch, export_sampler))
    return provider, ids


def _resource(service: str, env: Mapping[str, str]) -> Resource:
    named = env.get("OTEL_SERVICE_NAME") or any(
        pair.split("=", 1)[0].strip() == "service.name"
        for pair in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    )
    return Resource.create({} if named else {"service.name": service})
