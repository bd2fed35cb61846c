"""A replica: one process that loads a model version and answers requests for it.

Started as ``python -m kiln.serve._replica READ_FD WRITE_FD`` by the front door (the
HTTP server, or a batch job). The INIT frame carries the setup as JSON; the
replica imports the endpoint's class, calls ``load(model_path)`` and answers
READY (or BROKEN with the traceback), listing the modules ``load`` imported.

A standby is a replica process started ahead of need with a PRELOAD frame: it
imports the class, the tracing stack and the modules an earlier ``load`` needed,
then waits, holding no model and no reserved resources. A cold start hands it
the INIT frame, so scaling from zero pays for ``load`` only, not for imports.

Once set up, a replica reads request frames in bulk, answers each, and writes the
replies back in one write per bulk. It exits when the front door closes the pipe,
after answering what it has already read.

Frames are a fixed header and a body, so the front door never parses JSON to
forward a request: validating the body against ``predict``'s annotations,
calling it, writing the answer and making the request's span all happen here, on
the replica's own core.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import struct
import sys
import time
import traceback
import typing
from collections.abc import Callable
from typing import Any

# Request: body length, kind, request id, when the front door received it (ns), length
# of the trace context that follows (the caller's W3C headers: traceparent, then
# tracestate after a newline; empty: a new trace), then the body.
REQUEST = struct.Struct("!IBQQH")
# Reply: body length, status, request id, CPU ns and wall ns spent on it, and the
# traceparent of its span (55 bytes; zeros: not traced).
REPLY = struct.Struct("!IBQQQ55s")
INIT, PREDICT, BATCH, PRELOAD = 0, 1, 2, 3
OK, INVALID, FAILED, READY, BROKEN = 0, 1, 2, 3, 4
HTTP_STATUS = {OK: 200, INVALID: 422, FAILED: 500}
NO_TRACE = b""
MAX_CONTEXT = 8192  # bytes of trace context forwarded; a longer tracestate is dropped
BatchPredict = Callable[[list[dict[str, Any]]], Any]
_log = logging.getLogger("kiln")


def request_frame(kind: int, request_id: int, body: bytes, *, received_ns: int = 0,
                  context: bytes = b"") -> bytes:  # fmt: skip
    if len(context) > MAX_CONTEXT:
        context = context.partition(b"\n")[0][:MAX_CONTEXT]
    return REQUEST.pack(len(body), kind, request_id, received_ns, len(context)) + context + body


class Handler:
    """Validates a request, calls ``predict``, encodes its answer, records its span.

    Built in the replica process; tests build one in-process to check its spans.
    """

    def __init__(
        self,
        instance: Any,
        *,
        tracer: Any = None,
        span_attributes: dict[str, Any] | None = None,
        http_attributes: dict[str, Any] | None = None,
        kind: str = "chain",
        model_ref: str = "",
        route: str = "/predict",
        run_trace: tuple[str, str] | list[str] | None = None,
    ) -> None:
        from pydantic import ValidationError as Invalid

        from kiln.serve._validation import answer_adapter, request_model

        self._predict: Callable[..., Any] = instance.predict
        self._predict_batch: BatchPredict | None = getattr(instance, "predict_batch", None)
        self._model = request_model(type(instance))  # type: ignore[arg-type]
        self._names = tuple(self._model.model_fields)
        self._invalid = Invalid
        self._answer, self._answer_name = answer_adapter(type(instance))  # type: ignore[arg-type]
        self._tracer = tracer
        self._static = dict(span_attributes or {})  # of every span
        self._request_static = {**self._static, **(http_attributes or {})}  # of requests'
        self._kind = kind
        self._model_ref = model_ref
        self._links: list[Any] | None = None
        if run_trace is not None:  # every answer links to the run that trained the model
            from opentelemetry.trace import Link, SpanContext, TraceFlags

            trained = SpanContext(int(run_trace[0], 16), int(run_trace[1], 16), is_remote=True,
                                  trace_flags=TraceFlags(TraceFlags.SAMPLED))  # fmt: skip
            self._links = [Link(trained, {"kiln.link": "trained_by"})]
        self._name = f"POST {route}"
        self._owner = type(instance).__qualname__
        if tracer is not None:  # what each span needs, looked up once
            from opentelemetry.trace import SpanKind, StatusCode

            from kiln.observe import tracing

            self._tracing = tracing
            self._kinds = {True: SpanKind.SERVER, False: SpanKind.INTERNAL}
            self._error = StatusCode.ERROR
            self._codes = {s: tracing.http_status_attributes(c) for s, c in HTTP_STATUS.items()}

    def predict(
        self, body: bytes, received_ns: int = 0, context: str = ""
    ) -> tuple[int, bytes, bytes]:
        """(status, answer, traceparent of its span: empty if untraced) for one request
        body; ``context`` is the caller's trace context (see :data:`REQUEST`)."""
        span = self._start(self._name, received_ns, context) if self._tracer else None
        status, request, result, error = OK, None, None, None
        try:
            request = self._model.model_validate_json(body)
        except self._invalid as exc:
            status, answer = INVALID, invalid_answer(exc)
        else:
            try:
                result = self._predict(**{n: getattr(request, n) for n in self._names})
                answer = encode(result)
                if self._answer is not None:
                    self._check(answer)
            except Exception as exc:
                status, error = FAILED, exc
                answer = server_error(exc)
        if span is None:
            return status, answer, NO_TRACE
        try:
            self._finish(span, body, answer, status, error, request, result)
        except Exception as exc:  # a span must never cost the answer, or the replica
            _log.warning("kiln: a request's span was not completed: %r", exc)
            if span.is_recording():
                span.end()
        return status, answer, self._tracing.traceparent(span)

    def _check(self, answer: bytes) -> None:
        """Refuse an answer that does not match ``predict``'s return annotation, as
        published in the endpoint's OpenAPI document (naming the first bad field)."""
        try:
            self._answer.validate_json(answer)  # type: ignore[union-attr]
        except self._invalid as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
            raise AnswerMismatchError(
                f"answer{where}: {first['msg']} (predict's return annotation is "
                f"{self._answer_name})"
            ) from None

    def batch(self, body: bytes, received_ns: int = 0, attributes: dict[str, Any] | None = None
              ) -> tuple[int, bytes]:  # fmt: skip
        """Answer every line of a JSONL body; one JSONL line out per line in, in order.
        A row that fails is answered ``{"error": ...}`` and does not stop the others.

        With a ``predict_batch(rows)`` on the class, the valid rows go to it in one
        call (each row a dict of ``predict``'s arguments); if it raises, each of those
        rows is answered with the error. Answers that are not one per row are the
        class's bug, not the data's: the status is FAILED and nothing is answered.
        """
        span = self._start("batch", received_ns, "", server=False) if self._tracer else None
        rows = [line for line in body.split(b"\n") if line]
        try:
            if self._predict_batch is None:
                out = [self._answer_row(line) for line in rows]
            else:
                out = self._answer_together(self._predict_batch, rows)
        except BatchContractError as exc:
            if span is not None:
                span.set_status(self._error, str(exc))
                span.end()
            return FAILED, json.dumps({"error": str(exc)}).encode()
        failed = sum(1 for line in out if line.startswith(b'{"error":'))
        answer = b"\n".join(out) + b"\n"
        if span is not None:
            from kiln.observe.tracing import io_attributes

            span.set_attributes({**io_attributes(body.decode(errors="replace"),
                                                 answer.decode(errors="replace"),
                                                 input_json=False, output_json=False),
                                 **(attributes or {}), "kiln.batch.rows": len(out),
                                 "kiln.batch.rows_failed": failed})  # fmt: skip
            span.end()
        return OK, answer

    def _answer_row(self, line: bytes) -> bytes:
        from pydantic import ValidationError as Invalid

        try:
            request = self._model.model_validate_json(line)
            return encode(self._predict(**{n: getattr(request, n) for n in self._names}))
        except Invalid as exc:
            return invalid_answer(exc)
        except Exception as exc:
            return _error_answer(exc)

    def _answer_together(self, predict_batch: BatchPredict, rows: list[bytes]) -> list[bytes]:
        """Validate each row, answer the valid ones with one ``predict_batch`` call."""
        from pydantic import ValidationError as Invalid

        out: list[bytes | None] = []
        valid: list[dict[str, Any]] = []
        for line in rows:
            try:
                request = self._model.model_validate_json(line)
            except Invalid as exc:
                out.append(invalid_answer(exc))
                continue
            out.append(None)
            valid.append({n: getattr(request, n) for n in self._names})
        answers = self._call_batch(predict_batch, valid) if valid else []
        found = iter(answers)
        return [line if line is not None else next(found) for line in out]

    def _call_batch(self, predict_batch: BatchPredict, valid: list[dict[str, Any]]) -> list[bytes]:
        try:
            result = predict_batch(valid)
        except Exception as exc:  # which row made it fail is unknown: each says why
            return [_error_answer(exc)] * len(valid)
        where = f"{self._owner}.predict_batch"
        if isinstance(result, str | bytes | dict) or not hasattr(result, "__len__"):
            raise BatchContractError(
                f"{where} returned a {type(result).__name__}; it must return a list with "
                f"one answer per row, in order ({len(valid)} rows)"
            )
        if len(result) != len(valid):
            raise BatchContractError(
                f"{where} returned {len(result)} answers for {len(valid)} rows; it must "
                "return one answer per row, in order"
            )
        return [encode(answer) for answer in result]

    def _start(self, name: str, received_ns: int, context: str, server: bool = True) -> Any:
        return self._tracer.start_span(
            name, context=self._tracing.parent_context(context) if context else None,
            kind=self._kinds[server], start_time=received_ns or None,
            attributes=self._request_static if server else self._static, links=self._links,
        )  # fmt: skip

    def _finish(self, span: Any, body: bytes, answer: bytes, status: int, error: Any,
                request: Any, result: Any) -> None:  # fmt: skip
        """Its attributes and status: ERROR for a server error only (per the HTTP
        conventions a 4xx leaves a server span's status unset)."""
        tracing = self._tracing
        attrs = tracing.io_attributes(
            body.decode(errors="replace"), answer.decode(errors="replace"),
            input_json=status != INVALID or _is_json(body),
        )  # fmt: skip
        attrs.update(self._codes[status])
        if request is not None and error is None:
            if self._kind == "llm":
                attrs.update(tracing.llm_attributes(self._model_ref, request.model_dump(), result))
            elif self._kind == "embedding":
                attrs.update(
                    tracing.embedding_attributes(self._model_ref, request.model_dump(), result)
                )
        if status != OK:
            attrs["kiln.error"] = "invalid request" if status == INVALID else "predict raised"
        span.set_attributes(attrs)
        if error is not None:
            span.record_exception(error)
            span.set_status(self._error, f"{type(error).__name__}: {error}")
        span.end()


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body, parse_constant=_not_json)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python goes
        return False
    return True


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def server_error(exc: BaseException) -> bytes:
    """A 500's body: Kiln's own messages in full; of what ``predict`` raised, only the
    type (its message may hold anything: it is in the request's span, for ``kiln why``)."""
    if isinstance(exc, NotJSONError | AnswerMismatchError):
        return json.dumps({"error": str(exc)}).encode()
    return json.dumps({"error": f"predict raised {type(exc).__name__} (`kiln why` on "
                       "the trace shows its message)"}).encode()  # fmt: skip


