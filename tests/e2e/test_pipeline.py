"""The acceptance path: a two-step pipeline, lineage, reproduce, export, import, verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kiln
from conftest import ServerProcess
from kiln.cli import app as cli
from kiln.record import recorder
from kiln.record.bundle import verify
from kiln.reproduce import ReproduceError, reproduce

PIPELINE = """
import json, sys
from pathlib import Path
import kiln

app = kiln.App("pipeline")


@app.function()
def prepare(n: int, out: str) -> dict:
    Path(out).write_text(" ".join(str(i * i) for i in range(n)))
    kiln.save("data.csv", Path(out))
    return {"rows": n}


@app.function()
def train(data: kiln.Dataset, lr: float) -> dict:
    values = [int(x) for x in data.path.read_text().split()]
    loss = sum(values) * lr
    kiln.log({"loss": loss}, step=0)
    kiln.save("model.json", json.dumps({"w": loss}).encode())
    return {"loss": loss}


if __name__ == "__main__":
    n, lr, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    first = prepare.spawn(n, out)
    first.result()
    second = train.spawn(kiln.Dataset(out), lr)
    second.result()
    print(first.id, second.id)
"""


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                   check=True, capture_output=True)  # fmt: skip


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "pipeline.py").write_text(textwrap.dedent(PIPELINE))
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "pipeline")
    with (root / "pipeline.py").open("a") as f:  # an uncommitted change: it goes in the patch
        f.write("\n# tuned after the commit\n")
    return root


def run_pipeline(repo: Path, n: int, lr: float) -> tuple[str, str]:
    out = subprocess.run(
        [sys.executable, "pipeline.py", str(n), str(lr), str(repo / f"data-{n}.txt")],
        cwd=repo, capture_output=True, text=True, timeout=120, env=os.environ.copy(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    prepare, train = out.stdout.split()
    return prepare, train


@pytest.mark.parametrize("record", ["embedded", "server"])
def test_pipeline_lineage_reproduce_and_bundle(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: str,
    start_server: Callable[..., ServerProcess],
) -> None:  # fmt: skip
    """Once on the embedded store, once through a real ``kiln server`` (KILN_SERVER)."""
    if record == "server":
        monkeypatch.setenv("KILN_SERVER", start_server().url)
    prep1, train1 = run_pipeline(repo, 10, 0.1)
    prep2, train2 = run_pipeline(repo, 12, 0.2)

    # lineage: each training run comes from its own preparation
    graph = kiln.get_run(train1).lineage()
    assert prep1 in graph.runs and prep2 not in graph.runs
    assert kiln.get_run(train2).lineage().runs.keys() >= {prep2, train2}
    code = kiln.get_run(train1).code
    assert code.commit and code.patch_sha256  # committed code plus the uncommitted change

    # reproduce: the recorded code (commit + patch, in a worktree), params, data
    result = reproduce(train1)
    assert result.verdict == "identical", kiln.get_run(result.reproduction).error
    assert result.params_identical and result.metrics["loss"][2] == 0.0
    assert all(old == new for old, new in result.artifacts.values())
    again = kiln.get_run(result.reproduction)
    assert again.tags == {"reproduced_from": train1, "reproduce_verdict": "identical"}
    assert kiln.runs(tags={"reproduced_from": train1})[0].id == again.id
    # reproductions are left out of listings unless asked for
    assert again.id not in {r.id for r in kiln.runs(app="pipeline", limit=None)}
    assert again.id in {r.id for r in kiln.runs(app="pipeline", limit=None, reproductions=True)}
    listed = CliRunner().invoke(cli, ["runs", "ls", "--json", "-n", "50"])
    assert again.id not in {r["id"] for r in json.loads(listed.output)}
    listed = CliRunner().invoke(cli, ["runs", "ls", "--json", "-n", "50", "--reproductions"])
    assert again.id in {r["id"] for r in json.loads(listed.output)}

    # data drift is an error unless allowed, then reported
    (repo / "data-10.txt").write_text("1\n2\n3")
    with pytest.raises(ReproduceError, match="changed since the run"):
        reproduce(train1)
    drifted = reproduce(train1, allow_data_drift=True)
    assert drifted.data_drift == ["data"] and drifted.verdict == "different"
    best = ["runs", "best", "-m", "loss", "--mode", "min", "--json"]
    assert json.loads(CliRunner().invoke(cli, best).output)["id"] == train1
    shown = CliRunner().invoke(cli, [*best, "--reproductions"]).output
    assert json.loads(shown)["id"] == drifted.reproduction  # less loss: on less data

    # bundle: export, import into a fresh store, verify; any flipped byte fails
    bundle = tmp_path / "train.kiln"
    assert CliRunner().invoke(cli, ["export", train1, "-o", str(bundle)]).exit_code == 0
    recorder.close_all()
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "fresh"))
    imported = CliRunner().invoke(cli, ["import", str(bundle)])
    assert imported.exit_code == 0, imported.output
    assert kiln.get_run(train1).summary == {"loss": 28.5}
    audited = CliRunner().invoke(cli, ["audit", "verify"])
    assert audited.exit_code == 0, audited.output
    assert verify(bundle) == []
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bundle.write_bytes(bytes(data))
    assert verify(bundle)


def test_reproduce_cli_and_runs_recorded_by_hand(repo: Path) -> None:
    _, train = run_pipeline(repo, 5, 1.0)
    result = CliRunner().invoke(cli, ["reproduce", train[:10]])
    assert result.exit_code == 0, result.output
    assert "verdict: identical" in result.output and "loss" in result.output
    with kiln.App("manual").run() as by_hand:
        pass
    with pytest.raises(ReproduceError, match="recorded by hand"):
        reproduce(by_hand.id)
