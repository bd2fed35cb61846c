"""The engine's bookkeeping over the fake backend: records, retries, sweeps, cancel."""

from __future__ import annotations

import pytest

import kiln
from kiln._engine import engine_for
from kiln.config import Settings
from kiln.errors import RunFailed
from kiln.testing import FakeBackend

app = kiln.App("fake")
attempts: dict[str, int] = {}


@app.function(retries=2)
def fails_twice(key: str) -> str:
    attempts[key] = attempts.get(key, 0) + 1
    if attempts[key] < 3:
        raise RuntimeError(f"attempt {attempts[key]}")
    return "third time"


@app.function()
def double(x: int) -> dict:
    kiln.log({"x": x})
    return {"double": 2 * x}


@pytest.fixture(autouse=True)
def fake_engine() -> FakeBackend:
    engine = engine_for(Settings.from_env(), backend=FakeBackend)
    assert isinstance(engine.backend, FakeBackend)
    return engine.backend


def test_retries_until_success_with_every_attempt_recorded(fake_engine: FakeBackend) -> None:
    assert fails_twice.remote("a") == "third time"
    (record,) = kiln.runs(app="fake")
    assert record.attempt == 3
    assert [a["status"] for a in record.resources["attempts"]] == ["failed", "failed", "succeeded"]
    assert [t.attempt for t in fake_engine.submitted] == [1, 2, 3]


def test_out_of_retries_is_a_failure_with_the_last_cause() -> None:
    @app.function(retries=1)
    def always() -> None:
        raise RuntimeError("nope")

    with pytest.raises(RunFailed, match="nope") as info:
        always.remote()
    record = kiln.get_run(info.value.run_id)
    assert record.status is kiln.RunStatus.FAILED
    assert record.error is not None and "after 2 attempts" in record.error


def test_results_metrics_and_sweeps_are_recorded() -> None:
    sweep = double.sweep(kiln.grid(x=[1, 2, 3]))
    assert sweep.results() == [{"double": 2}, {"double": 4}, {"double": 6}]
    assert sweep.best("double").params == {"x": 3}
    assert sweep.best("x", mode="min").params == {"x": 1}
    assert len(kiln.runs(parent=sweep.id)) == 3
