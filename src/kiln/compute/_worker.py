"""A warm worker process: runs tasks sent by the local backend, one at a time.

Started as ``python -m kiln.compute._worker READ_FD WRITE_FD`` in a process group of
its own, so that a timeout or cancel can kill the task's whole process tree. Tasks
arrive as length-prefixed pickled frames on READ_FD; replies go back on WRITE_FD.
The first message names the runner (``module:function``) that executes a task
with its loaded function; it is the SDK's, so this layer knows nothing of records.
stdin, stdout and stderr stay the user's, so prints show up where they belong.

Replies are dicts: ``{"ready": pid}`` once started, ``{"clock": run_id}`` when a task
with a timeout calls its function (its timeout counts from there, not from when it
was queued or handed to a worker still starting), and the runner's reply at its end.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from kiln.compute import _threads

_HEADER = struct.Struct("!Q")


def send(fd: int, message: Any) -> None:
    data = pickle.dumps(message, protocol=5)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def recv(fd: int) -> Any:
    """The next message, or None when the other end has closed the pipe."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(header)[0])
    return None if body is None else pickle.loads(body)  # noqa: S301  our own pipe


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _watch_parent(parent: int) -> None:
    # If the driver dies mid-task nobody will read our reply: take the task down too.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os.killpg(0, 9)


def _load_failure(task: Any, exc: BaseException) -> dict[str, Any]:
    return {
        "run_id": task.run_id,
        "status": "failed",
        "error": "".join(traceback.format_exception(exc)),
        "cause": "could not load the function: "
        + "".join(traceback.format_exception_only(exc)).strip(),
    }


class _Functions:
    """Loaded functions by key: a warm worker unpickles or imports each once."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def get(self, key: str, payload: bytes) -> Any:
        fn = self._cache.get(key)
        if fn is None:
            import cloudpickle

            spec = cloudpickle.loads(payload)
            if isinstance(spec, tuple) and spec and spec[0] == "ref":
                obj: Any = importlib.import_module(spec[1])
                for part in spec[2].split("."):
                    obj = getattr(obj, part)
                fn = getattr(obj, "__wrapped__", obj)
            else:
                fn = spec
            self._cache[key] = fn
        return fn


def _preempted(signum: int, frame: Any) -> None:
    """SIGTERM while a task runs: its run was preempted. The function gets
    ``kiln.Preempted`` where it is, to save a checkpoint in its grace period."""
    from kiln.errors import Preempted

    raise Preempted("this run was preempted: its quota went to work that ranks above it")


def main() -> None:
    read_fd, write_fd = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGTERM, _preempted)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    functions = _Functions()
    init = recv(read_fd)
    if init is None:
        return
    # The caller's code folders go first; an env's own site-packages stay as they are.
    for path in reversed(init["sys_path"]):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.chdir(init["cwd"])
    lock_path = os.environ.get("KILN_ENV_LOCK")
    if lock_path:  # held (shared) for this worker's life, so the env is not pruned under it
        import fcntl

        env_lock = open(lock_path, "a")  # noqa: SIM115, PTH123  kept open on purpose
        fcntl.flock(env_lock, fcntl.LOCK_SH)
    module, _, name = init["runner"].partition(":")
    runner = getattr(importlib.import_module(module), name)
    send(write_fd, {"ready": os.getpid()})
    threads = _threads.in_effect()  # this worker's, from its task's CPU request
    environ = dict(os.environ)
    while (task := recv(read_fd)) is not None:
        try:  # a sandboxed task's code is loaded only inside its sandbox
            fn = None if task.sandbox is not None else functions.get(task.fn_key, task.fn_payload)
        except BaseException as exc:
            send(write_fd, _load_failure(task, exc))
            continue
        _threads.apply(threads)  # again: an earlier task may have changed torch's
        on_start = _clock(write_fd, task.run_id) if task.timeout_s is not None else None
        send(write_fd, runner(task, fn, on_start))
        _restore(environ, init["cwd"])


def _restore(environ: dict[str, str], cwd: str) -> None:
    """Undo what a task changed of the process's environment and folder, so that
    the next task on this warm worker starts as on a fresh one."""
    if os.environ != environ:
        os.environ.clear()
        os.environ.update(environ)
    os.chdir(cwd)


def _clock(write_fd: int, run_id: str) -> Callable[[], None]:
    """Tells the engine the task's function is being called: its timeout starts now."""
    return lambda: send(write_fd, {"clock": run_id})


if __name__ == "__main__":
    main()
