"""A deterministic PyTorch run is reproduced bit for bit and passes a ``reproduced`` gate.

The training function seeds torch, trains a tiny MLP on synthetic data, saves its
state_dict (as an object, and as ``torch.save`` bytes), logs its training time and
returns 0-d tensors.
The time differs on every run: declared volatile it is shown but does not make
the reproduction "different"; left undeclared, ``--ignore-metric`` or a policy's
``ignore_metrics`` leaves it out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kiln
from kiln.cli import app as cli
from kiln.registry.policy import PolicyError
from kiln.reproduce import reproduce

TRAIN = """
import io
import sys
import time

import torch

import kiln

app = kiln.App("digits")


@app.function(cpu=1)
def train(seed: int, epochs: int, volatile_time: bool = True) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    x = torch.randn(128, 8)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for epoch in range(epochs):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        kiln.log({"loss": loss.detach()}, step=epoch)
    acc = (model(x).argmax(1) == y).float().mean()
    kiln.save("model", model.state_dict())  # pickled by kiln
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    kiln.save("model.pt", buf.getvalue())  # torch.save bytes
    kiln.log({"train_time_s": time.perf_counter() - t0 + 1e-9}, volatile=volatile_time)
    return {"acc": acc, "loss": loss.detach()}  # 0-d tensors


if __name__ == "__main__":
    runs = [train.spawn(0, 30), train.spawn(0, 30, volatile_time=False)]
    for run in runs:
        run.result()
    print(*(run.id for run in runs))
"""


def git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def train(tmp_path: Path) -> list[str]:
    """Two runs of the training function (its time volatile, and not), in a process of
    their own, from committed code."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "train.py").write_text(textwrap.dedent(TRAIN))
    (root / ".gitignore").write_text("__pycache__/\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "train")
    out = subprocess.run(
        [sys.executable, "train.py"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_a_deterministic_torch_run_reproduces_and_is_promoted(tmp_path: Path) -> None:
    # one test, so that torch starts in one training process and one warm worker
    run_id, plain_id = train(tmp_path)
    original = kiln.get_run(run_id)
    assert original.volatile_metrics == ("train_time_s",)
    assert set(original.summary) == {"acc", "loss", "train_time_s"}  # tensors recorded
    app = kiln.App("digits")
    mv = app.models.register("digits", run_id, artifact="model.pt")
    app.models.set_policy("digits", "production", {"reproduced": True})
    with pytest.raises(PolicyError, match="no reproduction"):
        app.models.promote("digits", mv.version, alias="production")

    result = reproduce(run_id)
    assert result.verdict == "identical", kiln.get_run(result.reproduction).error
    assert result.ignored == ("train_time_s",) and "train_time_s" in result.metrics
    old_time, new_time, _ = result.metrics["train_time_s"]
    assert old_time != new_time  # shown, different, and not part of the verdict
    # the weights are the same bytes, pickled by kiln or written by torch.save
    assert result.artifacts["model"][0] == result.artifacts["model"][1]
    assert result.artifacts["model.pt"][0] == result.artifacts["model.pt"][1]
    assert result.to_dict()["metrics"]["train_time_s"]["ignored"] is True

    app.models.promote("digits", mv.version, alias="production", reason="reproduced")
    assert app.models.get("digits@production").version == mv.version

    # its twin's training time was not declared volatile: kiln reproduce exits 3 ...
    runner = CliRunner()
    different = runner.invoke(cli, ["reproduce", plain_id, "--json"])
    assert different.exit_code == 3, different.output
    comparison = json.loads(different.output)
    assert comparison["verdict"] == "different" and comparison["differences"] == ["train_time_s"]

    # ... unless the metric is left out
    ignored = runner.invoke(
        cli, ["reproduce", plain_id, "--ignore-metric", "train_time_s", "--ignore-metric", "nope"]
    )
    assert ignored.exit_code == 0, ignored.output
    assert "train_time_s (ignored)" in ignored.output
    assert "no metric nope in either run" in ignored.output
    assert "verdict: identical" in ignored.output

    # a policy can set its own terms: every reproduction is compared again under them
    mv = app.models.register("twin", plain_id, artifact="model.pt")
    app.models.set_policy("twin", "production", {"reproduced": {"ignore_metrics": ["nope"]}})
    with pytest.raises(PolicyError, match=r"ignoring nope\) \(seen: different, different\)"):
        app.models.promote("twin", mv.version, alias="production")
    app.models.set_policy(
        "twin", "production", {"reproduced": {"ignore_metrics": ["train_time_s"]}},
        weaken=True, reason="the timing is not part of the result",
    )  # fmt: skip
    app.models.promote("twin", mv.version, alias="production", reason="timing aside")
