"""What the store says about endpoints: `kiln why`'s promotions, traffic gates, servers."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from serving_app import Scorer, app, register
from typer.testing import CliRunner

from kiln.cli import app as cli
from kiln.config import Settings
from kiln.observe.tracing import ROUTED_BY, identity_attributes, span_row, tracer_provider
from kiln.observe.why import explain
from kiln.record.recorder import recorder_for
from kiln.serve._replica import Handler


def store() -> Any:
    return recorder_for(Settings.from_env()).store


def answered(version: int, routed_by: str | None) -> str:
    """Answer one request as ``scorer:version`` would, store its span; the trace id."""
    exporter = InMemorySpanExporter()
    provider, ids = tracer_provider("kiln.test", store_url=None)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    mv = app.models.get(f"scorer:{version}")
    attrs = identity_attributes(endpoint="scorer", model_name="scorer", model_version=version,
                                run_id=mv.run_id, kind="chain")  # fmt: skip
    if routed_by:
        attrs[ROUTED_BY] = routed_by
    scorer = Scorer()
    scorer.model = {"version": version, "weight": 1.0}
    handler = Handler(scorer, tracer=provider.get_tracer("t"), ids=ids, span_attributes=attrs)
    handler.predict(b'{"x": [1]}')
    (span,) = exporter.get_finished_spans()
    store().write_spans([span_row(span)])
    return span_row(span)["trace_id"]


def test_why_lists_only_the_promotions_of_the_alias_that_routed_the_answer() -> None:
    first, second = register(1.0), register(2.0)
    app.models.promote("scorer", first, alias="staging", reason="try it")
    app.models.promote("scorer", first, alias="production", reason="ship it")
    app.models.promote("scorer", first, alias="shadow", reason="mirror")
    app.models.promote("scorer", second, alias="staging", reason="next")
    info = explain(store(), answered(first, "scorer@production"))
    assert info["routed_by"] == "scorer@production"
    assert [(p["alias"], p["reason"]) for p in info["promotions"]] == [("production", "ship it")]
    shown = CliRunner().invoke(cli, ["why", info["trace_id"]])
    assert shown.exit_code == 0, shown.output
    assert "promoted to @production" in shown.output and "@staging" not in shown.output
    # a canary of @production through a split: it was never promoted there, and says so
    canary = explain(store(), answered(second, "scorer@production"))
    assert canary["promotions"] == []
    shown = CliRunner().invoke(cli, ["why", canary["trace_id"]])
    assert "by a traffic split; never promoted to it" in shown.output
    # pinned (no alias routed it): the aliases the version holds now
    pinned = explain(store(), answered(first, "scorer:1"))
    assert [p["alias"] for p in pinned["promotions"]] == ["production", "shadow"]
