"""The ``kiln`` command as users and agents meet it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kiln
from kiln.cli import app as cli
from kiln.cli._render import STATUS_STYLE
from kiln.config import Settings


def kiln_cmd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiln", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


@pytest.fixture
def three_runs() -> list[str]:
    app = kiln.App("cli")
    ids = []
    for lr, acc in [(0.1, 0.7), (0.2, 0.9), (0.3, 0.8)]:
        with app.run(params={"lr": lr, "opt": "sgd"}, tags={"grid": "g1"}) as run:
            kiln.log({"acc": acc, "loss": 1 - acc})
            kiln.save("model.bin", b"m")
        ids.append(run.id)
    return ids


def test_runs_ls_json_is_ordered_and_filtered(three_runs: list[str]) -> None:
    result = CliRunner().invoke(cli, ["runs", "ls", "--json", "-o", "-acc"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [r["id"] for r in listed] == [three_runs[1], three_runs[2], three_runs[0]]
    assert listed[0]["summary"] == {"acc": 0.9, "loss": pytest.approx(0.1)}
    result = CliRunner().invoke(cli, ["runs", "ls", "--json", "-p", "lr=0.1", "-t", "grid=g1"])
    assert [r["id"] for r in json.loads(result.output)] == [three_runs[0]]


def test_runs_ls_table_shows_ids_and_metrics(three_runs: list[str]) -> None:
    result = CliRunner().invoke(cli, ["runs", "ls", "-o", "-acc", "-n", "2"])
    assert result.exit_code == 0, result.output
    assert three_runs[1][:8] in result.output and three_runs[2][:8] in result.output
    assert three_runs[0][:8] not in result.output
    assert "acc" in result.output and "lr=0.2" in result.output


def test_runs_show_has_the_whole_record(three_runs: list[str]) -> None:
    result = CliRunner().invoke(cli, ["runs", "show", three_runs[0][:6]])
    assert result.exit_code == 0, result.output
    for text in (three_runs[0], "lr", "0.1", "model.bin", "code", "environment", "succeeded"):
        assert text in result.output
    data = json.loads(CliRunner().invoke(cli, ["runs", "show", three_runs[0], "--json"]).output)
    assert data["params"] == {"lr": 0.1, "opt": "sgd"}
    assert data["artifacts"][0]["name"] == "model.bin"
    assert data["environment"]["python"]


def test_runs_compare_marks_what_differs(three_runs: list[str]) -> None:
    result = CliRunner().invoke(cli, ["runs", "compare", *three_runs[:2], "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["runs"] == three_runs[:2]
    assert data["params"]["lr"] == {"values": [0.1, 0.2], "differs": True}
    assert data["params"]["opt"] == {"values": ["sgd", "sgd"], "differs": False}
    assert data["metrics"]["acc"]["differs"] is True
    table = CliRunner().invoke(cli, ["runs", "compare", *three_runs])
    assert table.exit_code == 0 and "lr" in table.output


def one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_run_id_is_one_clear_line(three_runs: list[str]) -> None:
    one_error_line(kiln_cmd("runs", "show", "ffffffff"), "no run with id 'ffffffff'")


def test_missing_store_is_one_clear_line() -> None:
    one_error_line(kiln_cmd("runs", "ls"), "no store here yet")
    assert not Settings.from_env().home.exists(), "a read must not create a store"


def test_corrupt_store_is_reported_and_left_untouched(tmp_path: Path) -> None:
    home = Settings.from_env().home
    home.mkdir(parents=True)
    garbage = b"this is not sqlite" * 100
    (home / "kiln.db").write_bytes(garbage)
    one_error_line(kiln_cmd("runs", "ls"), "file is not a database", "move the file aside")
    assert (home / "kiln.db").read_bytes() == garbage


def test_unreachable_postgres_is_one_clear_line() -> None:
    url = "postgresql+psycopg://nobody:secret@127.0.0.1:1/none"
    proc = kiln_cmd("runs", "ls", env={"KILN_STORE": url})
    one_error_line(proc, "cannot be reached", "127.0.0.1:1")
    assert "secret" not in proc.stderr


def test_bad_setting_is_one_clear_line() -> None:
    one_error_line(kiln_cmd("runs", "ls", env={"KILN_STORE": "mongodb://x"}), "KILN_STORE")


def test_param_that_cannot_be_json_fails_before_recording(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text("import kiln\nkiln.App('x').run(params={'f': object()})\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert proc.returncode == 1 and "params.f: a object cannot be stored as JSON" in proc.stderr
    assert not (Settings.from_env().home / "kiln.db").exists()


def test_demo_records_a_real_experiment() -> None:
    proc = kiln_cmd("demo", "--epochs", "4")
    assert proc.returncode == 0, proc.stderr
    assert "6 runs recorded" in proc.stdout and "best run" in proc.stdout
    (sweep,) = kiln.runs(app="demo", tags={"kind": "sweep"})
    assert sweep.status is kiln.RunStatus.SUCCEEDED
    records = kiln.runs(parent=sweep.id, order_by="-val_accuracy", limit=None)
    assert len(records) == 6
    assert {r.engine for r in records} == {"local"}
    best = records[0]
    assert best.summary["val_accuracy"] == max(r.summary["val_accuracy"] for r in records)
    assert best.id in proc.stdout
    assert len(best.metric_history("val_accuracy")) == 4
    assert {a.name for a in best.artifacts} >= {"model.pkl"}
    assert best.datasets[0].sha256 == best.params["data"]["sha256"]
    model = best.artifact("model.pkl")
    assert model.kind == "pickle" and model.size > 1000
    assert best.environment.env_id and best.resources["env"]["packages"] == ["scikit-learn>=1.4"]
    assert "registered digits:1" in proc.stdout
    production = kiln.App("demo").models.get("digits@production")
    assert production.run_id == best.id and production.artifact == "model.pkl"
    (producer,) = best.lineage().upstream(best.datasets[0].sha256)
    assert kiln.get_run(producer).function == "kiln._demo:prepare"
    # It ends by serving the promoted model and explaining one answer.
    assert proc.stdout.count("POST /predict -> {'digit'") == 5
    assert "kiln why " in proc.stdout and f"run {best.id}" in proc.stdout
    assert "promoted to @production" in proc.stdout and "lock sha256:" in proc.stdout
    assert "cold start" in proc.stderr


TRAIN_SCRIPT = """
import kiln

