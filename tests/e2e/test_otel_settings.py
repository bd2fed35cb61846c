"""The standard OpenTelemetry settings decide what is exported, never what Kiln
stores: every answer stays explainable whatever the sampler says."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kiln.observe.tracing import tracer_provider
from kiln.record.store.sql import SqlStore


def spans_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], count: int = 40
) -> tuple[int, list[int], InMemorySpanExporter]:
    """Stored spans, their trace ids, and the exporter, after ``count`` spans under ``env``."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    url = f"sqlite:///{tmp_path / 'kiln.db'}"
    SqlStore(url).close()
    exported = InMemorySpanExporter()
    provider = tracer_provider("svc", store_url=url, exporters=[exported])
    tracer = provider.get_tracer("t")
    trace_ids = []
    for i in range(count):
        with tracer.start_as_current_span(f"s{i}") as span:
            trace_ids.append(span.get_span_context().trace_id)
    provider.force_flush()
    provider.shutdown()
    with SqlStore(url, create=False) as store, store.connect() as conn:
        stored = conn.execute(sa.text("SELECT count(*) FROM spans")).scalar_one()
    return stored, trace_ids, exported


def test_a_sampler_thins_the_export_not_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.2"}
    stored, _, exported = spans_through(tmp_path, monkeypatch, env, count=200)
    assert stored == 200
    assert 0 < len(exported.get_finished_spans()) < 120  # about a fifth, by trace id


def test_a_disabled_sdk_exports_nothing_and_stores_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored, ids, exported = spans_through(tmp_path, monkeypatch, {"OTEL_SDK_DISABLED": "true"})
    assert stored == 40 and all(ids)  # real trace ids, not zeros
    assert exported.get_finished_spans() == ()


def test_the_resource_is_opentelemetrys_with_the_standard_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=p-1,openinference.project.name=fraud"
    )
    provider = tracer_provider("endpoint-name", store_url=None)
    attrs = provider.resource.attributes
    assert attrs["service.name"] == "endpoint-name"
    assert attrs["k8s.pod.name"] == "p-1" and attrs["openinference.project.name"] == "fraud"
    assert attrs["telemetry.sdk.name"] == "opentelemetry"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "fraud-api")
    provider = tracer_provider("endpoint-name", store_url=None)
    assert provider.resource.attributes["service.name"] == "fraud-api"
