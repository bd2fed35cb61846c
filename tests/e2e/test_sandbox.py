"""Sandboxed functions on the local engine: real kernel, real processes, no mocks.

The escape suite runs each attempt as a sandboxed function: none may succeed, and
each run must end with a cause that says what stopped it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import kiln
from kiln._engine import engine_for
from kiln.config import Settings
from kiln.errors import RunFailed
from kiln.govern.sandbox import Sandbox, detect
from kiln.record.recorder import recorder_for

pytestmark = pytest.mark.skipif(
    bool(detect().missing), reason=f"this machine cannot give a sandbox: {detect().missing}"
)
app = kiln.App("sandbox")
_libc = ctypes.CDLL(None, use_errno=True)


def _failed(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@app.function(sandbox=True)
def read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(64).decode(errors="replace")


@app.function(sandbox=True)
def list_folder(path: str) -> list[str]:
    return os.listdir(path)


@app.function(sandbox=True)
def write(path: str) -> str:
    Path(path).write_text("escaped")
    return path


@app.function(sandbox=True)
def connect(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return "connected"


@app.function(sandbox=Sandbox(pids=16))
def fork_bomb() -> int:
    children = []  # left running: the run's cgroup takes them down when it ends
    for _ in range(200):
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
    return len(children)


@app.function(sandbox=Sandbox(memory="1Gi"))
def memory_bomb() -> int:
    blocks = [bytearray(64 << 20) for _ in range(64)]  # 4 GiB
    return len(blocks)


@app.function(sandbox=True)
def trace(pid: int) -> str:
    _failed(_libc.ptrace(16, pid, None, None))  # PTRACE_ATTACH
    return "attached"


@app.function(sandbox=True)
def mount(target: str) -> str:
    _failed(_libc.mount(b"tmpfs", target.encode(), b"tmpfs", 0, None))
    return "mounted"


@app.function(sandbox=True)
def signal_process(pid: int) -> str:
    os.kill(pid, signal.SIGTERM)
    return "signalled"


@app.function(sandbox=True)
def token_from_environment() -> str:
    return os.environ["KILN_TOKEN"]


@app.function(sandbox=True)
def unshare_user() -> str:
    _failed(_libc.unshare(0x10000000))  # CLONE_NEWUSER: root again, in a namespace
    return "root again"


SHM_KEY = 0x4B494C4E  # a System V shared memory segment the driver makes


@app.function(sandbox=True)
def shared_memory(key: int) -> str:
    found = _libc.shmget(key, 0, 0)
    if found < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return f"attached to segment {found}"


@pytest.fixture
def segment() -> Iterator[int]:
    found = _libc.shmget(SHM_KEY, 4096, 0o1600)  # IPC_CREAT | 0600
    assert found >= 0, os.strerror(ctypes.get_errno())
    yield found
    _libc.shmctl(found, 0, None)  # IPC_RMID


@pytest.fixture
def secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A fake ~/.ssh key and a token in the driver's environment (the workers inherit it)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KILN_TOKEN", "kiln_secret_token")
    (tmp_path / "mnt").mkdir()
    return {"home": home, "tmp": tmp_path}


def test_no_escape_succeeds(secrets: dict[str, Path], segment: int) -> None:
    driver, tmp = os.getpid(), secrets["tmp"]
    kiln_home = Path(os.environ["KILN_HOME"])
    attempts = {
        "read /etc/shadow": (read.spawn("/etc/shadow"), "PermissionError"),
        "read ~/.ssh": (read.spawn(str(secrets["home"] / ".ssh" / "id_ed25519")),
                        "PermissionError"),
        "list /root": (list_folder.spawn("/root"), "PermissionError"),
        "read the store": (read.spawn(str(kiln_home / "kiln.db")), "PermissionError"),
        "write outside": (write.spawn(str(tmp / "escaped.txt")), "PermissionError"),
        "open a socket": (connect.spawn(5432), "PermissionError"),
        "fork bomb": (fork_bomb.spawn(), "BlockingIOError"),
        "memory bomb": (memory_bomb.spawn(), "MemoryError"),
        "ptrace the driver": (trace.spawn(driver), "PermissionError"),
        "mount": (mount.spawn(str(tmp / "mnt")), "PermissionError"),
        "signal the driver": (signal_process.spawn(driver), "PermissionError"),
        "token from the environment": (token_from_environment.spawn(), "KeyError: 'KILN_TOKEN'"),
        "token from /proc": (read.spawn(f"/proc/{driver}/environ"), "PermissionError"),
        "a user namespace": (unshare_user.spawn(), "PermissionError"),
        "the driver's shared memory": (shared_memory.spawn(SHM_KEY), "FileNotFoundError"),
    }  # fmt: skip
    escaped = {}
    for what, (run, expected) in attempts.items():
        try:
            escaped[what] = run.result(timeout=60)
        except RunFailed as exc:
            assert expected in exc.cause, f"{what}: {exc.cause}"
            assert exc.status == "failed"
    assert escaped == {}
    assert not (tmp / "escaped.txt").exists()
    record = kiln.get_run(attempts["open a socket"][0].id)
    assert record.environment.sandbox is not None
    assert {"seccomp", "ipc-uts"} <= set(record.environment.sandbox["layers"])


def work(data: str, out: str) -> dict:
    kiln.log({"loss": 0.5}, step=0)
    kiln.log({"loss": 0.25}, step=1)
    kiln.save("notes.txt", b"written inside")
    kiln.save("state", {"epoch": 2})
    text = Path(data).read_text()
    Path(out, "result.txt").write_text(text.upper())
    scratch = Path(os.environ["TMPDIR"], "scratch.txt")
    scratch.write_text("mine")
    print("printed inside the sandbox")
    return {"accuracy": 0.9, "words": len(text.split()), "state": kiln.checkpoint("state")}


def test_a_sandboxed_function_works_within_its_bounds(tmp_path: Path) -> None:
    data, out = tmp_path / "data.txt", tmp_path / "out"
    data.write_text("hello sandbox world")
    out.mkdir()
    sandboxed = kiln.Function(app, work, sandbox=Sandbox(read=[data], write=[out], memory="2Gi"))
    run = sandboxed.spawn(str(data), str(out))
    assert run.result(timeout=60) == {"accuracy": 0.9, "words": 3, "state": {"epoch": 2}}
    assert (out / "result.txt").read_text() == "HELLO SANDBOX WORLD"
    record = run.record()
    assert record.summary["loss"] == 0.25 and record.summary["accuracy"] == 0.9
    assert record.load("notes.txt") == b"written inside"
    assert record.load("state") == {"epoch": 2}
    sandbox = record.environment.sandbox
    assert sandbox is not None
    for layer in ("landlock", "seccomp", "netns", "pids", "capabilities", "clean-env"):
        assert layer in sandbox["layers"]
    assert record.resources["sandbox"]["write"] == [str(out)]
    chunks = recorder_for(Settings.from_env()).store.run_logs(run.id)
    assert "printed inside the sandbox\n" in "".join(c.text for c in chunks)


@app.function(sandbox=True)
def unpicklable() -> object:
    return object()


@app.function(sandbox=Sandbox(read=["/no/such/folder"]))
def reads_nothing() -> int:
    return 1


@app.function()
def plain() -> dict:
    return {"home": os.environ.get("HOME", ""), "token": "KILN_TOKEN" in os.environ}


def test_what_cannot_come_back_or_be_given_fails_with_its_cause() -> None:
    with pytest.raises(RunFailed, match="JSON-like values only"):
        unpicklable.remote()
    with pytest.raises(RunFailed, match=r"SandboxError: .*/no/such/folder does not exist"):
        reads_nothing.remote()


def test_kiln_sandbox_forces_every_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_SANDBOX", "1")
    monkeypatch.setenv("KILN_TOKEN", "kiln_secret_token")
    result = plain.remote()
    assert result["token"] is False and "kiln-sandbox-" in result["home"]
    record = kiln.runs(app="sandbox", limit=1)[0]
    assert record.environment.sandbox is not None
    assert record.resources["sandbox"]["network"] is False


@app.function(sandbox=True, timeout=1)
def sleeps() -> None:
    for _ in range(4):
        if os.fork() == 0:
            break
    time.sleep(60)


def _sandboxed_processes() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"])
            if "kiln._sandboxed" in (p.info["cmdline"] or [])}  # fmt: skip


def test_a_timeout_kills_the_sandboxed_process_tree() -> None:
    before = _sandboxed_processes()
    with pytest.raises(RunFailed, match="timed out after 1s"):
        sleeps.remote()
    deadline = time.monotonic() + 10
    while _sandboxed_processes() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandboxed_processes() - before == set()


@app.function(sandbox=True)
def resumable() -> dict:
    state = kiln.checkpoint(default={"epoch": 0})
    if state["epoch"] > 0:
        return {"resumed_at": state["epoch"]}
    kiln.save("checkpoint", {"epoch": 0})
    try:
        print("ready", flush=True)
        time.sleep(60)
    except kiln.Preempted:
        kiln.save("checkpoint", {"epoch": 7})  # in its grace period, through the worker
        raise
    return {"resumed_at": None}


def test_a_preempted_sandboxed_run_saves_and_resumes() -> None:
    run = resumable.spawn()
    engine = engine_for(Settings.from_env())
    store = engine.recorder.store
    deadline = time.monotonic() + 30
    while not any("ready" in c.text for c in store.run_logs(run.id)):
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)
    engine.backend.preempt(run.id, "preempted by the test", 10)
    assert run.result(timeout=60) == {"resumed_at": 7}
    assert [a["status"] for a in run.record().resources["attempts"]] == ["preempted", "succeeded"]
