"""Malformed command lines get one clear line naming the field, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import kiln
from kiln.record import recorder


@pytest.fixture
def run_id() -> str:
    with kiln.App("inputs").run(params={"a": 1}) as run:
        kiln.log({"x": 1.0}, step=0)
        kiln.save("m.pkl", {"w": 1})
    kiln.App("inputs").models.register("echo", run.id, artifact="m.pkl")
    recorder.close_all()
    return run.id


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["runs", "ls", "-n", "99999999999999999999"], "--limit"),
        (["runs", "ls", "-n", "0"], "--limit"),
        (["audit", "ls", "-n", "-5"], "--limit"),
        (["models", "show", "echo:²"], "ref"),
        (["models", "show", "echo:99999999999999999999"], "ref"),
        (["models", "show", "echo@prod\n"], "alias"),
        (["models", "register", "m\n", "RUN", "--artifact", "m.pkl"], "name"),
        (["export", "RUN", "-o", "/tmp"], "--output"),
        (["export", "RUN", "-o", ""], "--output"),
        (["serve", "/tmp:Cls"], "TARGET"),
        (["audit", "anchor", "--to", "/tmp"], "--to"),
        (["keys", "add", "k", "not-a-key"], "public_key"),
        (["export", "RUN", "-o", "OUT", "--sign", "nokey"], "--sign"),
    ],
)
def test_bad_input_is_one_clear_line(
    run_id: str, tmp_path: Path, args: list[str], named: str
) -> None:
    args = [run_id if a == "RUN" else str(tmp_path / "o.kiln") if a == "OUT" else a for a in args]
    done = subprocess.run(
        [sys.executable, "-m", "kiln", *args], capture_output=True, text=True, timeout=120
    )
    out = done.stdout + done.stderr
    assert done.returncode in (1, 2), out
    assert "Traceback" not in out and named in out, out


def test_names_with_a_newline_are_refused() -> None:
    with pytest.raises(kiln.errors.ValidationError, match="app"):
        kiln.App("ok\n")