app = kiln.App("cli-run")


@app.function(cpu=1)
def train(lr: float, depth: int = 3, deep: bool = False, name: str = "m") -> dict:
    kiln.log({"loss": lr * depth})
    return {"score": lr * depth, "deep": deep, "name": name}


def plain(x: int) -> int:
    return x + 1
"""


def test_kiln_run_parses_arguments_by_annotation(tmp_path: Path) -> None:
    (tmp_path / "jobs.py").write_text(TRAIN_SCRIPT)
    target = f"{tmp_path / 'jobs.py'}::train"
    proc = kiln_cmd("run", target, "--lr", "0.5", "--depth=4", "--deep", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["params"] == {"lr": 0.5, "depth": 4, "deep": True, "name": "m"}
    assert data["value"] == {"score": 2.0, "deep": True, "name": "m"}
    assert data["status"] == "succeeded" and data["summary"]["loss"] == 2.0
    plain = kiln_cmd("run", f"{tmp_path / 'jobs.py'}::plain", "--x", "41")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip().endswith("42")


def test_kiln_run_refuses_bad_arguments_before_running(tmp_path: Path) -> None:
    (tmp_path / "jobs.py").write_text(TRAIN_SCRIPT)
    target = f"{tmp_path / 'jobs.py'}::train"
    one_error_line(kiln_cmd("run", target, "--lr", "fast"), "--lr", "is not a float")
    one_error_line(kiln_cmd("run", target, "--depth", "2"), "--lr", "is required")
    one_error_line(kiln_cmd("run", target, "--lr", "1", "--epochs", "2"), "--epochs", "--depth")
    one_error_line(kiln_cmd("run", f"{tmp_path / 'jobs.py'}::nope"), "no 'nope'")
    one_error_line(kiln_cmd("run", "jobs.py"), "FILE.py::FUNCTION")
    assert not (Settings.from_env().home / "kiln.db").exists()


def test_runs_ls_filters_by_sweep(three_runs: list[str]) -> None:
    app = kiln.App("cli")

    @app.function()
    def square(x: int) -> dict:
        return {"sq": x * x}

    sweep = square.sweep([{"x": 2}, {"x": 3}])
    sweep.wait()
    result = CliRunner().invoke(cli, ["runs", "ls", "--sweep", sweep.id[:10], "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert sorted(r["params"]["x"] for r in listed) == [2, 3]
    assert {r["parent_id"] for r in listed} == {sweep.id}


def test_the_table_shows_every_status() -> None:
    from kiln.record.recorder import recorder_for
    from kiln.record.store.base import WriteBatch
    from kiln.record.store.rows import RunRow

    store = recorder_for(Settings.from_env()).store
    rows = [
        RunRow(id=f"{i:032x}", app="st", status=status, created_at=float(i))
        for i, status in enumerate(kiln.RunStatus, start=1)
    ]
    store.write(WriteBatch(new_runs=rows))
    result = CliRunner().invoke(cli, ["runs", "ls", "--app", "st"])
    assert result.exit_code == 0, result.output
    for status in kiln.RunStatus:
        assert str(status) in result.output
    assert set(kiln.RunStatus) == set(STATUS_STYLE)


def test_models_commands(three_runs: list[str]) -> None:
    models = kiln.App("cli").models
    for run_id in three_runs:
        models.register("churn", run_id, artifact="model.bin")
    runner = CliRunner()
    assert (
        runner.invoke(cli, ["models", "promote", "churn", "2", "--reason", "better"]).exit_code == 0
    )
    assert runner.invoke(cli, ["models", "promote", "churn", "3"]).exit_code == 0
    assert runner.invoke(cli, ["models", "rollback", "churn"]).exit_code == 0
    listed = json.loads(runner.invoke(cli, ["models", "ls", "--json"]).output)
    assert listed == [{"name": "churn", "versions": 3, "latest": 3, "aliases": {"production": 2}}]
    shown = json.loads(runner.invoke(cli, ["models", "show", "churn@production", "--json"]).output)
    assert shown["versions"][0]["run_id"] == three_runs[1]
    history = json.loads(runner.invoke(cli, ["models", "history", "churn", "--json"]).output)
    assert [(m["from_version"], m["to_version"]) for m in history] == [(None, 2), (2, 3), (3, 2)]
    table = runner.invoke(cli, ["models", "show", "churn"])
    assert table.exit_code == 0 and "production" in table.output
    bad = runner.invoke(cli, ["models", "promote", "churn", "9"])
    assert bad.exit_code != 0 and "no version 9" in str(bad.exception)
