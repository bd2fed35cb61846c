"""Recording runs by hand through the public API, on every store."""

from __future__ import annotations

import json
import math
import pickle
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import kiln
from kiln.config import Settings
from kiln.errors import NoActiveRunError, RecordingWarning, ValidationError
from kiln.record.recorder import recorder_for


class Model:
    def __init__(self, w: float) -> None:
        self.w = w


def test_a_run_records_params_metrics_artifacts_and_result(
    settings: Settings, tmp_path: Path
) -> None:
    app = kiln.App("fraud")
    data = tmp_path / "train.csv"
    data.write_text("a,b\n1,2\n")
    with app.run(params={"lr": 0.1, "data": kiln.Dataset(data)}, tags={"team": "risk"}) as run:
        for step in range(3):
            kiln.log({"loss": 1.0 / (step + 1), "acc": 0.5 + step / 10}, step=step)
        kiln.save("model.pkl", Model(3.0))
        kiln.save("raw.bin", b"\x00\x01")
        run.set_result({"accuracy": 0.93, "note": "ok"})

    record = kiln.get_run(run.id)
    assert record.status is kiln.RunStatus.SUCCEEDED
    assert record.app == "fraud" and record.actor == "tester"
    assert record.params["lr"] == 0.1
    assert record.params["data"]["sha256"] == kiln.Dataset(data).sha256
    assert record.tags == {"team": "risk"}
    assert record.result == {"accuracy": 0.93, "note": "ok"}
    assert record.summary == {"loss": 1 / 3, "acc": pytest.approx(0.7), "accuracy": 0.93}
    assert [p.value for p in record.metric_history("loss")] == [1.0, 0.5, 1 / 3]
    assert record.load("model.pkl").w == 3.0
    assert record.load("raw.bin") == b"\x00\x01"
    (dataset,) = record.datasets
    assert dataset.direction == "in" and dataset.uri == str(data)
    assert record.started_at is not None and record.ended_at is not None
    assert record.usage.wall_s is not None and record.usage.wall_s >= 0
    assert record.usage.cpu_s is not None and record.usage.peak_rss_bytes
    assert record.environment.python and record.environment.package_count > 0
    assert record.code.module_path == __file__
    assert record.host and record.pid


def test_an_exception_marks_the_run_failed_and_propagates(settings: Settings) -> None:
    app = kiln.App("fraud")
    with pytest.raises(ZeroDivisionError), app.run(params={"x": 1}) as run:
        kiln.log({"loss": 0.5})
        _ = 1 / 0
    record = kiln.get_run(run.id)
    assert record.status is kiln.RunStatus.FAILED
    assert record.error is not None and "ZeroDivisionError" in record.error
    assert [p.value for p in record.metric_history("loss")] == [0.5]


def test_steps_default_to_counting_up_and_non_finite_values_are_kept(settings: Settings) -> None:
    with kiln.App("a").run() as run:
        kiln.log({"x": math.nan})
        kiln.log({"x": math.inf})
        kiln.log({"x": 2}, step=10)
        kiln.log({"x": -math.inf})
    points = kiln.get_run(run.id).metric_history("x")
    assert [p.step for p in points] == [0, 1, 10, 11]
    assert math.isnan(points[0].value)
    assert [p.value for p in points[1:]] == [math.inf, 2.0, -math.inf]


def test_wrong_metric_types_raise_at_the_call(settings: Settings) -> None:
    with kiln.App("a").run() as run:
        with pytest.raises(ValidationError, match=r"metrics\.loss"):
            kiln.log({"loss": "low"})
        with pytest.raises(ValidationError, match="step"):
            kiln.log({"loss": 1.0}, step=1.5)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="step"):
            kiln.log({"loss": 1.0}, step=True)
        with pytest.raises(ValidationError, match="metrics"):
            kiln.log([("loss", 1.0)])  # type: ignore[arg-type]
        kiln.log({"ok": 1})
    assert kiln.get_run(run.id).summary == {"ok": 1.0}


