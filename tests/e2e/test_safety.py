"""Removing runs and collecting blobs never breaks what depends on them."""

from __future__ import annotations

import json
import os
import time

from typer.testing import CliRunner

import kiln
from kiln.cli import app as cli
from kiln.config import Settings
from kiln.errors import DependencyError
from kiln.record import recorder


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    error = "" if result.exception is None else str(result.exception)
    return result.exit_code, result.output + error


def producer_and_consumer() -> tuple[str, str, kiln.Artifact]:
    app = kiln.App("safe")
    with app.run() as producer:
        kiln.save("weights", b"w" * 100)
    weights = kiln.get_run(producer.id).artifact("weights")
    with app.run(params={"model": weights}) as consumer:
        kiln.log({"score": 1.0})
    return producer.id, consumer.id, weights


def test_a_run_others_depend_on_is_not_removed_and_they_are_named() -> None:
    producer, consumer, _ = producer_and_consumer()
    code, out = invoke("runs", "rm", producer[:10], "--yes")
    assert code == 1 and f"run {consumer} uses its weights" in out
    assert kiln.get_run(producer).id == producer  # still there
    assert invoke("runs", "rm", consumer, "--yes")[0] == 0
    assert invoke("runs", "rm", producer, "--json", "--yes")[0] == 0
    assert kiln.runs(app="safe") == []
    recorder.close_all()
    assert invoke("audit", "verify")[0] == 0  # removal is an event; the chain holds
    events = json.loads(invoke("audit", "ls", "--action", "run.delete", "--json")[1])
    assert {e["target"] for e in events} == {producer, consumer}


def test_a_run_still_recording_is_removed_only_with_force_and_leaves_nothing() -> None:
    app = kiln.App("safe-live")
    store = recorder.recorder_for(Settings.from_env()).store
    with app.run() as run:
        kiln.log({"x": 1.0}, step=0)
        kiln.save("early", b"e")
        recorder.recorder_for(Settings.from_env()).flush()
        code, out = invoke("runs", "rm", run.id, "--yes")
        assert code == 1 and "is still recording (running, pid" in out and "--force" in out
        assert kiln.get_run(run.id).status is kiln.RunStatus.RUNNING
        assert invoke("runs", "rm", run.id, "--yes", "--force")[0] == 0
        for step in range(1, 100):  # the process goes on recording the removed run
            kiln.log({"x": float(step)}, step=step)
        kiln.save("late", b"l")
    recorder.recorder_for(Settings.from_env()).flush(seal=True)
    with store.connect() as conn:
        for table in ("runs", "metrics", "summary", "artifacts"):
            column = "id" if table == "runs" else "run_id"
            left = conn.exec_driver_sql(
                f"SELECT count(*) FROM {table} WHERE {column} = ?", (run.id,)
            ).scalar_one()
            assert left == 0, table
    events = [e["action"] for e in store.audit_events(target=run.id, limit=None)]
    assert events[:2] == ["run.delete", "run.end"]  # newest first: cancelled, then removed
    assert (
        json.loads(store.audit_events(target=run.id, action="run.end")[0]["payload"])["status"]
        == "cancelled"
    )
    assert invoke("audit", "verify")[0] == 0


def test_a_sweep_is_not_removed_before_its_runs() -> None:
    app = kiln.App("safe-sweep")

    @app.function()
    def one(x: int) -> int:
        return x

    sweep = one.sweep([{"x": 1}, {"x": 2}])
    sweep.wait()
    store = recorder.recorder_for(Settings.from_env()).store
    try:
        store.delete_run(sweep.id)
    except DependencyError as exc:
        assert len(exc.dependants) == 2 and "(a sweep)" in exc.dependants[0]
    else:
        raise AssertionError("a sweep with runs was removed")


def test_gc_removes_only_unreferenced_blobs_old_enough() -> None:
    producer, consumer, weights = producer_and_consumer()
    rec = recorder.recorder_for(Settings.from_env())
    orphan = rec.blobs.put_bytes(b"nobody names me")
    fresh = rec.blobs.put_bytes(b"nobody names me yet")
    old = time.time() - 7200
    os.utime(rec.blobs.path(orphan), (old, old))
    dry = json.loads(invoke("gc", "--dry-run", "--json")[1])
    assert dry["removed"] == [orphan] and rec.blobs.exists(orphan)
    done = json.loads(invoke("gc", "--json")[1])
    assert done["removed"] == [orphan]
    assert not rec.blobs.exists(orphan) and rec.blobs.exists(fresh)
    assert rec.blobs.exists(weights.sha256)  # referenced: kept at any age
    os.utime(rec.blobs.path(weights.sha256), (old, old))
    assert json.loads(invoke("gc", "--json")[1])["removed"] == []
    invoke("runs", "rm", consumer, "--yes")
    invoke("runs", "rm", producer, "--yes")
    assert json.loads(invoke("gc", "--json")[1])["removed"] == [weights.sha256]
    assert invoke("gc", "--min-age", "soon")[0] != 0


def test_a_run_a_model_was_made_from_is_not_removed() -> None:
    app = kiln.App("safe-model")
    with app.run() as run:
        kiln.save("model.bin", b"m")
    app.models.register("safe", run.id, artifact="model.bin")
    code, out = invoke("runs", "rm", run.id, "--yes")
    assert code == 1 and "model safe:1 was made by it" in out
    assert kiln.get_run(run.id).id == run.id
