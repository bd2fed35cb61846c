"""kiln.Sandbox: what it accepts, what the machine can give, and who must have one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import kiln
from kiln.config import Settings
from kiln.errors import ConfigError, SandboxError, ValidationError
from kiln.govern import sandbox as sb
from kiln.govern.sandbox import Detection, Sandbox, detect, required_for


def test_defaults_close_the_network_and_bound_processes() -> None:
    spec = Sandbox()
    assert (spec.network, spec.read, spec.write, spec.memory, spec.pids, spec.cpu_time) == (
        False, (), (), None, 64, None)  # fmt: skip
    assert "netns" in spec.required() and "netns" not in Sandbox(network=True).required()


def test_values_are_checked_and_normalised(tmp_path: Path) -> None:
    spec = Sandbox(read=[tmp_path / "a" / ".." / "b"], write=str(tmp_path), memory="512Mi",
                   cpu_time=3)  # fmt: skip
    assert spec.read == (str(tmp_path / "b"),) and spec.write == (str(tmp_path),)
    assert spec.memory_bytes == 512 * 2**20 and spec.cpu_time == 3.0
    assert Sandbox.from_json(spec.to_json()) == spec
    assert kiln.Sandbox is Sandbox


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"network": "yes"}, "sandbox.network"),
        ({"read": [3]}, "sandbox.read"),
        ({"write": 5}, "sandbox.write"),
        ({"memory": "lots"}, "sandbox.memory"),
        ({"memory": 1024}, "sandbox.memory"),
        ({"pids": 0}, "sandbox.pids"),
        ({"pids": True}, "sandbox.pids"),
        ({"cpu_time": -1}, "sandbox.cpu_time"),
        ({"cpu_time": float("inf")}, "sandbox.cpu_time"),
    ],
)
def test_bad_values_name_their_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Sandbox(**kwargs)
    assert caught.value.field == field


def test_the_function_decorator_takes_true_or_a_sandbox() -> None:
    app = kiln.App("unit")

    def f() -> int:
        return 1

    assert app.function(sandbox=True)(f).sandbox == Sandbox()
    assert app.function(sandbox=Sandbox(pids=8))(f).sandbox == Sandbox(pids=8)
    assert app.function()(f).sandbox is None
    with pytest.raises(ValidationError, match="sandbox"):
        app.function(sandbox="on")(f)  # type: ignore[arg-type]


def test_detection_names_every_layer_once() -> None:
    found = detect()
    layers = set(found.available) | set(found.missing)
    assert set(sb.REQUIRED) | set(sb.REQUIRED_CLOSED) <= layers
    assert not set(found.available) & set(found.missing)
    assert found.bubblewrap


def test_a_missing_layer_refuses_with_its_name_and_reason() -> None:
    lacking = Detection(available={"landlock": "ABI 7"}, missing={"seccomp": "no libseccomp"})
    with pytest.raises(SandboxError) as caught:
        lacking.check(Sandbox())
    assert caught.value.layer == "seccomp" and "no libseccomp" in str(caught.value)


def test_agents_must_be_sandboxed() -> None:
    assert required_for("agent") and not required_for("user")
    assert sb.forced(True, None, None) and not sb.forced(False, None, None)
    assert not sb.forced(False, "http://127.0.0.1:9", None)  # no token: not an agent's


def test_a_server_that_cannot_say_who_is_calling_forces_the_sandbox() -> None:
    assert sb.forced(False, "http://127.0.0.1:9", "kiln_token")  # nothing listens there
    assert ("http://127.0.0.1:9", "kiln_token") not in sb._kinds  # asked again next time


def test_kiln_sandbox_setting() -> None:
    assert Settings.from_env({"KILN_HOME": "/tmp/x", "KILN_SANDBOX": "1"}).sandbox is True
    assert Settings.from_env({"KILN_HOME": "/tmp/x"}).sandbox is False
    with pytest.raises(ConfigError, match="KILN_SANDBOX"):
        Settings.from_env({"KILN_HOME": "/tmp/x", "KILN_SANDBOX": "yes"})


def test_code_folders_are_readable_but_not_their_hidden_entries(tmp_path: Path) -> None:
    for name in ("pkg", ".git", ".kiln", ".ssh", "pkg/deeper", "pkg/deeper/.ssh"):
        (tmp_path / name).mkdir()
    (tmp_path / "main.py").write_text("")
    home = tmp_path / "pkg" / "store"
    home.mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("")
    rules = dict(sb.readable((str(tmp_path),), (str(home),)))
    assert str(tmp_path / "main.py") in rules and str(tmp_path / "pkg" / "mod.py") in rules
    assert not any(".git" in p or ".kiln" in p or ".ssh" in p or p == str(home) for p in rules)
    assert rules[str(tmp_path)] == sb._landlock.READ_DIR  # its names, not its files


@pytest.mark.skipif(bool(detect().missing), reason="this machine cannot give a sandbox")
def test_confine_holds_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """Every layer applied to a plain process: the shadow file, sockets and the folder
    above stay out of reach; its scratch folder (its working folder) is writable."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    name = f"{sb.PidsGroup.PREFIX}{os.getpid()}-unit"
    code = f"""
import socket
from kiln.govern import sandbox as sb
group = sb.PidsGroup({name!r}, 16) if sb.PidsGroup.parent() else None
place = sb.Place({str(scratch)!r}, (), (), {{"PATH": "/usr/bin"}}, group)
print(",".join(sb.confine(sb.Sandbox(), place)))
for attempt in (lambda: open("/etc/shadow").read(), lambda: socket.socket(),
                lambda: open({str(tmp_path / "out.txt")!r}, "w")):
    try:
        attempt()
        print("escaped")
    except PermissionError:
        print("denied")
with open("written.txt", "w") as f:
    f.write("ok")
"""
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, check=False)  # fmt: skip
    finally:
        parent = sb.PidsGroup.parent()
        if parent is not None and (parent / name).exists():
            (parent / name).rmdir()
    assert out.returncode == 0, out.stderr
    layers, *attempts = out.stdout.split()
    assert set(sb.REQUIRED) <= set(layers.split(","))
    assert attempts == ["denied", "denied", "denied"]
    assert (scratch / "written.txt").read_text() == "ok"