class BatchContractError(Exception):
    """``predict_batch`` answered something other than one answer per row."""


def batch_answers(status: int, body: bytes) -> bytes:
    """The JSONL answers of a shard, or the error that stopped the replica answering it."""
    if status != OK:
        from kiln.errors import ValidationError

        raise ValidationError("predict_batch", json.loads(body)["error"])
    return body


def _error_answer(exc: BaseException) -> bytes:
    return json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()


def encode(value: Any) -> bytes:
    """JSON for an answer: what ``json`` takes, plus dataclasses, pydantic models and
    numpy values. NaN and infinity are not JSON: an answer holding one is refused,
    naming where it is (return None for a missing value)."""
    from pydantic_core import to_json

    out = to_json(value, fallback=_fallback)
    found = b"NaN" in out or b"Infinity" in out  # or only inside a string: looked at closely
    if found or (b"null" in out and hasattr(value, "model_dump")):  # pydantic writes NaN null
        where = _non_finite(value.model_dump() if hasattr(value, "model_dump") else
                            json.loads(out), "answer")  # fmt: skip
        if where is not None:
            raise NotJSONError(
                f"{where} is {where.value}, which JSON cannot carry; return None for a "
                "missing value, or a string"
            )
    return out


class _Where(str):
    value: float


def _non_finite(value: Any, at: str) -> _Where | None:
    """The path to the first NaN or infinity in a parsed answer, if any."""
    if isinstance(value, float) and not math.isfinite(value):
        where = _Where(at)
        where.value = value
        return where
    items: Any = ()
    if hasattr(value, "model_dump"):  # a model inside a model_dump() (from a field Any)
        value = value.model_dump()
    if isinstance(value, dict):
        items = ((f"{at}.{k}", v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{at}[{i}]", v) for i, v in enumerate(value))
    for path, item in items:
        found = _non_finite(item, path)
        if found is not None:
            return found
    return None


class NotJSONError(ValueError):
    """``predict`` answered a value JSON cannot carry."""


class AnswerMismatchError(ValueError):
    """``predict`` answered something its return annotation does not allow."""


def _fallback(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()  # numpy arrays and scalars
    raise TypeError(f"{type(value).__name__} is not JSON serializable; return JSON-like data")


def invalid_answer(exc: Any) -> bytes:
    """A 422 body in FastAPI's shape, plus one line naming the first bad field."""
    errors = [
        {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]
    first = errors[0] if errors else {"loc": ["body"], "msg": "invalid"}
    where = ".".join(str(p) for p in first["loc"][1:]) or "body"
    return json.dumps({"error": f"{where}: {first['msg']}", "detail": errors}).encode()


def load_class(module: str, qualname: str, sys_path: list[str]) -> type[Any]:
    for entry in reversed(sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    cls = getattr(obj, "cls", obj)  # the decorated Endpoint, or the class itself
    return typing.cast(type[Any], cls)


_warm: dict[str, Any] = {}  # what PRELOAD (or INIT) prepared: class, tracer provider


def _prepare(spec: dict[str, Any]) -> list[str]:
    """Import the class, the tracing stack and ``spec["preload"]``; the modules that
    could not be imported are returned (a stale list is harmless)."""
    _warm["cls"] = load_class(spec["module"], spec["qualname"], spec["sys_path"])
    if spec.get("tracing"):
        from kiln.observe.tracing import tracer_provider

        _warm["provider"] = tracer_provider(f"kiln.{spec['endpoint']}", store_url=spec["store_url"])
    import pydantic  # noqa: F401  the request model's, ahead of the first request

    missing = []
    for name in spec.get("preload", ()):
        try:
            importlib.import_module(name)
        except Exception:
            missing.append(name)
    return missing


def _setup(init: dict[str, Any]) -> tuple[Handler, list[str]]:
    """Load the model; returns the handler and the modules loading it imported."""
    if not _warm:
        _prepare(init)
    if init.get("cuda_visible_devices") is not None:  # before anything initializes CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = init["cuda_visible_devices"]
    before = set(sys.modules)
    instance = _warm["cls"]()
    if hasattr(instance, "load"):
        instance.load(init["model_path"])
    learned = [m for m in sys.modules if m not in before and not m.startswith("__")]
    tracer = None
    attrs: dict[str, Any] = {}
    http = init.get("http") or {}
    if init.get("tracing"):
        from kiln.observe import tracing

        tracer = _warm["provider"].get_tracer("kiln.serve")
        attrs = tracing.identity_attributes(
            endpoint=init["endpoint"], model_name=init["model_name"],
            model_version=init["model_version"], run_id=init["run_id"], kind=init["kind"],
        )  # fmt: skip
        if init.get("reference"):  # the alias that routed it, for `kiln why`
            attrs[tracing.ROUTED_BY] = init["reference"]
        if init.get("run_trace"):  # the training run's span: followed back from here
            attrs[tracing.RUN_TRACE_ID] = init["run_trace"][0]
        attrs.update(init.get("span_attributes") or {})
    served = tracing.server_span_attributes(http["url"], http["route"]) if tracer and http else {}
    handler = Handler(instance, tracer=tracer, span_attributes=attrs, http_attributes=served,
                      kind=init["kind"], model_ref=f"{init['model_name']}:{init['model_version']}",
                      route=http.get("route", "/predict"),
                      run_trace=init.get("run_trace") if tracer else None)  # fmt: skip
    return handler, learned


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _reply(status: int, request_id: int, body: bytes, cpu_ns: int = 0, wall_ns: int = 0,
           traced: bytes = NO_TRACE) -> bytes:  # fmt: skip
    return REPLY.pack(len(body), status, request_id, cpu_ns, wall_ns, traced) + body


def _frames(fd: int) -> typing.Iterator[list[tuple[int, int, int, str, bytes]]]:
    """Bulks of complete request frames, as they arrive; ends when the pipe closes."""
    buffer = bytearray()
    size = REQUEST.size
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return
        buffer += chunk
        bulk, offset = [], 0
        while len(buffer) - offset >= size:
            length, kind, rid, received, context = REQUEST.unpack_from(buffer, offset)
            start = offset + size + context
            end = start + length
            if end > len(buffer):
                break
            traced = buffer[offset + size : start].decode("latin-1")
            bulk.append((kind, rid, received, traced, bytes(buffer[start:end])))
            offset = end
        del buffer[:offset]
        if bulk:
            yield bulk


def _serve(rfd: int, wfd: int) -> None:
    handler: Handler | None = None
    thread_ns, wall_ns = time.thread_time_ns, time.perf_counter_ns
    for bulk in _frames(rfd):
        out = []
        for kind, rid, received, context, body in bulk:
            if kind in (INIT, PRELOAD):
                started = time.perf_counter()
                try:
                    if kind == PRELOAD:
                        ready: dict[str, Any] = {"missing": _prepare(json.loads(body))}
                    else:
                        handler, learned = _setup(json.loads(body))
                        ready = {"learned": learned}
                except BaseException:
                    out.append(_reply(BROKEN, rid, traceback.format_exc().encode()))
                    _write(wfd, b"".join(out))
                    return
                ready.update(pid=os.getpid(), load_s=time.perf_counter() - started)
                out.append(_reply(READY, rid, json.dumps(ready).encode()))
                continue
            if handler is None:
                raise RuntimeError("a request came before the replica's setup")
            cpu, wall = thread_ns(), wall_ns()
            if kind == PREDICT:
                status, answer, trace_out = handler.predict(body, received, context)
                out.append(
                    _reply(status, rid, answer, thread_ns() - cpu, wall_ns() - wall, trace_out)
                )
            else:
                header, _, rows = body.partition(b"\n")
                status, answer = handler.batch(rows, received, json.loads(header))
                out.append(_reply(status, rid, answer, thread_ns() - cpu, wall_ns() - wall))
        _write(wfd, b"".join(out))


def main() -> None:
    rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
    try:
        _serve(rfd, wfd)
    except BrokenPipeError:
        pass  # the front door went away first: nobody is left to answer
    finally:
        if "provider" in _warm:
            _warm["provider"].shutdown()  # exports the spans still queued


if __name__ == "__main__":
    main()
