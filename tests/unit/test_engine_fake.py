"""The engine's bookkeeping over the fake backend: records, retries, sweeps, cancel."""

from __future__ import annotations

import threading
import time

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


release = threading.Event()


@app.function()
def waits() -> None:
    release.wait(30)  # the fake backend runs tasks in this process: the same event


def test_owned_runs_get_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln import _engine

    monkeypatch.setattr(_engine, "HEARTBEAT_S", 0.1)
    engine = engine_for(Settings.from_env())
    engine._events.put([])  # wake the writer so it picks up the shorter interval
    run = waits.spawn()
    first = run.record().heartbeat_at
    deadline = time.time() + 10
    while run.record().heartbeat_at == first and time.time() < deadline:
        time.sleep(0.05)
    beat = run.record().heartbeat_at
    release.set()
    run.result(timeout=30)
    assert first is not None and beat is not None and beat > first
