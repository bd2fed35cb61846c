"""What the store says about endpoints: `kiln why`'s promotions, traffic gates, servers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from serving_app import Scorer, app, register
from typer.testing import CliRunner

from kiln.cli import app as cli
from kiln.config import Settings
from kiln.observe.tracing import ROUTED_BY, identity_attributes, span_row, tracer_provider
from kiln.observe.why import explain
from kiln.record.recorder import recorder_for
from kiln.registry.policy import PolicyError
from kiln.serve import state
from kiln.serve._replica import Handler


def store() -> Any:
    return recorder_for(Settings.from_env()).store


def answered(version: int, routed_by: str | None) -> str:
    """Answer one request as ``scorer:version`` would, store its span; the trace id."""
    exporter = InMemorySpanExporter()
    provider = tracer_provider("kiln.test", store_url=None)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    mv = app.models.get(f"scorer:{version}")
    attrs = identity_attributes(endpoint="scorer", model_name="scorer", model_version=version,
                                run_id=mv.run_id, kind="chain")  # fmt: skip
    if routed_by:
        attrs[ROUTED_BY] = routed_by
    scorer = Scorer()
    scorer.model = {"version": version, "weight": 1.0}
    handler = Handler(scorer, tracer=provider.get_tracer("t"), span_attributes=attrs)
    handler.predict(b'{"x": [1]}')
    (span,) = exporter.get_finished_spans()
    store().write_spans([span_row(span)])
    return span_row(span).trace_id


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


# -- a split is held to the promotion policy of the alias it goes through ---------------


def test_traffic_to_a_version_failing_the_alias_gate_is_refused_unless_overridden() -> None:
    first, second = register(1.0), register(2.0)
    app.models.promote("scorer", first, alias="production")
    app.models.set_policy("scorer", "production",
                          {"metrics": {"accuracy": ">= 0.95"}, "allow_dirty": True,
                           "reproduced": True})  # fmt: skip
    endpoint = app.endpoint(model="scorer@production", name="scorer")(Scorer)
    state.announce(store(), endpoint.spec, "http://127.0.0.1:1")
    split = ["endpoints", "set-traffic", "scorer", f"scorer:{first}=90", f"scorer:{second}=10"]
    refused = CliRunner().invoke(cli, split)
    assert refused.exit_code == 1
    message = str(refused.exception)
    assert f"scorer:{second}: accuracy: 0.9 is not >= 0.95" in message
    assert f"scorer:{second}: no reproduction with verdict identical" in message
    assert f"scorer:{first}:" not in message  # the holder passes
    assert state.live_traffic(store(), "scorer") is None
    no_reason = CliRunner().invoke(cli, [*split, "--override-policy"])
    assert no_reason.exit_code == 1 and "reason: --override-policy needs" in str(
        no_reason.exception
    )
    done = CliRunner().invoke(cli, [*split, "--override-policy", "--reason", "risk signed off"])
    assert done.exit_code == 0, done.output
    assert state.live_traffic(store(), "scorer") == {f"scorer:{first}": 90, f"scorer:{second}": 10}
    (event,) = store().audit_events(action="endpoint.traffic")
    override = json.loads(event["payload"])["override_policy"]
    assert event["actor"] == "tester" and override["reason"] == "risk signed off"
    assert f"scorer:{second}: accuracy: 0.9 is not >= 0.95" in override["failures"]
    # dropping the split is checked the same way; a version the alias holds passes
    follow = CliRunner().invoke(cli, ["endpoints", "set-traffic", "scorer", "--follow"])
    assert follow.exit_code == 0, follow.output
    app.models.set_policy("scorer", "production", {"metrics": {"accuracy": ">= 0.5"},
                                                   "allow_dirty": True},
                          weaken=True, reason="0.5 will do")  # fmt: skip
    passed = CliRunner().invoke(cli, split)
    assert passed.exit_code == 0, passed.output


def test_an_approvals_rule_is_met_by_an_approved_request_only() -> None:
    first, second = register(1.0), register(2.0)
    app.models.promote("scorer", first, alias="production")
    app.models.set_policy("scorer", "production", {
        "allow_dirty": True, "approvals": {"count": 1, "approvers": ["alice", "bob"]},
    })  # fmt: skip
    failures = app.models.gate_failures("scorer", second, "production")
    assert failures == [
        f"needs 1 approval(s) from alice, bob: no approved promotion request of scorer:{second} "
        "to @production"
    ]
    assert app.models.gate_failures("scorer", first, "production") == []


def test_a_declared_split_failing_the_gate_does_not_start() -> None:
    first, second = register(1.0), register(2.0)
    app.models.promote("scorer", first, alias="production")
    app.models.set_policy("scorer", "production", {"metrics": {"accuracy": ">= 0.95"},
                                                   "allow_dirty": True})  # fmt: skip
    split = {f"scorer:{first}": 90, f"scorer:{second}": 10}
    canary = app.endpoint(model="scorer@production", name="canary", cpu=0.5, traffic=split)(Scorer)
    with pytest.raises(PolicyError, match=f"scorer:{second}: accuracy: 0.9 is not >= 0.95"):
        canary.serve(port=0, block=False)
