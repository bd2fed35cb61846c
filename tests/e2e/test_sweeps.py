"""Sweeps as a user meets them: waiting, fixed arguments, ties, Ctrl-C, resume, removal;
and any run handle, record or id prefix wherever a run is taken."""

from __future__ import annotations

import json
import signal
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from typer.testing import CliRunner

import kiln
from kiln.cli import app as cli
from kiln.errors import DependencyError, RunFailed, ValidationError

MODULE = """
import os
from pathlib import Path
import kiln

app = kiln.App("sweeps")


@app.function(cpu=1)
def score(x: int, scale: float = 1.0, data: kiln.Dataset | None = None) -> dict:
    gate = Path(os.environ["SWEEP_GATE"])
    (gate / f"started-{x}").touch()
    if (gate / "block").exists():
        for _ in range(600):  # until cancelled, or released
            if not (gate / "block").exists():
                break
            __import__("time").sleep(0.05)
    if (gate / f"fail-{x}").exists():
        raise ValueError(f"x={x} is not allowed today")
    kiln.save("model.txt", f"{x}".encode())
    rows = len(data.path.read_text().split()) if data is not None else 0
    return {"tied": 1.0, "score": x * scale, "rows": rows}
"""


@pytest.fixture
def mod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """A module of the user's, importable by name (so `kiln runs resume` can import it)."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "sweepmod.py").write_text(textwrap.dedent(MODULE))
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv("SWEEP_GATE", str(gate))
    monkeypatch.syspath_prepend(str(code))
    import importlib

    module = importlib.import_module("sweepmod")
    module.gate = gate  # type: ignore[attr-defined]
    yield module
    import sys

    sys.modules.pop("sweepmod", None)


def test_a_sweep_returns_at_once_and_everything_that_reads_it_waits(mod: ModuleType) -> None:
    sweep = mod.score.sweep(kiln.grid(x=[1, 2, 3]))
    # kiln.runs(parent=<a live sweep>) waits for it, so pareto sees every result
    front = kiln.pareto(kiln.runs(parent=sweep, limit=None), maximize=["score"])
    assert [r.params["x"] for r in front] == [3]
    parent = kiln.get_run(sweep)  # the sweep's end is recorded once wait() returns
    assert parent.status is kiln.RunStatus.SUCCEEDED
    assert parent.result == {"runs": 3, "succeeded": 3, "failed": 0, "cancelled": 0}
    assert [r.params["x"] for r in sweep.records()] == [1, 2, 3]
    assert [row["x"] for row in sweep.table()] == [1, 2, 3]


def test_fixed_arguments_go_to_every_run(mod: ModuleType, tmp_path: Path) -> None:
    data = tmp_path / "rows.txt"
    data.write_text("a b c")
    ds = kiln.Dataset(data)
    sweep = mod.score.sweep(kiln.grid(x=[1, 2]), scale=10.0, data=ds)
    assert [r["score"] for r in sweep.results()] == [10.0, 20.0]
    for record in sweep.records():
        assert record.params["scale"] == 10.0 and record.summary["rows"] == 3
        assert [a.sha256 for a in record.datasets] == [ds.sha256]
    with pytest.raises(ValidationError, match=r"spec\[0\]\.x: is also given as a fixed"):
        mod.score.sweep(kiln.grid(x=[1]), x=2)


def test_best_among_ties_is_the_first_in_the_grid(mod: ModuleType) -> None:
    grid = kiln.grid(x=[5, 4, 3, 2, 1, 0])
    sweep = mod.score.sweep(grid)
    assert sweep.best("tied").params["x"] == 5  # all tie: the first created wins
    assert sweep.best("tied", mode="min").params["x"] == 5
    assert sweep.best("score", mode="min").params["x"] == 0
    listed = CliRunner().invoke(
        cli, ["runs", "best", "-m", "tied", "--sweep", sweep.id[:10], "--json"]
    )
    assert json.loads(listed.output)["params"]["x"] == 5


def interrupt_once_started(gate: Path, count: int) -> threading.Thread:
    """Ctrl-C for this process once ``count`` runs have started (as a terminal would)."""

    main = threading.main_thread().ident
    assert main is not None

    def watch() -> None:
        while len(list(gate.glob("started-*"))) < count:
            threading.Event().wait(0.02)
        # To the main thread, which waits: sent to the process, the kernel may hand it to
        # any thread (Ray's and the drivers' C threads too), and the main thread's wait
        # would not be interrupted.
        signal.pthread_kill(main, signal.SIGINT)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_cancels_the_sweep_and_resume_reruns_what_did_not_succeed(
    mod: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    (mod.gate / "block").touch()
    sweep = mod.score.sweep(kiln.grid(x=[1, 2, 3, 4]))  # cpu=1 on 2 cores: 2 wait in line
    interrupt_once_started(mod.gate, 1)
    with pytest.raises(KeyboardInterrupt):
        sweep.wait()
    said = capsys.readouterr().err
    assert f"interrupted: sweep {sweep.id[:8]} cancelled" in said
    assert f"kiln runs resume {sweep.id[:8]}" in said
    parent = kiln.get_run(sweep.id)
    assert parent.status is kiln.RunStatus.CANCELLED
    assert parent.result["cancelled"] >= 1
    old = {r.id: r.status for r in kiln.runs(parent=sweep.id, limit=None)}
    assert kiln.RunStatus.CANCELLED in old.values()

    (mod.gate / "block").unlink()
    (mod.gate / "fail-4").touch()
    sweep.resume().wait()
    current = sweep.records()
    assert [r.params["x"] for r in current] == [1, 2, 3, 4]
    resumed = [r for r in current if r.id not in old]
    assert resumed and all(old[r.tags["resumes"]] is not kiln.RunStatus.SUCCEEDED for r in resumed)
    assert all(r.id in old for r in current if old.get(r.id) is kiln.RunStatus.SUCCEEDED)
    assert len(kiln.runs(parent=sweep.id, limit=None)) == 4 + len(resumed)  # old ones kept
    assert kiln.get_run(sweep.id).status is kiln.RunStatus.FAILED  # x=4 failed this time

    # from the command line: only x=4 is run again, imported from its module
    (mod.gate / "fail-4").unlink()
    result = CliRunner().invoke(cli, ["runs", "resume", sweep.id[:10], "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["status"] == "succeeded" and len(report["resumed"]) == 1
    assert kiln.get_run(report["resumed"][0]).params["x"] == 4
    again = CliRunner().invoke(cli, ["runs", "resume", sweep.id[:10]])
    assert "nothing to do" in again.output


def test_kiln_runs_resume_refuses_a_run_that_is_not_a_sweep(mod: ModuleType) -> None:
    run = mod.score.spawn(1)
    run.wait()
    result = CliRunner().invoke(cli, ["runs", "resume", run.id])
    assert result.exit_code != 0 and "is not a sweep" in str(result.exception)


def test_any_run_is_taken_wherever_a_run_is_taken(mod: ModuleType) -> None:
    app = kiln.App("sweeps")
    run = mod.score.spawn(3)  # a handle, not yet ended: register waits for it
    first = app.models.register("m", run, artifact="model.txt")
    assert first.run_id == run.id
    assert app.models.register("m", run.id[:8], artifact="model.txt").run_id == run.id
    assert app.models.register("m", run.record(), artifact="model.txt").run_id == run.id
    assert kiln.get_run(run).id == kiln.get_run(run.id[:8]).id == run.id
    assert run.id in run.lineage().runs
    for bad in (3, None, ["x"]):
        with pytest.raises(ValidationError, match=r"^run: .* is not a run"):
            app.models.register("m", bad, artifact="model.txt")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="parent"):
        kiln.runs(parent=42)  # type: ignore[arg-type]
    sweep = mod.score.sweep([{"x": 1}])
    with pytest.raises(ValidationError, match=r"is a sweep, not a model's run.*sweep\.best"):
        app.models.register("m", sweep, artifact="model.txt")


def test_remote_tracebacks_name_the_file(tmp_path: Path) -> None:
    app = kiln.App("tracebacks")

    @app.function()  # a closure: shipped by value, not imported by name
    def broken() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RunFailed) as info:
        broken.remote()
    assert info.value.traceback is not None
    assert f'File "{__file__}"' in info.value.traceback
    assert "<dynamic-code>" not in info.value.traceback


def test_runs_rm_asks_and_removes_a_sweep_with_its_runs(mod: ModuleType) -> None:
    sweep = mod.score.sweep(kiln.grid(x=[1, 2]))
    sweep.wait()
    runner = CliRunner()
    refused = runner.invoke(cli, ["runs", "rm", sweep.id])  # not a terminal: --yes needed
    assert refused.exit_code != 0 and "--yes" in str(refused.exception)
    kiln.App("sweeps").models.register("kept", sweep.runs[1], artifact="model.txt")
    blocked = runner.invoke(cli, ["runs", "rm", sweep.id, "--yes"])
    assert isinstance(blocked.exception, DependencyError)
    assert f"its run {sweep.runs[1].id}: model kept:1 was made by it" in str(blocked.exception)
    assert len(kiln.runs(parent=sweep.id, limit=None)) == 2  # nothing removed

    other = mod.score.sweep(kiln.grid(x=[1, 2]))
    other.wait()
    removed = runner.invoke(cli, ["runs", "rm", other.id[:10], "--yes", "--json"])
    assert removed.exit_code == 0, removed.output
    assert set(json.loads(removed.output)["removed"]) == {other.id, *(r.id for r in other.runs)}
    assert kiln.runs(parent=sweep.id, limit=None) != []
    ids = {r.id for r in kiln.runs(app="sweeps", limit=None)}
    assert not ids & {other.id, *(r.id for r in other.runs)}
