"""Runs as OpenTelemetry spans: every run, sweep and reproduction is a span, with the
run's id on the span (``kiln.run.id``) and the span's ids on the run (``trace_id``,
``span_id``).

A sweep's span is the parent of its runs' spans; a run started inside another run
(``app.run`` in ``app.run``, a function spawned from a run) is its child, also on
another process or machine: the engine hands the caller's context to the worker as
a W3C ``traceparent``. Spans are made when tracing is on: a tracer provider of
OpenTelemetry's SDK is set in the process (yours), or ``OTEL_EXPORTER_OTLP_ENDPOINT``
(or its traces variant) is set, and then Kiln makes one of its own exporting over
OTLP/HTTP (not set as the global provider: your own setup stays yours).
Inference spans name the training run's trace (``kiln.run.trace_id``) and link to
its span, so a trace backend can follow an answer back to the run that made it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from kiln.record.runs import ActiveRun

RUN_ID = "kiln.run.id"
_lock = threading.Lock()
_tracer: Tracer | None = None
_own: Any = None  # the provider Kiln made, if it made one
_checked = False


def tracer(environ: Mapping[str, str] | None = None) -> Tracer | None:
    """The tracer of run spans, or None while tracing is off (see the module)."""
    global _tracer, _checked
    with _lock:
        if _checked:
            return _tracer
        _checked = True
        _tracer = _make_tracer(os.environ if environ is None else environ)
        return _tracer


def _make_tracer(env: Mapping[str, str]) -> Tracer | None:
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:  # the SDK is in the serve extra
        return None
    global _own
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        if not (env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):  # fmt: skip
            return None
        from kiln.observe.tracing import tracer_provider

        provider = _own = tracer_provider("kiln", store_url=None, environ=env)
    return provider.get_tracer("kiln.runs")


def reset() -> None:
    """Look at the environment and providers again at the next span; the provider Kiln
    made is shut down in the background, what it holds unsent dropped (tests)."""
    global _tracer, _checked, _own
    with _lock:
        own, _tracer, _checked, _own = _own, None, False, None
    if own is not None:
        threading.Thread(target=own.shutdown, daemon=True).start()


def ids(span: Span) -> dict[str, str]:
    context = span.get_span_context()
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def traceparent() -> str | None:
    """The current span's context as a W3C ``traceparent``, if there is a span."""
    if tracer() is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent")


@contextlib.contextmanager
def remote_parent(value: str | None) -> Iterator[None]:
    """Make the context in ``value`` (a ``traceparent``) current, if any."""
    if value is None or tracer() is None:
        yield
        return
    from opentelemetry import context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    token = context.attach(TraceContextTextMapPropagator().extract({"traceparent": value}))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            context.detach(token)


def start(name: str, attributes: Mapping[str, Any]) -> Span | None:
    """A span, child of the current one; None while tracing is off."""
    found = tracer()
    if found is None:
        return None
    return found.start_span(name, attributes=dict(attributes))


def end(span: Span, *, ok: bool, error: str | None = None) -> None:
    from opentelemetry.trace import Status, StatusCode

    if not ok:
        span.set_status(Status(StatusCode.ERROR, (error or "failed").splitlines()[-1][:200]))
    span.end()


@contextlib.contextmanager
def current(span: Span | None) -> Iterator[None]:
    """``span`` as the current span inside the block (nothing if None)."""
    if span is None:
        yield
        return
    from opentelemetry import trace

    with trace.use_span(span, end_on_exit=False):
        yield


def watch(run: ActiveRun) -> Callable[[], dict[str, Any]] | None:
    """The watcher the SDK registers (:func:`kiln.record.runs.watch_runs`): the run's
    span, current while the run is; its ids are added to the run's usage at its end,
    from where the record moves them to the run's own fields."""
    span = start(f"run {run.app}", {RUN_ID: run.id, "kiln.app": run.app})
    if span is None:
        return None
    from opentelemetry import context, trace

    token = context.attach(trace.set_span_in_context(span))

    def stop() -> dict[str, Any]:
        with contextlib.suppress(ValueError):  # ended from another context (at exit)
            context.detach(token)
        failed = str(run.status) not in ("running", "succeeded")
        end(span, ok=not failed, error=str(run.status))
        return ids(span)

    return stop
