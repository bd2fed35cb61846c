"""Promotion gates, one at a time and combined."""

from __future__ import annotations

import pytest

from kiln.errors import ValidationError
from kiln.record.model import RunRecord, RunStatus
from kiln.registry.policy import Policy


def failures(spec: dict, metrics: dict, current: dict | None = None, *, dirty: bool | None = False,
             verdicts: list[str] | None = None) -> list[str]:  # fmt: skip
    return Policy.parse(spec).check(
        metrics, current, dirty=dirty, reproduced_verdicts=verdicts or []
    )


def test_metric_thresholds() -> None:
    spec = {"metrics": {"accuracy": ">= 0.9", "latency_ms": "< 50"}}
    assert failures(spec, {"accuracy": 0.95, "latency_ms": 20}) == []
    assert failures(spec, {"accuracy": 0.85, "latency_ms": 20}) == ["accuracy: 0.85 is not >= 0.9"]
    both = failures(spec, {"accuracy": 0.85, "latency_ms": 70})
    assert both == ["accuracy: 0.85 is not >= 0.9", "latency_ms: 70 is not < 50"]
    assert failures(spec, {"latency_ms": 20}) == ["accuracy is missing"]


def test_better_than_the_current_holder() -> None:
    spec = {"metrics": {"accuracy": ">= current + 0.01", "loss": "< current"}}
    assert failures(spec, {"accuracy": 0.92, "loss": 0.1}, {"accuracy": 0.90, "loss": 0.2}) == []
    (problem,) = failures(spec, {"accuracy": 0.905, "loss": 0.1}, {"accuracy": 0.90, "loss": 0.2})
    assert problem == "accuracy: 0.905 is not >= current + 0.01 (current holder has 0.9)"
    assert failures(spec, {"accuracy": 0.5, "loss": 1.0}, None) == []  # no holder yet


def test_clean_code_and_reproduction() -> None:
    assert failures({}, {}, dirty=True) == [
        "the run had uncommitted changes (set allow_dirty: true to permit it)"
    ]
    assert "not in git" in failures({}, {}, dirty=None)[0]
    assert failures({"allow_dirty": True}, {}, dirty=True) == []
    spec = {"allow_dirty": True, "reproduced": True}
    assert "no reproduction" in failures(spec, {}, verdicts=["different"])[0]
    assert failures(spec, {}, verdicts=["different", "within tolerance"]) == []


def test_gates_combine_and_every_failure_is_named() -> None:
    spec = {"metrics": {"accuracy": ">= 0.9"}, "reproduced": True}
    found = failures(spec, {"accuracy": 0.5}, dirty=True)
    assert len(found) == 3 and found[0].startswith("accuracy")


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"metrics": {"accuracy": "big"}}, "policy.metrics.accuracy"),
        ({"approve": 2}, "policy.approve"),
        ({"allow_dirty": "yes"}, "policy.allow_dirty"),
        ("accuracy >= 0.9", "policy"),
        ({"reproduced": "yes"}, "policy.reproduced"),
        ({"reproduced": {"rtol": -1}}, "policy.reproduced.rtol"),
        ({"reproduced": {"rtol": True}}, "policy.reproduced.rtol"),
        ({"reproduced": {"rtol": "1e-6"}}, "policy.reproduced.rtol"),
        ({"reproduced": {"ignore_metrics": "time_s"}}, "policy.reproduced.ignore_metrics"),
        ({"reproduced": {"ignore_metrics": [""]}}, "policy.reproduced.ignore_metrics"),
        ({"reproduced": {"ignore": ["time_s"]}}, "policy.reproduced.ignore"),
    ],
)
def test_bad_policies_name_the_key(spec: object, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        Policy.parse(spec)  # type: ignore[arg-type]
    assert info.value.field == field


def run(
    run_id: str, summary: dict[str, float], *, volatile: tuple[str, ...] = (), verdict: str = ""
) -> RunRecord:
    tags = {"reproduced_from": "orig", "reproduce_verdict": verdict} if verdict else {}
    return RunRecord(
        id=run_id,
        app="a",
        status=RunStatus.SUCCEEDED,
        created_at=0.0,
        summary=summary,
        tags=tags,
        volatile_metrics=volatile,
    )


def test_a_reproduced_rule_compares_each_reproduction_on_its_own_terms() -> None:
    original = run("orig", {"acc": 0.9, "time_s": 1.0})
    running = run("running", {"acc": 0.1})  # no verdict yet: not counted
    copies = [run("copy", {"acc": 0.9, "time_s": 2.5}, verdict="different"), running]

    def gate(rule: object) -> list[str]:
        policy = Policy.parse({"allow_dirty": True, "reproduced": rule})
        verdicts = policy.reproduction_verdicts(original, copies)
        return policy.check({}, None, dirty=False, reproduced_verdicts=verdicts)

    # True takes the verdict kiln reproduce recorded: the timing made it "different"
    (failure,) = gate(True)
    assert failure == "no reproduction with verdict identical or within tolerance (seen: different)"
    assert gate({"ignore_metrics": ["time_s"]}) == []
    (failure,) = gate({"rtol": 0.01})
    assert failure == (
        "no reproduction with verdict identical or within tolerance (rtol 0.01) (seen: different)"
    )
    assert gate({"rtol": 2.0}) == []  # 2.5 is within 200% of 1.0
    assert Policy.parse({"reproduced": False}).reproduction_verdicts(original, copies) == []
    # a metric the run declared volatile is left out on any terms
    original = run("orig", {"acc": 0.9, "time_s": 1.0}, volatile=("time_s",))
    assert gate({}) == []
    copies = [run("copy", {"acc": 0.8, "time_s": 1.0}, verdict="different")]
    assert gate({"ignore_metrics": ["time_s"]}) == [
        "no reproduction with verdict identical or within tolerance (ignoring time_s) "
        "(seen: different)"
    ]