def test_params_that_are_not_json_are_refused_before_anything_is_recorded(
    settings: Settings,
) -> None:
    app = kiln.App("a")
    with pytest.raises(ValidationError, match=r"params\.model.*Model"):
        app.run(params={"model": Model(1.0)})
    with pytest.raises(ValidationError, match=r"params\.lr"):
        app.run(params={"lr": math.nan})
    with pytest.raises(ValidationError, match=r"tags\.t"):
        app.run(tags={"t": [1]})
    with pytest.raises(ValidationError, match="app"):
        kiln.App("bad name!")
    with app.run():
        pass
    assert len(kiln.runs()) == 1


def test_log_and_save_outside_a_run_explain_what_to_do(settings: Settings) -> None:
    with pytest.raises(NoActiveRunError, match=r"app\.run"):
        kiln.log({"x": 1.0})
    with pytest.raises(NoActiveRunError):
        kiln.save("x", b"")


def test_log_from_a_worker_thread_reaches_the_open_run(settings: Settings) -> None:
    with kiln.App("a").run() as run:
        t = threading.Thread(target=lambda: kiln.log({"from_thread": 1.0}, step=0))
        t.start()
        t.join()
    assert kiln.get_run(run.id).summary == {"from_thread": 1.0}


def test_save_files_directories_and_bad_input(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "a.bin").write_bytes(b"a")
    (tmp_path / "ckpt" / "b.bin").write_bytes(b"bb")
    (tmp_path / "config.yaml").write_text("lr: 1\n")
    with kiln.App("a").run() as run:
        kiln.save("config.yaml", tmp_path / "config.yaml")
        kiln.save("ckpt", tmp_path / "ckpt")
        with pytest.raises(ValidationError, match="no file"):
            kiln.save("missing", tmp_path / "nope")
        with pytest.raises(ValidationError, match="name"):
            kiln.save("../escape", b"")
        with pytest.raises(ValidationError, match="pickled"):
            kiln.save("lock", threading.Lock())
    record = kiln.get_run(run.id)
    assert sorted(a.name for a in record.artifacts) == ["ckpt/a.bin", "ckpt/b.bin", "config.yaml"]
    assert record.load("config.yaml") == b"lr: 1\n"
    assert record.artifact_path("ckpt/b.bin").read_bytes() == b"bb"


def test_identical_artifacts_are_stored_once(settings: Settings) -> None:
    app = kiln.App("a")
    for _ in range(3):
        with app.run():
            kiln.save("weights", b"same bytes")
    blobs = [p for p in settings.blob_dir.rglob("*") if p.is_file()]
    shas = {a.sha256 for r in kiln.runs() for a in r.artifacts}
    assert len(shas) == 1 and sum(p.name == next(iter(shas))[2:] for p in blobs) == 1


