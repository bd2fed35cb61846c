"""kiln reproduce without a commit to check out: a fresh `git init`, no git, a lost repo."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kiln
from kiln.config import Settings
from kiln.record.recorder import recorder_for
from kiln.record.store.base import WriteBatch
from kiln.record.store.rows import RunUpdate
from kiln.reproduce import ReproduceError, reproduce

TRAIN = """
import kiln
from helper import SCALE

app = kiln.App("fresh")


@app.function()
def train(lr: float) -> dict:
    return {"loss": lr * SCALE}


if __name__ == "__main__":
    run = train.spawn(lr=0.5)
    run.wait()
    print(run.id)
"""


def record_a_run(folder: Path) -> str:
    (folder / "helper.py").write_text("SCALE = 3\n")  # a sibling module the run imports
    (folder / "train.py").write_text(TRAIN)
    proc = subprocess.run(
        [sys.executable, "train.py"], cwd=folder, capture_output=True, text=True,
        env=os.environ.copy(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()[-1]


def test_a_run_in_a_repository_with_no_commits_is_reproduced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "fresh"
    folder.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    run_id = record_a_run(folder)
    assert kiln.get_run(run_id).code.commit is None
    (folder / "helper.py").write_text("SCALE = 1000\n")  # edited since: the record wins

    with caplog.at_level(logging.WARNING, logger="kiln"):
        result = reproduce(run_id)
    assert result.verdict == "identical", kiln.get_run(result.reproduction).error
    assert "recorded in a repository with no commits" in caplog.text
    assert "reproducing from its recorded patch" in caplog.text
    assert "is gone" not in caplog.text


def test_a_run_outside_git_is_reproduced_from_its_module_source(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    run_id = record_a_run(folder)
    (folder / "train.py").write_text("raise SystemExit('not this version')\n")
    with caplog.at_level(logging.WARNING, logger="kiln"):
        result = reproduce(run_id)
    assert result.verdict == "identical", kiln.get_run(result.reproduction).error
    assert "recorded outside a git repository; reproducing from its recorded module source" in (
        caplog.text
    )


def test_without_any_record_of_the_code_the_error_says_what_is_missing(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    run_id = record_a_run(folder)
    code = {"module_path": str(folder / "train.py"), "repo_root": str(tmp_path / "gone"),
            "commit": "0" * 40}  # fmt: skip
    recorder_for(Settings.from_env()).store.write(
        WriteBatch(updates=[RunUpdate(id=run_id, code=code)])
    )
    with pytest.raises(ReproduceError, match=r"repository .*gone is gone, and its module source"):
        reproduce(run_id)


def test_a_function_in_a_package_imports_its_recorded_siblings(tmp_path: Path) -> None:
    folder = tmp_path / "proj"
    (folder / "pkg").mkdir(parents=True)
    (folder / "pkg" / "__init__.py").write_text("")
    (folder / "pkg" / "helper.py").write_text("SCALE = 3\n")
    model = TRAIN.replace("from helper import SCALE", "from pkg.helper import SCALE")
    (folder / "pkg" / "model.py").write_text(model.split("if __name__")[0])
    (folder / "main.py").write_text(
        "from pkg.model import train\nrun = train.spawn(lr=0.5)\nrun.wait()\nprint(run.id)\n"
    )
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    subprocess.run(["git", "add", "pkg", "main.py"], cwd=folder, check=True)
    subprocess.run([*git, "commit", "-qm", "one"], cwd=folder, check=True)
    proc = subprocess.run(
        [sys.executable, "main.py"], cwd=folder, capture_output=True, text=True,
        env=os.environ.copy(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.split()[-1]
    (folder / "pkg" / "helper.py").write_text("SCALE = 1000\n")  # edited since: the record wins

    result = reproduce(run_id)
    assert result.verdict == "identical", kiln.get_run(result.reproduction).error
