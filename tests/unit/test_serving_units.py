"""Serving's pure parts: autoscaling, traffic split, declarations, prices, spans."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, ClassVar

import pytest
from openinference.semconv.trace import EmbeddingAttributes as E
from openinference.semconv.trace import MessageAttributes as M
from openinference.semconv.trace import OpenInferenceSpanKindValues, ToolAttributes
from openinference.semconv.trace import SpanAttributes as S
from openinference.semconv.trace import ToolCallAttributes as T
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel

import kiln
from kiln.errors import ConfigError, ValidationError
from kiln.observe.cost import Prices, Usage
from kiln.observe.tracing import (
    MAX_VALUE_CHARS,
    identity_attributes,
    io_attributes,
    span_row,
    tracer_provider,
)
from kiln.record.store.rows import SpanRow
from kiln.serve._replica import FAILED, INVALID, OK, Handler, batch_answers
from kiln.serve.autoscale import Autoscaler
from kiln.serve.server import _trace_context
from kiln.serve.state import combine
from kiln.serve.traffic import Split

app = kiln.App("units")


class Model:
    def load(self, model_path: str) -> None:
        self.path = model_path

    def predict(self, features: list[float], scale: float = 1.0) -> dict[str, Any]:
        if scale < 0:
            raise ValueError("scale must be >= 0")
        return {"score": sum(features) * scale}


class Chat:
    def predict(self, messages: list[dict[str, str]], temperature: float = 0.0) -> dict[str, Any]:
        return {
            "choices": [{"message": {"role": "assistant", "content": "hi there"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        }


# -- autoscaling ------------------------------------------------------------------------


def test_autoscaler_scales_up_at_once_and_down_after_the_idle_window() -> None:
    scaler = Autoscaler(min_replicas=0, max_replicas=4, target_concurrency=8, idle_timeout=10)
    assert scaler.desired(current=0, peak_inflight=1, now=0.0) == 1  # a request wakes it
    assert scaler.desired(current=1, peak_inflight=30, now=1.0) == 4  # ceil(30/8), in one step
    assert scaler.desired(current=4, peak_inflight=100, now=2.0) == 4  # capped at max
    assert scaler.desired(current=4, peak_inflight=3, now=5.0) == 4  # a lull is not idleness
    assert scaler.desired(current=4, peak_inflight=3, now=12.5) == 1  # 10s since it needed 4
    assert scaler.desired(current=1, peak_inflight=0, now=20.0) == 1  # still inside the window
    assert scaler.desired(current=1, peak_inflight=0, now=23.0) == 0  # idle a whole window


def test_autoscaler_keeps_min_replicas_and_waits_a_window_after_start() -> None:
    scaler = Autoscaler(min_replicas=2, max_replicas=3, target_concurrency=1, idle_timeout=5,
                        since=100.0)  # fmt: skip
    assert scaler.desired(current=2, peak_inflight=0, now=101.0) == 2
    started = Autoscaler(min_replicas=0, max_replicas=3, target_concurrency=1, idle_timeout=5,
                         since=100.0)  # fmt: skip
    assert started.desired(current=1, peak_inflight=0, now=101.0) == 1  # just started: keep
    assert started.desired(current=1, peak_inflight=0, now=106.0) == 0


# -- traffic ----------------------------------------------------------------------------


def test_split_is_exact_over_every_window_and_interleaved() -> None:
    split = Split({7: 90, 8: 10})
    picks = [split.pick() for _ in range(2000)]
    assert Counter(picks) == {7: 1800, 8: 200}
    for start in range(0, 2000, 100):
        assert Counter(picks[start : start + 100])[8] == 10  # no bursts to the canary
    assert Split({1: 1, 2: 0}).percentages() == {1: 100.0}
    with pytest.raises(ValueError):
        Split({1: 0})


@pytest.mark.parametrize(
    ("traffic", "message"),
    [
        ({"fraud:1": 50, "other:2": 50}, "not a version of the endpoint's model 'fraud'"),
        ({"fraud@production": 100}, "does not pin a version"),
        ({"fraud:1": -1}, "weight -1 of 'fraud:1' is not a weight"),
        ({"fraud:1": 0}, "every weight is 0"),
        ({}, "is not a split"),
    ],
)
def test_bad_traffic_is_refused_at_declaration(traffic: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match="traffic") as info:
        app.endpoint(model="fraud@production", traffic=traffic)
    assert message in str(info.value)


# -- declarations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"model": "fraud"}, "ref"),
        ({"model": "fraud@Prod"}, "alias"),
        ({"model": "fraud:1", "min_replicas": -1}, "min_replicas"),
        ({"model": "fraud:1", "min_replicas": 3, "max_replicas": 2}, "max_replicas"),
        ({"model": "fraud:1", "target_concurrency": 0}, "target_concurrency"),
        ({"model": "fraud:1", "idle_timeout": 0}, "idle_timeout"),
        ({"model": "fraud:1", "kind": "magic"}, "kind"),
        ({"model": "fraud:1", "gpu": 1.5}, "gpu"),
        ({"model": "fraud:1", "env": "scikit-learn"}, "env"),
        ({"model": "fraud:1", "span_attributes": ["llm.system"]}, "span_attributes"),
        ({"model": "fraud:1", "span_attributes": {"kiln.run.id": "x"}}, "span_attributes"),
        ({"model": "fraud:1", "span_attributes": {"http.route": "/x"}}, "span_attributes"),
        ({"model": "fraud:1", "span_attributes": {"llm.system": ["a"]}}, "span_attributes"),
    ],
)
def test_bad_endpoint_arguments_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        app.endpoint(**kwargs)
    assert info.value.field == field


def test_a_class_that_cannot_serve_is_refused() -> None:
    declare = app.endpoint(model="fraud:1")
    with pytest.raises(ValidationError, match="has no predict method"):
        declare(type("NoPredict", (), {}))
    with pytest.raises(ValidationError, match="a request names each argument"):
        declare(type("Star", (), {"predict": lambda self, *rows: rows}))
    with pytest.raises(ValidationError, match="is not a class"):
        declare(lambda x: x)  # type: ignore[arg-type]


def test_endpoint_keeps_the_class_usable_and_names_itself() -> None:
    endpoint = app.endpoint(model="fraud@production", max_replicas=3)(Model)
    assert endpoint.name == "model" and endpoint.spec.model_name == "fraud"
    instance = endpoint()
    assert isinstance(instance, Model) and instance.predict([1, 2]) == {"score": 3}
    assert endpoint.source.module == __name__ and endpoint.source.qualname == "Model"


# -- the request handler and its spans -----------------------------------------------------


def _handler(cls: type[Any], kind: str = "chain") -> tuple[Handler, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = tracer_provider("kiln.test", store_url=None)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    attrs = identity_attributes(endpoint="fraud", model_name="fraud", model_version=3,
                                run_id="r" * 32, kind=kind)  # fmt: skip
    handler = Handler(cls(), tracer=provider.get_tracer("t"), span_attributes=attrs,
                      kind=kind, model_ref="fraud:3")  # fmt: skip
    return handler, exporter


def test_a_request_is_validated_answered_and_traced_with_its_lineage() -> None:
    handler, exporter = _handler(Model)
    status, answer, traced = handler.predict(b'{"features": [1, 2.5]}')
    assert status == OK and json.loads(answer) == {"score": 3.5}
    (span,) = exporter.get_finished_spans()
    assert span.context is not None
    injected: dict[str, str] = {}  # what OpenTelemetry's own propagator sends for it
    context = trace.set_span_in_context(trace.NonRecordingSpan(span.context))
    TraceContextTextMapPropagator().inject(injected, context)
    assert traced.decode() == injected["traceparent"]
    assert span.kind is SpanKind.SERVER and span.name == "POST /predict"
    attrs = dict(span.attributes or {})
    assert attrs["openinference.span.kind"] == "CHAIN"
    assert attrs["input.value"] == '{"features": [1, 2.5]}'
    assert attrs["input.mime_type"] == attrs["output.mime_type"] == "application/json"
    assert json.loads(str(attrs["output.value"])) == {"score": 3.5}
    assert attrs["kiln.model.name"] == "fraud" and attrs["kiln.model.version"] == 3
    assert attrs["kiln.run.id"] == "r" * 32 and attrs["kiln.endpoint"] == "fraud"
    assert attrs["http.response.status_code"] == 200
    row = span_row(span)
    assert row.trace_id == traced[3:35].decode() and row.model_version == 3
    assert row.status == "ok" and row.run_id == "r" * 32
    assert SpanRow.model_validate(row.model_dump()) == row  # what a server would accept


def test_an_answer_links_to_the_span_of_the_run_that_trained_its_model() -> None:
    exporter = InMemorySpanExporter()
    provider = tracer_provider("kiln.test", store_url=None)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trained = ("ab" * 16, "cd" * 8)
    handler = Handler(
        Model(),
        tracer=provider.get_tracer("t"),
        model_ref="fraud:3",
        span_attributes={"kiln.run.trace_id": trained[0]},
        run_trace=trained,
    )
    handler.predict(b'{"features": [1, 2]}')
    (span,) = exporter.get_finished_spans()
    (link,) = span.links
    assert (f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}") == trained
    assert (span.attributes or {})["kiln.run.trace_id"] == trained[0]
    assert span.context is not None and span.context.trace_id != int(trained[0], 16)


def test_a_caller_trace_context_becomes_the_parent_with_its_state_and_flag() -> None:
    handler, exporter = _handler(Model)
    headers = [
        (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        (b"tracestate", b"rojo=00f067aa0ba902b7"),
        (b"tracestate", b"congo=t61rcWkgMzE"),
    ]
    _, _, traced = handler.predict(b'{"features": [1]}', context=_context(headers))
    (span,) = exporter.get_finished_spans()
    assert span.context is not None and span.parent is not None
    assert f"{span.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert f"{span.parent.span_id:016x}" == "00f067aa0ba902b7" and span.parent.is_remote
    assert span.context.trace_state.to_header() == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert traced.startswith(b"00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert int(traced[-2:], 16) & 1  # sampled
    # A caller that did not sample: Kiln records the span, the default sampler
    # (parent-based) leaves it out of the export, and the answer says so.
    unsampled = [(b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")]
    _, _, traced = handler.predict(b'{"features": [1]}', context=_context(unsampled))
    assert not int(traced[-2:], 16) & 1 and len(exporter.get_finished_spans()) == 1
    # Garbage is a new trace, never a parent.
    _, _, traced = handler.predict(b'{"features": [1]}', context=_context([(b"traceparent", b"x")]))
    assert not traced.startswith(b"00-4bf92f3577b34da6a3ce929d0e0e4736")
    assert exporter.get_finished_spans()[-1].parent is None


def _context(headers: list[tuple[bytes, bytes]]) -> str:
    return _trace_context(headers).decode("latin-1")


def test_only_a_server_error_marks_a_span_error_and_each_says_its_http_status() -> None:
    handler, exporter = _handler(Model)
    status, answer, _ = handler.predict(b'{"features": [1, "x"]}')
    assert status == INVALID
    body = json.loads(answer)
    assert body["error"].startswith("features.1: ")
    assert body["detail"][0]["loc"] == ["body", "features", 1]
    status, answer, _ = handler.predict(b'{"features": [1], "extra": 2}')
    assert status == INVALID and json.loads(answer)["error"].startswith("extra: ")
    status, answer, _ = handler.predict(b"not json")
    assert status == INVALID
    status, answer, _ = handler.predict(b'{"features": [1, NaN, 1e999]}')
    assert status == INVALID and "finite number" in json.loads(answer)["error"]
    status, answer, _ = handler.predict(b'{"features": [1], "scale": -1}')
    assert status == FAILED  # what predict raised, by type only: its message may hold anything
    assert json.loads(answer)["error"].startswith("predict raised ValueError")
    spans = exporter.get_finished_spans()
    # per the HTTP conventions, a 4xx leaves a server span's status unset
    assert [s.status.status_code for s in spans] == [StatusCode.UNSET] * 4 + [StatusCode.ERROR]
    codes = [dict(s.attributes or {})["http.response.status_code"] for s in spans]
    assert codes == [422, 422, 422, 422, 500]
    assert dict(spans[-1].attributes or {})["error.type"] == "500"
    assert any(e.name == "exception" for e in spans[-1].events)
    assert [span_row(s).status for s in spans] == ["invalid"] * 4 + ["error"]
    mimes = [dict(s.attributes or {})["input.mime_type"] for s in spans]
    assert mimes == ["application/json"] * 2 + ["text/plain"] * 2 + ["application/json"]


class NotFinite:
    def predict(self, x: float) -> dict[str, Any]:
        return {"y": [1.0, x * float("inf")], "note": "NaN and Infinity as text are fine"}


def test_an_answer_with_nan_or_infinity_is_a_server_error_naming_where() -> None:
    handler, _ = _handler(NotFinite)
    status, answer, _ = handler.predict(b'{"x": 0}')  # 0 * inf is NaN
    assert status == FAILED
    error = json.loads(answer)["error"]  # the answer itself is valid JSON
    assert "answer.y[1] is nan" in error and "JSON cannot carry" in error
    status, answer, _ = handler.predict(b'{"x": 2}')
    assert status == FAILED and "answer.y[1] is inf" in json.loads(answer)["error"]
    status, answer, _ = handler.predict(b'{"x": -1}')
    assert status == FAILED and "answer.y[1] is -inf" in json.loads(answer)["error"]


class Answer(BaseModel):
    y: float
    label: str


class Typed:
    def predict(self, mode: str) -> Answer:
        if mode == "nan":
            return Answer(y=float("nan"), label="x")  # pydantic would write it as null
        if mode == "dict":
            return {"y": 1.0}  # type: ignore[return-value]  # not what it says it returns
        return Answer(y=1.0, label=mode)


def test_an_answer_is_checked_against_predicts_return_annotation() -> None:
    handler, _ = _handler(Typed)
    assert handler.predict(b'{"mode": "ok"}')[:2] == (OK, b'{"y":1.0,"label":"ok"}')
    status, answer, _ = handler.predict(b'{"mode": "nan"}')
    assert status == FAILED and "answer.y is nan" in json.loads(answer)["error"]
    status, answer, _ = handler.predict(b'{"mode": "dict"}')
    error = json.loads(answer)["error"]
    assert status == FAILED and error.startswith("answer.label: Field required"), error
    assert "return annotation is Answer" in error


def test_a_body_nested_deeper_than_python_goes_is_a_422_not_a_dead_replica() -> None:
    handler, exporter = _handler(Model)
    deep = b'{"features": [1], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, answer, _ = handler.predict(deep)
    assert status == INVALID and "recursion" in json.loads(answer)["error"]
    (span,) = exporter.get_finished_spans()
    assert dict(span.attributes or {})["input.mime_type"] == "text/plain"


def test_a_value_cut_for_length_is_plain_text_not_json() -> None:
    big = '{"k": "' + "x" * (MAX_VALUE_CHARS + 10) + '"}'
    attrs = io_attributes(big, "[1]")
    assert attrs["input.mime_type"] == "text/plain" and "more characters" in attrs["input.value"]
    assert attrs["output.mime_type"] == "application/json"


def test_llm_endpoints_carry_openinference_llm_attributes() -> None:
    handler, exporter = _handler(Chat, kind="llm")
    body = b'{"messages": [{"role": "user", "content": "hello"}], "temperature": 0.2}'
    status, _, _ = handler.predict(body)
    assert status == OK
    attrs = dict(exporter.get_finished_spans()[0].attributes or {})
    assert attrs["openinference.span.kind"] == "LLM"
    assert attrs["llm.model_name"] == "fraud:3"
    assert json.loads(str(attrs["llm.invocation_parameters"])) == {"temperature": 0.2}
    assert attrs["llm.input_messages.0.message.role"] == "user"
    assert attrs["llm.input_messages.0.message.content"] == "hello"
    assert attrs["llm.output_messages.0.message.content"] == "hi there"
    assert attrs["llm.token_count.prompt"] == 5 and attrs["llm.token_count.total"] == 7


def test_every_openinference_span_kind_is_accepted_from_the_conventions_package() -> None:
    kinds = [k.value for k in OpenInferenceSpanKindValues]
    assert {"GUARDRAIL", "EVALUATOR", "PROMPT", "DECISION"} <= set(kinds)
    for kind in kinds:
        endpoint = app.endpoint(model="fraud:1", kind=kind.lower())(Model)
        assert endpoint.spec.kind == kind.lower()


class ToolUser:
    def predict(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> Any:
        call = {"id": "call_1", "type": "function",
                "function": {"name": "lookup", "arguments": '{"city": "Oslo"}'}}  # fmt: skip
        return {"choices": [{"message": {"role": "assistant", "content": None,
                                         "tool_calls": [call]},
                             "finish_reason": "tool_calls"}]}  # fmt: skip


def test_llm_tool_calls_tools_and_the_provider_are_flattened_per_openinference() -> None:
    handler, exporter = _handler(ToolUser, kind="llm")
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [
            {"id": "call_0", "function": {"name": "lookup", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
    ]  # fmt: skip
    body = json.dumps({"messages": history, "tools": [tool]}).encode()
    assert handler.predict(body)[0] == OK
    attrs = dict(exporter.get_finished_spans()[0].attributes or {})
    out = f"{S.LLM_OUTPUT_MESSAGES}.0.{M.MESSAGE_TOOL_CALLS}.0."
    assert attrs[out + T.TOOL_CALL_FUNCTION_NAME] == "lookup"
    assert attrs[out + T.TOOL_CALL_FUNCTION_ARGUMENTS_JSON] == '{"city": "Oslo"}'
    assert attrs[out + T.TOOL_CALL_ID] == "call_1"
    past = f"{S.LLM_INPUT_MESSAGES}.1.{M.MESSAGE_TOOL_CALLS}.0."
    assert json.loads(str(attrs[past + T.TOOL_CALL_FUNCTION_ARGUMENTS_JSON])) == {"city": "Rome"}
    assert attrs[f"{S.LLM_INPUT_MESSAGES}.2.{M.MESSAGE_TOOL_CALL_ID}"] == "call_0"
    assert json.loads(str(attrs[f"{S.LLM_TOOLS}.0.{ToolAttributes.TOOL_JSON_SCHEMA}"])) == tool
    assert S.LLM_INVOCATION_PARAMETERS not in attrs  # the tools are not a parameter
    assert attrs[S.LLM_PROVIDER] == "kiln" and attrs[S.LLM_SYSTEM] == "kiln"


class Embedder:
    def predict(self, input: list[str]) -> dict[str, Any]:
        return {"data": [{"embedding": [float(len(t)), 0.5]} for t in input]}


def test_embedding_endpoints_carry_openinference_embedding_attributes() -> None:
    handler, exporter = _handler(Embedder, kind="embedding")
    assert handler.predict(b'{"input": ["hi", "there"]}')[0] == OK
    attrs = dict(exporter.get_finished_spans()[0].attributes or {})
    assert attrs[S.OPENINFERENCE_SPAN_KIND] == "EMBEDDING"
    assert attrs[S.EMBEDDING_MODEL_NAME] == "fraud:3"
    first, second = f"{S.EMBEDDING_EMBEDDINGS}.0.", f"{S.EMBEDDING_EMBEDDINGS}.1."
    assert attrs[first + E.EMBEDDING_TEXT] == "hi" and attrs[second + E.EMBEDDING_TEXT] == "there"
    assert list(attrs[second + E.EMBEDDING_VECTOR]) == [5.0, 0.5]  # type: ignore[arg-type]


def test_a_batch_answers_every_row_in_order_and_isolates_failures() -> None:
    handler, exporter = _handler(Model)
    rows = b'{"features": [1]}\n{"features": "bad"}\n{"features": [2], "scale": 2}\n'
    status, answer = handler.batch(rows, attributes={"kiln.batch.shard": 4})
    lines = [json.loads(x) for x in answer.splitlines()]
    assert status == OK and lines[0] == {"score": 1} and lines[2] == {"score": 4}
    assert lines[1]["error"].startswith("features: ")
    attrs = dict(exporter.get_finished_spans()[0].attributes or {})
    assert attrs["kiln.batch.rows"] == 3 and attrs["kiln.batch.rows_failed"] == 1
    assert attrs["kiln.batch.shard"] == 4


class Vectorized(Model):
    """Answers a whole shard in one call, and says how many rows that call had."""

    calls: ClassVar[list[int]] = []

    def predict_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.calls.append(len(rows))
        if any(r["scale"] < 0 for r in rows):
            raise ValueError("scale must be >= 0")
        return [{"score": sum(r["features"]) * r["scale"], "of": len(rows)} for r in rows]


class Short(Model):
    def predict_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"score": 0}] * (len(rows) - 1)


def test_predict_batch_answers_the_valid_rows_of_a_shard_in_one_call() -> None:
    handler, exporter = _handler(Vectorized)
    Vectorized.calls.clear()
    rows = b'{"features": [1]}\n{"features": "bad"}\n{"features": [2], "scale": 2}\n'
    status, answer = handler.batch(rows)
    lines = [json.loads(x) for x in answer.splitlines()]
    assert status == OK and Vectorized.calls == [2]  # validated first, defaults filled in
    assert lines[0] == {"score": 1, "of": 2} and lines[2] == {"score": 4, "of": 2}
    assert lines[1]["error"].startswith("features: ")
    attrs = dict(exporter.get_finished_spans()[0].attributes or {})
    assert attrs["kiln.batch.rows"] == 3 and attrs["kiln.batch.rows_failed"] == 1
    # it raised: every row it was given says why, the invalid one keeps its own error
    status, answer = handler.batch(b'{"features": [1], "scale": -1}\n{"features": 1}\n')
    lines = [json.loads(x) for x in answer.splitlines()]
    assert status == OK and lines[0]["error"] == "ValueError: scale must be >= 0"
    assert lines[1]["error"].startswith("features: ")


def test_predict_batch_with_a_wrong_number_of_answers_is_a_clear_error() -> None:
    handler, exporter = _handler(Short)
    status, answer = handler.batch(b'{"features": [1]}\n{"features": [2]}\n')
    assert status == FAILED
    error = json.loads(answer)["error"]
    assert error == ("Short.predict_batch returned 1 answers for 2 rows; it must return one "
                     "answer per row, in order")  # fmt: skip
    assert exporter.get_finished_spans()[0].status.status_code == StatusCode.ERROR
    with pytest.raises(ValidationError, match=r"predict_batch: Short.predict_batch returned 1"):
        batch_answers(status, answer)


def test_a_predict_batch_that_cannot_take_rows_is_refused_at_declaration() -> None:
    class NoRows(Model):
        def predict_batch(self) -> list[Any]:
            return []

    with pytest.raises(ValidationError, match=r"NoRows.predict_batch must take \(self, rows\)"):
        app.endpoint(model="fraud@production")(NoRows)


def test_the_figures_of_several_servers_add_up() -> None:
    a = {"requests": 30, "errors": 1, "inflight": 2, "replicas": 1,
         "latency_ms": {"p50": 1.0, "p99": 9.0}, "per_request": {"cpu_seconds": 0.01},
         "versions": {"1": {"weight": 90, "replicas": 1, "requests": 27, "errors": 1,
                            "usage": {"cpu_seconds": 0.01}, "cold_starts_s": [0.5]},
                      "2": {"weight": 10, "replicas": 0, "requests": 3, "errors": 0,
                            "usage": {"cpu_seconds": 0.01}, "cold_starts_s": []}}}  # fmt: skip
    b = {"requests": 10, "errors": 0, "inflight": 0, "replicas": 2,
         "latency_ms": {"p50": 2.0, "p99": 4.0}, "per_request": {"cpu_seconds": 0.03},
         "versions": {"2": {"weight": 10, "replicas": 2, "requests": 10, "errors": 0,
                            "usage": {"cpu_seconds": 0.03}, "cold_starts_s": [0.7]}}}  # fmt: skip
    both = combine([a, b])
    assert (both["requests"], both["errors"], both["inflight"], both["replicas"]) == (40, 1, 2, 3)
    assert both["latency_ms"] == {"p50": 2.0, "p99": 9.0}  # the worst server's
    assert both["per_request"]["cpu_seconds"] == pytest.approx((30 * 0.01 + 10 * 0.03) / 40)
    canary = both["versions"]["2"]
    assert canary["requests"] == 13 and canary["replicas"] == 2
    assert canary["usage"]["cpu_seconds"] == pytest.approx((3 * 0.01 + 10 * 0.03) / 13)
    assert combine([a]) == a and combine([]) == {}


# -- prices -----------------------------------------------------------------------------


def test_prices_from_inline_json_or_a_file(tmp_path: Any) -> None:
    prices = Prices.from_env({"KILN_PRICES": '{"cpu_hour": 3.6, "gpu_hour": {"H100": 36}}'})
    assert prices is not None
    usage = Usage(requests=1000, cpu_seconds=10.0, gpu_seconds=1.0)
    # 10 CPU-s at $3.6/h = $0.01, 1 GPU-s at $36/h = $0.01: $0.02 per 1,000 requests
    assert prices.per_1k_requests(usage, "H100") == pytest.approx(0.02)
    assert prices.per_1k_requests(usage, "other") == pytest.approx(0.01)  # no default price
    path = tmp_path / "prices.toml"
    path.write_text("cpu_hour = 0.5\nmemory_gb_hour = 0.1\ngpu_hour = 2.0\n")
    from_file = Prices.from_env({"KILN_PRICES": str(path)})
    assert from_file == Prices(0.5, 0.1, {"default": 2.0})
    assert Prices.from_env({}) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"cpu_hour": -1}', "cpu_hour is -1"),
        ('{"cpu": 1}', "unknown ['cpu']"),
        ("{nope", "not valid JSON"),
        ("/no/such/prices.json", "cannot be read"),
    ],
)
def test_bad_prices_are_a_config_error(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match="KILN_PRICES") as info:
        Prices.from_env({"KILN_PRICES": value})
    assert message in str(info.value)


def test_why_prints_inputs_and_reasons_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.cli.serve import print_why

    print_why({
        "trace_id": "ab" * 16, "endpoint": "fraud", "at_ns": 0, "latency_ms": 1.0,
        "status": "OK", "input": '{"pkg": "kiln[parquet]"}', "output": '{"label": "[bold]x"}',
        "model": {"ref": "fraud:1", "artifact": "model.pkl", "artifact_sha256": "0" * 64,
                  "registered_by": "alice", "registered_at": 0.0},
        "routed_by": "fraud@production",
        "promotions": [{"alias": "production", "from_version": None, "by": "bob", "at": 0.0,
                        "action": "promote", "reason": "beats [v1]", "policy": None}],
        "run": {"id": "r" * 32, "app": "fraud", "function": "m:f", "status": "succeeded",
                "actor": "alice", "created": 0.0, "params": {"opt": "[adam]"}, "metrics": {},
                "code": {}, "inputs": [], "environment": {"python": "3.11"}},
    })  # fmt: skip
    shown = capsys.readouterr().out
    for text in ('"kiln[parquet]"', '"[bold]x"', "beats [v1]", "opt=[adam]"):
        assert text in shown


@pytest.mark.parametrize(
    "header",
    [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff is invalid
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper-case hex
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",  # flags not hex
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",  # a later version
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # 00 has four fields
    ],
)
def test_traceparent_is_read_as_opentelemetrys_propagator_reads_it(header: str) -> None:
    handler, exporter = _handler(Model)
    handler.predict(b'{"features": [1]}', context=_context([(b"traceparent", header.encode())]))
    (span,) = exporter.get_finished_spans()
    found = trace.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": header}))
    expected = found.get_span_context()
    if expected.is_valid:
        assert span.parent is not None and span.context is not None
        assert (span.parent.trace_id, span.parent.span_id) == (expected.trace_id, expected.span_id)
        assert span.context.trace_id == expected.trace_id
        assert span.context.trace_flags.sampled == expected.trace_flags.sampled
    else:
        assert span.parent is None  # a new trace, never a zero or invalid parent