def test_dataset_created_inside_a_run_is_an_input(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("x")
    with kiln.App("a").run() as run:
        ds = kiln.Dataset(tmp_path / "d")
    (recorded,) = kiln.get_run(run.id).datasets
    assert recorded.sha256 == ds.sha256 and recorded.size == 1
    with pytest.raises(ValidationError, match="path"):
        kiln.Dataset(tmp_path / "missing")


def test_query_orders_by_summary_metric_and_filters(settings: Settings) -> None:
    app = kiln.App("sweep")
    for lr, acc in [(0.1, 0.7), (0.2, 0.9), (0.3, 0.8)]:
        with app.run(params={"lr": lr}) as run:
            kiln.log({"accuracy": acc})
    with pytest.raises(RuntimeError), app.run(params={"lr": 0.4}):
        raise RuntimeError("diverged")
    best = kiln.runs(app="sweep", order_by="-accuracy", limit=2)
    assert [r.params["lr"] for r in best] == [0.2, 0.3]
    assert [r.params["lr"] for r in app.runs(status="failed")] == [0.4]
    assert [r.params["lr"] for r in kiln.runs(params={"lr": 0.1})] == [0.1]
    assert kiln.get_run(run.id[:10]).id == run.id
    with pytest.raises(ValidationError, match="status"):
        kiln.runs(status="done")
    with pytest.raises(ValidationError, match="limit"):
        kiln.runs(limit=-1)


def test_saved_objects_round_trip_through_pickle(settings: Settings) -> None:
    with kiln.App("a").run() as run:
        kiln.save("obj", {"k": [1, 2]})
    path = kiln.get_run(run.id).artifact_path("obj")
    assert pickle.loads(path.read_bytes()) == {"k": [1, 2]}


tensors = kiln.App("tensors")


@tensors.function()
def scores(acc: float) -> dict[str, Any]:
    """Returns what a torch training loop returns: tensors and numpy scalars."""
    kiln.log({"loss": torch.tensor(1.0 - acc)})
    return {"acc": torch.tensor(acc), "f1": np.float32(0.5), "hist": torch.zeros(3)}


def test_tensor_and_numpy_results_become_summary_metrics(settings: Settings) -> None:
    # the engine: the caller is warned about the one entry that cannot be recorded
    with pytest.warns(RecordingWarning, match=r"result\['hist'\] \(torch.Tensor of shape \(3,\)\)"):
        value = scores.remote(0.75)
    assert isinstance(value["hist"], torch.Tensor)  # the caller still gets everything
    sweep = scores.sweep(kiln.grid(acc=[0.25, 0.5])).wait()
    best = sweep.best("acc")
    assert best.summary == {"acc": 0.5, "f1": 0.5, "loss": 0.5}
    assert best.result == {"acc": 0.5, "f1": 0.5, "hist": "<torch.Tensor, not recorded>"}
    # a sweep's results are never fetched here: each record says what it left out
    store = recorder_for(settings).store
    for run in sweep.runs:
        (event,) = store.audit_events(action="run.warning", target=run.id, limit=None)
        assert (
            "cannot record result['hist'] (torch.Tensor" in json.loads(event["payload"])["message"]
        )
    # in this process: .local() and a run by hand, warned at the caller's line
    with pytest.warns(RecordingWarning, match=r"result\['hist'\]") as caught:
        scores.local(0.25)
    assert caught[0].filename == __file__
    grid = r"result\['grid'\] \(numpy.ndarray"
    with tensors.run() as run, pytest.warns(RecordingWarning, match=grid):
        run.set_result({"acc": np.float64(0.5), "n": np.int64(3), "grid": np.ones((2, 2))})
    assert kiln.get_run(run.id).summary == {"acc": 0.5, "n": 3.0}


def test_volatile_metrics_are_recorded_and_marked(settings: Settings) -> None:
    with kiln.App("a").run() as run:
        kiln.log({"loss": 0.5, "epoch_s": 1.5}, step=0)
        kiln.log({"epoch_s": 1.25, "throughput": torch.tensor(10.0)}, volatile=True)
        kiln.log({"loss": 0.25}, volatile=False)
        with pytest.raises(ValidationError, match="volatile"):
            kiln.log({"x": 1.0}, volatile="yes")  # type: ignore[arg-type]
        run.set_result({"loss": 0.25, "throughput": 11.0})
    record = kiln.get_run(run.id)
    assert record.volatile_metrics == ("epoch_s", "throughput")
    assert record.summary == {"loss": 0.25, "epoch_s": 1.25, "throughput": 11.0}
    assert record.to_dict()["volatile_metrics"] == ["epoch_s", "throughput"]


def test_volatile_marks_travel_in_bundles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.record import recorder
    from kiln.record.bundle import export_bundle, import_bundle

    with kiln.App("a").run() as marked:
        kiln.log({"time_s": 1.0}, volatile=True)
    with kiln.App("a").run() as plain:  # as every run recorded before volatile marks
        kiln.log({"loss": 1.0})
    rec = recorder.recorder_for(Settings.from_env())
    assert "volatile_metrics" not in rec.store.export_rows(plain.id)["run"]
    bundles = {run.id: tmp_path / f"{run.id}.kiln" for run in (marked, plain)}
    for run_id, path in bundles.items():
        export_bundle(rec.store, rec.blobs, run_id, path)
    recorder.close_all()

    monkeypatch.setenv("KILN_HOME", str(tmp_path / "elsewhere"))
    rec = recorder.recorder_for(Settings.from_env())
    for path in bundles.values():
        assert import_bundle(rec.store, rec.blobs, path)[1]
        assert not import_bundle(rec.store, rec.blobs, path)[1]  # twice: nothing to do
    assert kiln.get_run(marked.id).volatile_metrics == ("time_s",)
    assert kiln.get_run(plain.id).volatile_metrics == ()
