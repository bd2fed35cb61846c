"""Where runs are recorded: KILN_HOME found like git finds .git, and never snapshotted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import kiln
from kiln.config import Settings, find_home
from kiln.record.model import RunRecord

TRAIN = """
import kiln

app = kiln.App("home")


@app.function()
def train(lr: float) -> dict:
    return {"acc": lr}


if __name__ == "__main__":
    import sys
    run = train.spawn(lr=float(sys.argv[1]))
    run.wait()
    print(run.id)
"""


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def python(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("KILN_HOME", "KILN_STORE")}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True,
        env={**environ, **env}, timeout=120,
    )  # fmt: skip


def runs_of(home: Path) -> list[RunRecord]:
    return kiln.runs(settings=Settings.from_env({"KILN_HOME": str(home)}))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "src" / "train.py").write_text(TRAIN)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "train")
    return root


def test_runs_in_a_tree_that_does_not_ignore_kiln_home_stay_clean(project: Path) -> None:
    home = project / ".kiln"
    home.mkdir()  # made by the user: no .gitignore of Kiln's in it
    for lr in ("0.1", "0.2", "0.3"):  # one process each: nothing is reused between them
        proc = python(project, "src/train.py", lr, KILN_HOME="./.kiln")
        assert proc.returncode == 0, proc.stderr
    assert git(project, "status", "--porcelain").strip() == "?? .kiln/"  # git sees the store
    records = runs_of(home)
    assert len(records) == 3
    for record in records:
        assert not record.code.dirty and record.code.patch_sha256 is None, record.code


def test_runs_from_a_subfolder_land_in_the_projects_store(project: Path) -> None:
    proc = python(project, "src/train.py", "0.5")  # no .kiln yet: the work tree's root
    assert proc.returncode == 0, proc.stderr
    assert (project / ".kiln" / "kiln.db").is_file()
    assert (project / ".kiln" / ".gitignore").read_text().splitlines()[-1] == "*"
    assert git(project, "status", "--porcelain") == ""  # the store it made ignores itself

    proc = python(project / "src", "train.py", "0.7")  # from the subfolder
    assert proc.returncode == 0, proc.stderr
    assert not (project / "src" / ".kiln").exists()
    assert sorted(r.summary["acc"] for r in runs_of(project / ".kiln")) == [0.5, 0.7]


def test_no_store_here_says_where_it_looked(tmp_path: Path) -> None:
    folder = tmp_path / "empty" / "sub"
    folder.mkdir(parents=True)
    proc = python(folder, "-m", "kiln", "runs", "ls")
    assert proc.returncode == 1
    message = proc.stderr.strip()
    assert "no store here yet" in message, message
    assert str(folder / ".kiln" / "kiln.db") in message
    assert f"there is no .kiln folder in {folder} or any folder above it" in message


def test_the_search_stops_at_kiln_ceiling_directories(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    (shared / ".kiln").mkdir(parents=True)  # someone else's store, above the project
    project = shared / "me" / "project"
    (project / "sub").mkdir(parents=True)
    assert find_home(project / "sub")[0] == shared / ".kiln"  # without a ceiling
    home, origin = find_home(project / "sub", [shared / "me"])
    assert home == project / "sub" / ".kiln"  # not the store above the ceiling
    assert "below the ceiling" in origin and str(shared / "me") in origin
    proc = python(project / "sub", "-m", "kiln", "runs", "ls",
                  KILN_CEILING_DIRECTORIES=f"/nowhere:{shared / 'me'}")  # fmt: skip
    assert proc.returncode == 1 and str(project / "sub" / ".kiln") in proc.stderr
