"""The model registry on every store: versions, references, aliases, history, rollback."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

import kiln
from kiln.config import Settings
from kiln.errors import NotFoundError, ValidationError
from kiln.record import recorder
from kiln.registry.models import parse_ref


def audit_events(settings: Settings, action: str) -> list[dict[str, Any]]:
    """This store's audit events of ``action``, newest first."""
    events: list[dict[str, Any]] = recorder.recorder_for(settings).store.audit_events(action=action)
    return events


def trained(app: kiln.App, accuracy: float, *, fail: bool = False) -> str:
    try:
        with app.run(params={"accuracy": accuracy}) as run:
            kiln.log({"accuracy": accuracy})
            kiln.save("model.pkl", {"acc": accuracy})
            if fail:
                raise RuntimeError("diverged")
    except RuntimeError:
        pass
    return run.id


def test_register_resolve_promote_rollback(any_settings: Settings) -> None:
    app = kiln.App("fraud")
    first, second = trained(app, 0.8), trained(app, 0.9)
    v1 = app.models.register("fraud", first, artifact="model.pkl")
    v2 = app.models.register("fraud", kiln.get_run(second), artifact="model.pkl")
    assert (v1.version, v2.version) == (1, 2)
    assert v2.run_id == second and v2.metrics == {"accuracy": 0.9}
    assert v2.artifact_sha256 == kiln.get_run(second).artifact("model.pkl").sha256
    assert app.models.get("fraud:1") == v1
    with app.run() as run:  # the run of a `with` block: once it has ended
        kiln.save("model.pkl", {"acc": 0.5})
        with pytest.raises(ValidationError, match="still being recorded"):
            app.models.register("fraud", run, artifact="model.pkl")
    assert app.models.register("fraud", run, artifact="model.pkl").run_id == run.id

    app.models.promote("fraud", 1, alias="production", reason="first")
    app.models.promote("fraud", 2, alias="production", reason="better")
    assert app.models.get("fraud@production").version == 2
    back = app.models.rollback("fraud", "production")
    assert (back.from_version, back.to_version) == (2, 1)
    assert app.models.get("fraud@production").version == 1
    history = app.models.history("fraud", "production")
    assert [(m.from_version, m.to_version, m.reason) for m in history] == [
        (None, 1, "first"),
        (1, 2, "better"),
        (2, 1, "rollback"),
    ]
    assert {m.actor for m in history} == {"tester"}
    assert app.models.aliases("fraud") == {"production": 1}
    assert app.models.names() == ["fraud"]
    events = recorder.recorder_for(Settings.from_env()).store.audit_events(limit=None)
    actions = [e["action"] for e in reversed(events) if e["action"].startswith(("model", "alias"))]
    assert actions == ["model.register"] * 3 + ["alias.promote", "alias.promote",
                                                "alias.rollback"]  # fmt: skip


def test_bad_input_is_refused_and_changes_nothing(any_settings: Settings) -> None:
    app = kiln.App("fraud")
    good, bad = trained(app, 0.8), trained(app, 0.1, fail=True)
    with pytest.raises(ValidationError, match="only succeeded runs"):
        app.models.register("fraud", bad, artifact="model.pkl")
    with pytest.raises(NotFoundError, match="no artifact 'weights'"):
        app.models.register("fraud", good, artifact="weights")
    with pytest.raises(NotFoundError, match="no model 'fraud'"):
        app.models.get("fraud:1")
    app.models.register("fraud", good, artifact="model.pkl")
    for call, error in [
        (lambda: app.models.promote("fraud", 7), "no version 7"),
        (lambda: app.models.promote("fraud", 1, alias="Prod!"), "alias"),
        (lambda: app.models.get("fraud@staging"), "no alias 'staging'"),
        (lambda: app.models.rollback("fraud", "production"), "nothing to roll back"),
        (lambda: app.models.get("nope:1"), "no model 'nope'"),
    ]:
        with pytest.raises((NotFoundError, ValidationError), match=error):
            call()
    app.models.promote("fraud", 1)
    with pytest.raises(NotFoundError, match="only version 1"):
        app.models.rollback("fraud")
    assert [m.to_version for m in app.models.history("fraud")] == [1]
    for ref in ("fraud", "fraud:0", "fraud:x", "fraud@"):
        with pytest.raises(ValidationError):
            parse_ref(ref)


