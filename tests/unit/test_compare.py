"""Comparing a reproduction with its original: verdicts, ignored metrics, tolerances."""

from __future__ import annotations

import pytest

from kiln.errors import ValidationError
from kiln.record.compare import compare
from kiln.record.model import Artifact, RunRecord, RunStatus


def run(
    summary: dict[str, float],
    *,
    model: str = "aa",
    volatile: tuple[str, ...] = (),
    status: RunStatus = RunStatus.SUCCEEDED,
) -> RunRecord:
    return RunRecord(
        id="r",
        app="a",
        status=status,
        created_at=0.0,
        summary=summary,
        artifacts=(Artifact("model.pt", "out", "file", model, 1),),
        volatile_metrics=volatile,
    )


def test_ignored_and_volatile_metrics_are_shown_but_do_not_change_the_verdict() -> None:
    old = run({"acc": 0.9, "time_s": 1.0, "epoch_s": 0.1}, volatile=("epoch_s",))
    new = run({"acc": 0.9, "time_s": 2.0, "epoch_s": 0.3}, volatile=("epoch_s",))
    assert compare(old, new).verdict == "different"
    assert compare(old, new).differences() == ["time_s"]
    result = compare(old, new, ignore=["time_s"])
    assert result.verdict == "identical" and result.reproduced
    assert result.ignored == ("epoch_s", "time_s")
    assert result.metrics["time_s"] == (1.0, 2.0, 1.0)
    assert result.to_dict()["metrics"]["time_s"]["ignored"] is True
    assert result.to_dict()["metrics"]["acc"]["ignored"] is False


def test_verdicts() -> None:
    old = run({"acc": 0.9})
    assert compare(old, run({"acc": 0.9}, model="bb")).verdict == "different"
    assert compare(old, run({"acc": 0.9}, model="bb")).differences() == ["artifact model.pt"]
    assert compare(old, run({"acc": 0.9000001}), rtol=1e-3).verdict == "within tolerance"
    # within tolerance, a model has other bytes
    assert compare(old, run({"acc": 0.9000001}, model="bb"), rtol=1e-3).verdict == (
        "within tolerance"
    )
    assert compare(old, run({"acc": 0.95}), rtol=1e-3).verdict == "different"
    assert compare(old, run({}, status=RunStatus.FAILED)).verdict == "failed"
    assert not compare(old, run({}, status=RunStatus.FAILED)).reproduced


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rtol": -0.1}, "rtol"),
        ({"rtol": float("nan")}, "rtol"),
        ({"ignore": "acc"}, "ignore"),
        ({"ignore": [3]}, "ignore"),
    ],
)
def test_bad_terms_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        compare(run({}), run({}), **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