def test_concurrent_promotions_leave_one_consistent_history(any_settings: Settings) -> None:
    app = kiln.App("race")
    for accuracy in (0.1, 0.2, 0.3):
        app.models.register("race", trained(app, accuracy), artifact="model.pkl")
    recorder.close_all()
    script = textwrap.dedent(
        """
        import sys, kiln
        models = kiln.App("race").models
        for i in range(15):
            models.promote("race", (int(sys.argv[1]) + i) % 3 + 1, reason=sys.argv[1])
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)], stderr=subprocess.PIPE,
                              text=True) for n in range(2)]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    history = app.models.history("race", "production")
    assert len(history) == 30
    assert history[0].from_version is None
    for before, after in itertools.pairwise(history):
        assert after.from_version == before.to_version  # no move was lost or interleaved
    assert app.models.get("race@production").version == history[-1].to_version


def test_policies_gate_promotion_and_a_refusal_changes_nothing(any_settings: Settings) -> None:
    from kiln.registry.policy import PolicyError

    app = kiln.App("gated")
    for accuracy in (0.80, 0.95, 0.955):
        app.models.register("gated", trained(app, accuracy), artifact="model.pkl")
    policy = {"metrics": {"accuracy": ">= current + 0.01"}, "allow_dirty": True}
    app.models.set_policy("gated", "production", policy)
    assert app.models.policy("gated", "production") == {
        "metrics": {"accuracy": ">= current + 0.01"}, "allow_dirty": True,
    }  # fmt: skip
    app.models.promote("gated", 1)  # no holder yet: nothing to beat
    app.models.promote("gated", 2)  # 0.95 >= 0.80 + 0.01
    with pytest.raises(PolicyError, match=r"accuracy: 0\.955 is not >= current \+ 0\.01") as info:
        app.models.promote("gated", 3)
    assert len(info.value.failures) == 1
    assert app.models.get("gated@production").version == 2
    assert [m.to_version for m in app.models.history("gated")] == [1, 2]
    # a policy for one call adds its gates to the stored one's
    with pytest.raises(PolicyError) as info:
        strict = {"metrics": {"accuracy": ">= 0.99"}, "allow_dirty": True, "reproduced": True}
        app.models.promote("gated", 3, policy=strict)
    assert len(info.value.failures) == 3
    # and cannot take any away: loosening the stored policy is its own, audited act
    with pytest.raises(PolicyError, match=r"accuracy: 0\.955 is not >= current \+ 0\.01"):
        app.models.promote("gated", 3, policy={"allow_dirty": True}, reason="override")
    with pytest.raises(PolicyError, match="drops or loosens the gate accuracy >= current"):
        app.models.set_policy("gated", "production", {"allow_dirty": True})
    app.models.set_policy(
        "gated", "production", {"allow_dirty": True}, weaken=True, reason="3 is good enough"
    )
    app.models.promote("gated", 3, reason="override")
    assert app.models.get("gated@production").version == 3
    events = audit_events(any_settings, "policy.set")
    assert events[0]["actor"] == "tester"
    assert json.loads(events[0]["payload"]) == {
        "policy": {"allow_dirty": True},
        "weakened": ["drops or loosens the gate accuracy >= current + 0.01"],
        "reason": "3 is good enough",
    }


def test_a_policy_is_removed_or_its_approvals_lowered_only_as_a_weakening(
    any_settings: Settings,
) -> None:
    from kiln.registry.models import PromotionRequest
    from kiln.registry.policy import PolicyError

    app = kiln.App("gated")
    app.models.register("gated", trained(app, 0.9), artifact="model.pkl")
    rule = {"allow_dirty": True, "approvals": {"count": 2, "approvers": ["ann", "bo", "cy"]}}
    app.models.set_policy("gated", "production", rule)
    for bypass in (
        {"allow_dirty": True, "approvals": {"count": 1, "approvers": ["ann"]}},
        {"allow_dirty": True, "approvals": {"count": 2, "approvers": ["tester", "ann"]}},
    ):
        with pytest.raises(PolicyError, match="may only add to the stored one"):
            app.models.promote("gated", 1, policy=bypass)
    with pytest.raises(PolicyError, match="removes the policy"):
        app.models.set_policy("gated", "production", None)
    assert app.models.policy("gated", "production") == rule
    request = app.models.promote("gated", 1)  # still needs two approvals
    assert isinstance(request, PromotionRequest) and request.needed == 2
    app.models.set_policy("gated", "production", None, weaken=True, reason="retired")
    assert app.models.policy("gated", "production") is None


def test_a_reproduced_run_passes_the_reproduction_gate(any_settings: Settings) -> None:
    from kiln.registry.policy import PolicyError

    app = kiln.App("gated")
    original = trained(app, 0.9)
    app.models.register("gated", original, artifact="model.pkl")
    policy = {"allow_dirty": True, "reproduced": True}
    with pytest.raises(PolicyError, match="no reproduction"):
        app.models.promote("gated", 1, policy=policy)
    with app.run(tags={"reproduced_from": original, "reproduce_verdict": "identical"}):
        pass
    app.models.promote("gated", 1, policy=policy)
    assert app.models.get("gated@production").run_id == original


def test_pareto_front_and_best_across_apps(any_settings: Settings) -> None:
    import json

    from typer.testing import CliRunner

    from kiln.cli import app as cli

    points = {"a": (0.90, 30.0), "b": (0.95, 60.0), "c": (0.85, 40.0), "d": (0.95, 50.0)}
    ids = {}
    for name, (accuracy, latency) in points.items():
        with kiln.App("front" if name != "d" else "other").run(name=name) as run:
            kiln.log({"accuracy": accuracy, "latency_ms": latency})
        ids[name] = run.id
    everything = kiln.runs(limit=None)
    front = kiln.pareto(everything, maximize=["accuracy"], minimize=["latency_ms"])
    assert sorted(r.name for r in front) == ["a", "d"]  # b and c are dominated
    assert [r.name for r in kiln.pareto(everything, maximize=["accuracy"])] in (
        ["b", "d"],
        ["d", "b"],
    )
    with pytest.raises(ValidationError):
        kiln.pareto(everything)
    result = CliRunner().invoke(cli, ["runs", "best", "--metric", "latency_ms", "--mode", "min",
                                      "--json"])  # fmt: skip
    assert json.loads(result.output)["id"] == ids["a"]
    in_app = CliRunner().invoke(cli, ["runs", "best", "-m", "accuracy", "--app", "front", "--json"])
    assert json.loads(in_app.output)["id"] == ids["b"]
    assert CliRunner().invoke(cli, ["runs", "best", "-m", "nope"]).exit_code != 0


def test_promotions_that_need_approval(
    any_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln.registry.models import PromotionRequest
    from kiln.registry.policy import PolicyError

    def as_(who: str) -> Any:
        monkeypatch.setenv("KILN_ACTOR", who)
        return kiln.App("approved").models

    models = as_("tester")
    for accuracy in (0.90, 0.95):
        models.register("approved", trained(kiln.App("approved"), accuracy), artifact="model.pkl")
    approvals = {"count": 2, "approvers": ["tester", "alice", "bob", "carol"]}
    policy = {"metrics": {"accuracy": ">= current + 0.01"}, "allow_dirty": True,
              "approvals": approvals}  # fmt: skip
    models.set_policy("approved", "production", policy)
    request = models.promote("approved", 1, reason="first")
    assert isinstance(request, PromotionRequest) and request.status == "pending"
    with pytest.raises(NotFoundError):
        models.get("approved@production")  # nothing moved yet
    with pytest.raises(ValidationError, match="its own request"):
        models.approve(request.id)
    with pytest.raises(ValidationError, match="may not approve"):
        as_("mallory").approve(request.id)
    assert as_("alice").approve(request.id).status == "pending"
    with pytest.raises(ValidationError, match="already approved"):
        as_("alice").approve(request.id)
    done = as_("bob").approve(request.id)
    assert done.status == "applied" and done.approvals == ("alice", "bob")
    assert models.get("approved@production").version == 1
    (move,) = models.history("approved")
    assert move.actor == "bob" and f"request {request.id}" in (move.reason or "")
    with pytest.raises(ValidationError, match="already applied"):
        as_("carol").approve(request.id)

    second = as_("tester").promote("approved", 2)
    assert as_("carol").reject(second.id, reason="not now").status == "rejected"
    assert [r.status for r in models.requests(status=None)] == ["applied", "rejected"]
    assert models.requests() == []
    with pytest.raises(NotFoundError, match="no promotion request"):
        models.approve("0" * 16)

    # a per-call policy cannot skip the approvals; gates are checked again at the last one
    third = as_("tester").promote("approved", 2)
    fourth = as_("tester").promote("approved", 2, policy={"allow_dirty": True})
    assert isinstance(fourth, PromotionRequest) and fourth.needed == 2
    as_("alice").approve(fourth.id)
    assert isinstance(as_("bob").approve(fourth.id), PromotionRequest)
    assert models.get("approved@production").version == 2
    as_("alice").approve(third.id)
    with pytest.raises(PolicyError, match="is not >= current"):
        as_("bob").approve(third.id)
    assert {r.id: r.status for r in models.requests(status=None)}[third.id] == "failed"
    approved = recorder.recorder_for(Settings.from_env()).store.audit_events(
        action="promotion.approve", limit=1
    )[0]
    assert approved["actor"] == "bob"  # claimed (KILN_ACTOR), not proven: and the OS user is
    assert json.loads(approved["payload"])["os_user"]
    actions = {
        e["action"]
        for e in recorder.recorder_for(Settings.from_env()).store.audit_events(limit=None)
    }
    assert {"promotion.request", "promotion.approve", "promotion.reject", "policy.set"} <= actions


def test_registry_writes_after_another_process_appended_to_the_audit_log(
    any_settings: Settings,
) -> None:
    app = kiln.App("chain")
    app.models.register("chain", trained(app, 0.5), artifact="model.pkl")  # this process writes
    other = subprocess.run(
        [sys.executable, "-c", "import kiln; kiln.App('chain').models.promote('chain', 1)"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert other.returncode == 0, other.stderr
    # The audit chain's end moved under this process: its next append must follow it.
    app.models.promote("chain", 1, alias="staging")
    assert list(recorder.recorder_for(any_settings).store.verify()) == []


def test_a_live_split_is_checked_where_the_database_is(any_settings: Settings) -> None:
    import time

    from kiln.record.store.base import EndpointRow, ServerRow
    from kiln.registry.traffic import TrafficRefused, set_traffic

    app = kiln.App("split")
    for accuracy in (0.9, 0.5):
        app.models.register("split", trained(app, accuracy), artifact="model.pkl")
    app.models.set_policy("split", "production", {"metrics": {"accuracy": ">= 0.8"},
                                                  "allow_dirty": True})  # fmt: skip
    app.models.promote("split", 1)
    store = recorder.recorder_for(any_settings).store
    now = time.time()
    store.announce_server(
        EndpointRow(name="scorer", app="split", model="split@production", spec={},
                    traffic=None, updated_at=now),
        ServerRow(id="s1", endpoint="scorer", url=None, host="h", pid=1, status="serving",
                  stats={}, started_at=now, updated_at=now),
    )  # fmt: skip
    with pytest.raises(NotFoundError, match="model split has no version 9"):
        set_traffic(store, "scorer", {"split:9": 10}, actor="tester")
    with pytest.raises(TrafficRefused, match=r"split:2: accuracy: 0\.5 is not >= 0\.8") as info:
        set_traffic(store, "scorer", {"split:1": 90, "split:2": 10}, actor="tester")
    assert info.value.failures == ["split:2: accuracy: 0.5 is not >= 0.8"]
    with pytest.raises(ValidationError, match="not a weight"):
        set_traffic(store, "scorer", {"split:1": -1}, actor="tester")
    assert store.endpoint("scorer").traffic is None  # type: ignore[union-attr]
    assert audit_events(any_settings, "endpoint.traffic") == []
    done = set_traffic(store, "scorer", {"split:1": 90, "split:2": 10}, actor="tester",
                       override_reason="canary")  # fmt: skip
    assert done == {"split:1": 90.0, "split:2": 10.0}
    assert store.endpoint("scorer").traffic == done  # type: ignore[union-attr]
    (event,) = audit_events(any_settings, "endpoint.traffic")
    assert event["actor"] == "tester"
    assert json.loads(event["payload"]) == {"traffic": done, "override_policy": {
        "reason": "canary", "failures": ["split:2: accuracy: 0.5 is not >= 0.8"]}}  # fmt: skip
