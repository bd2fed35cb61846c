"""Sandboxed runs: a zygote per engine worker forks one confined child per task.

The worker (trusted: it holds the store and the server's token) never unpickles a
sandboxed task's function or arguments. It hands them to its zygote, a small
single-threaded process it started once with a clean environment (``python -m
kiln._sandboxed FD``), which has cloudpickle and Kiln imported already. For each
task the zygote makes a scratch folder and a pids cgroup, then forks a child that
confines itself (:func:`kiln.govern.sandbox.confine`), and only then unpickles the
function and its arguments and calls it. The confinement never touches the worker,
and a fork costs far less than an interpreter start.

The child talks to the worker over a socket of its own: ``kiln.log``, ``kiln.save``
and ``kiln.checkpoint`` are proxied to the worker, which records them; its result
comes back the same way. Everything the child sends is untrusted: frames are JSON
(never pickle), bounded in size, and one that breaks the protocol gets the child
killed and its run failed. So a sandboxed function's result and its saved objects
must be JSON-like (files and bytes are stored as they are). The child stays in the
worker's process group (the sandbox denies setsid and setpgid), so a timeout,
cancel or preemption of the worker's group reaches every process it made; what is
left when it ends is killed through its cgroup. It inherits the worker's standard
output and error, so what it prints is recorded as the run's output.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from kiln._hashing import sha256_tree
from kiln.compute._threads import THREAD_VARS
from kiln.config import Settings
from kiln.errors import KilnError, SandboxError, ValidationError
from kiln.govern import sandbox as _sandbox
from kiln.record.runs import ActiveRun, _current
from kiln.record.values import artifact_name, metric_key, metric_step, metric_value, to_json

MAX_MESSAGE = 16 << 20  # one JSON frame from a sandboxed process
MAX_BLOB = 256 << 20  # one saved file
MAX_BLOBS = 10_000  # files in one save
MAX_SAVE = 1 << 30  # all the files of one save
_JSON, _BLOB = struct.Struct("!I"), struct.Struct("!Q")
# Variables a sandboxed process keeps (HOME and TMPDIR become its scratch folder).
KEPT = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONHASHSEED", "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE", "CUDA_VISIBLE_DEVICES", *THREAD_VARS)  # fmt: skip
_SIGNALS = {int(s): s.name for s in signal.Signals}


class ChannelBroken(KilnError):
    """A sandboxed process sent something outside the protocol (or nothing at all)."""


class Channel:
    """Length-prefixed JSON frames, each followed by the binary frames it announces."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, message: Mapping[str, Any], blobs: Sequence[bytes] = ()) -> None:
        data = json.dumps({**message, "blobs": len(blobs)}, separators=(",", ":")).encode()
        with self._lock:
            self.sock.sendall(_JSON.pack(len(data)) + data)
            for blob in blobs:
                self.sock.sendall(_BLOB.pack(len(blob)))
                self.sock.sendall(blob)

    def recv(self) -> tuple[dict[str, Any], list[bytes]] | None:
        """The next message and its blobs; None at the end. Raises ChannelBroken for a
        frame that is too large, not JSON, or not a message."""
        header = self._exact(_JSON.size, eof_ok=True)
        if header is None:
            return None
        (size,) = _JSON.unpack(header)
        if size > MAX_MESSAGE:
            raise ChannelBroken(f"a message of {size:,} bytes (at most {MAX_MESSAGE:,})")
        try:
            message = json.loads(self._exact(size) or b"")
        except (ValueError, RecursionError) as exc:
            raise ChannelBroken(f"a message that is not JSON ({exc})") from None
        if not isinstance(message, dict) or not isinstance(message.get("op", ""), str):
            raise ChannelBroken("a message that is not an object with an op")
        count = message.get("blobs", 0)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_BLOBS:
            raise ChannelBroken(f"a message announcing {str(count)[:20]} files")
        blobs, total = [], 0
        for _ in range(count):
            (length,) = _BLOB.unpack(self._exact(_BLOB.size) or b"")
            total += length
            if length > MAX_BLOB or total > MAX_SAVE:
                raise ChannelBroken(f"a file of {length:,} bytes (at most {MAX_BLOB:,}, "
                                    f"{MAX_SAVE:,} in all)")  # fmt: skip
            blobs.append(self._exact(length) or b"")
        return message, blobs

    def _exact(self, n: int, *, eof_ok: bool = False) -> bytes | None:
        chunks, left = [], n
        while left:
            chunk = self.sock.recv(min(left, 1 << 20))
            if not chunk:
                if eof_ok and left == n:
                    return None
                raise ChannelBroken(f"the channel closed in the middle of a frame ({n} bytes)")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


class Failed(Exception):
    """A sandboxed run ended without a result: ``cause`` (one line) and ``error`` say why."""

    def __init__(self, cause: str, error: str | None = None) -> None:
        self.cause, self.error = cause, error or cause
        super().__init__(cause)


# -- the worker's side ---------------------------------------------------------------


class Zygote:
    """The worker's zygote process and its control socket."""

    def __init__(self, sys_path: Sequence[str]) -> None:
        ours, theirs = socket.socketpair()
        environ = {k: os.environ[k] for k in KEPT if k in os.environ}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln._sandboxed", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=environ, cwd="/", stdin=subprocess.DEVNULL,
        )  # fmt: skip
        theirs.close()
        self.control = Channel(ours)
        self.control.send({"op": "init", "sys_path": [p for p in sys_path if p],
                           "tmp": tempfile.gettempdir()})  # fmt: skip

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fork(self, request: dict[str, Any], payloads: Sequence[bytes]) -> tuple[int, Channel]:
        """Start a child for ``request``; its pid and the channel to it."""
        mine, theirs = socket.socketpair()
        try:
            socket.send_fds(self.control.sock, [b"F"], [theirs.fileno()])
            self.control.send(request, payloads)
        finally:
            theirs.close()
        answer = self.control.recv()
        if answer is None or "pid" not in answer[0]:
            mine.close()
            raise Failed("the sandbox's zygote process died before it started the run")
        return int(answer[0]["pid"]), Channel(mine)

    def ended(self) -> int | None:
        """The wait status of the child just run (None if the zygote is gone)."""
        answer = self.control.recv()
        return None if answer is None else int(answer[0]["status"])


_zygote: Zygote | None = None


def _hidden(store: dict[str, Any]) -> list[str]:
    """What a sandbox never reads though it lies in a code folder: the Kiln home, and a
    SQLite store's file (with its journal) wherever it is."""
    hidden = [store.get("home") or ""]
    url = store.get("store_url") or ""
    if url.startswith("sqlite:///"):
        path = str(Path(url.removeprefix("sqlite:///").split("?")[0]).resolve())
        hidden += [path + end for end in ("", "-wal", "-shm", "-journal")]
    return hidden


def call(task: Any, run: Any, on_start: Callable[[], None] | None, record: dict[str, Any]) -> Any:
    """Run ``task`` sandboxed as ``run`` (the worker's TaskRun); its result (JSON data).
    ``record["layers"]`` gets the layers that were active. Raises :class:`Failed`."""
    global _zygote
    if _zygote is None or not _zygote.alive():
        _zygote = Zygote(sys.path)
    request = {"op": "run", "run_id": task.run_id, "app": task.app, "fn_key": task.fn_key,
               "sandbox": task.sandbox, "hidden": _hidden(task.store),
               "code": list(task.sys_path), "cwd": task.cwd}  # fmt: skip
    pid, channel = _zygote.fork(request, [task.fn_payload, task.args_payload])
    session = _Session(channel, run, on_start, task.sandbox, record)
    stop: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    # A preemption reaches the child too (same process group): it saves what it can in
    # its grace period through this worker, which must go on serving it meanwhile.
    before = signal.signal(signal.SIGTERM, lambda s, f: stop.append(s)) if main else None
    try:
        session.serve(pid)
    finally:
        channel.sock.close()
        status = _zygote.ended()
        if before is not None:
            signal.signal(signal.SIGTERM, before)
    if stop:
        from kiln.errors import Preempted

        raise Preempted("this run was preempted: its quota went to work that ranks above it")
    return session.outcome(status)


class _Session:
    """The worker serving one sandboxed child: its requests, then how it ended."""

    def __init__(self, channel: Channel, run: Any, on_start: Callable[[], None] | None,
                 spec: dict[str, Any], record: dict[str, Any]) -> None:  # fmt: skip
        self.channel, self.run, self.on_start, self.spec = channel, run, on_start, spec
        self.record = record
        self.confined: list[str] | None = None
        self.end: dict[str, Any] | None = None
        self.broken: str | None = None

    def serve(self, pid: int) -> None:
        try:
            while self.end is None and (got := self.channel.recv()) is not None:
                self._handle(*got)
        except ChannelBroken as exc:
            self.broken = str(exc)
        except (OSError, KilnError, ValueError, TypeError, KeyError) as exc:
            self.broken = f"a request Kiln refused ({type(exc).__name__}: {exc})"
        if self.broken is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _handle(self, message: dict[str, Any], blobs: list[bytes]) -> None:
        op = message["op"]
        if op == "log":
            step = message.get("step")
            self.run.log(message["metrics"], step, volatile=message.get("volatile") is True)
        elif op == "save":
            self.channel.send({"op": "saved", "sha256": self._save(message, blobs)})
        elif op == "checkpoint":
            self._checkpoint(message)
        elif op == "start":
            if self.on_start is not None:
                self.on_start()
        elif op == "confined" and self.confined is None:  # said once, before its code ran
            self.confined = self.record["layers"] = [str(x)[:40] for x in message["layers"]][:32]
        elif op in (("refused",) if self.confined is None else ("result", "error")):
            self.end = message
        else:
            raise ChannelBroken(f"an unknown request {op[:40]!r}")

    def _save(self, message: dict[str, Any], blobs: list[bytes]) -> str:
        name, kind = message["name"], message["kind"]
        if kind == "json":  # plain data, pickled here (never the child's own pickle)
            return str(self.run.save(name, message["value"]))
        if kind == "bytes" and len(blobs) == 1:
            return str(self.run.save(name, blobs[0]))
        names = message["files"]
        if kind != "files" or not isinstance(names, list) or len(names) != len(blobs):
            raise ChannelBroken("a save whose files do not match its names")
        for rel, data in zip(names, blobs, strict=True):
            self.run.save(f"{name}/{rel}", data)
        return str(message.get("sha256", ""))[:64]

    def _checkpoint(self, message: dict[str, Any]) -> None:
        missing = object()
        value = self.run.checkpoint(message["name"], missing)
        if value is missing:
            self.channel.send({"op": "checkpoint", "found": False})
        elif isinstance(value, bytes):
            self.channel.send({"op": "checkpoint", "found": True, "kind": "bytes"}, [value])
        else:
            self.channel.send({"op": "checkpoint", "found": True, "kind": "json",
                               "value": value})  # fmt: skip

    def outcome(self, status: int | None) -> Any:
        end = self.end or {}
        if end.get("op") == "result":
            return end.get("value")
        if end.get("op") == "refused":
            error = SandboxError(str(end.get("layer"))[:80], str(end.get("reason"))[:2000])
            raise Failed(f"SandboxError: {error}")
        if end.get("op") == "error":
            raise Failed(str(end.get("cause"))[:2000], str(end.get("error"))[:100_000])
        if self.broken is not None:
            raise Failed(f"the sandboxed process broke its channel: {self.broken}; it was killed")
        raise Failed(self._died(status))

    def _died(self, status: int | None) -> str:
        if status is None:
            return "the sandboxed process and its zygote died before it answered"
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            cause = (f"the sandboxed process was killed by signal {number} "
                     f"({_SIGNALS.get(number, '?')}) before it answered")  # fmt: skip
            if number == signal.SIGXCPU:
                cause += f": its cpu_time of {self.spec.get('cpu_time')}s ran out"
            return cause
        return f"the sandboxed process exited with code {os.WEXITSTATUS(status)} before it answered"


# -- the child's view of its run ---------------------------------------------------------


class ProxyRun(ActiveRun):
    """The run as a sandboxed function sees it: ``kiln.log``, ``kiln.save`` and
    ``kiln.checkpoint`` go to the worker, which checks them again and records them."""

    def __init__(self, channel: Channel, run_id: str, app: str) -> None:
        super().__init__(Settings(home=Path(os.devnull), store_url="sandbox:"), app=app)
        self.id = run_id
        self._channel = channel
        self._ask = threading.Lock()  # one question at a time waits for its answer

    def __enter__(self) -> ProxyRun:
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None

    def log(
        self, metrics: Mapping[str, Any], step: int | None = None, *, volatile: bool = False
    ) -> None:
        """Checked here as in any run, then sent to the worker."""
        if not isinstance(metrics, Mapping):
            raise ValidationError("metrics", f"must be a dict, got {type(metrics).__name__}")
        if volatile is not True and volatile is not False:
            raise ValidationError("volatile", f"{volatile!r} is not true or false",
                                  allowed="True, False")  # fmt: skip
        step = self._step if step is None else metric_step(step)
        values = {metric_key(k): metric_value(k, v) for k, v in metrics.items()}
        self._step = step + 1
        self._channel.send({"op": "log", "metrics": values, "step": step, "volatile": volatile})

    def save(self, name: str, obj: Any) -> str:
        """A path (file or folder) or bytes, stored as they are, or a JSON-like value:
        nothing pickled leaves a sandbox."""
        name = artifact_name(name)
        if isinstance(obj, str | os.PathLike):
            path = Path(obj)
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.is_file())
                names = [artifact_name(f"{name}/{f.relative_to(path).as_posix()}") for f in files]
                message = {
                    "op": "save",
                    "name": name,
                    "kind": "files",
                    "sha256": sha256_tree(path)[0],
                    "files": [n[len(name) + 1 :] for n in names],
                }
                return self._ask_for(message, [f.read_bytes() for f in files])["sha256"]  # type: ignore[no-any-return]
            if not path.is_file():
                raise ValidationError("obj", f"no file at {str(path)!r}")
            blobs = [path.read_bytes()]
            return self._ask_for({"op": "save", "name": name, "kind": "bytes"}, blobs)["sha256"]  # type: ignore[no-any-return]
        if isinstance(obj, bytes | bytearray | memoryview):
            blobs = [bytes(obj)]
            return self._ask_for({"op": "save", "name": name, "kind": "bytes"}, blobs)["sha256"]  # type: ignore[no-any-return]
        try:
            value = to_json(obj, "obj")
        except ValidationError as exc:
            raise ValidationError("obj", f"{exc}; a sandboxed run saves files, bytes or "
                                  "JSON-like values") from None  # fmt: skip
        return self._ask_for({"op": "save", "name": name, "kind": "json", "value": value})["sha256"]  # type: ignore[no-any-return]

    def checkpoint(self, name: str = "checkpoint", default: Any = None) -> Any:
        """What this run last saved as ``name`` (in any attempt), or ``default``."""
        answer, blobs = self._ask_both({"op": "checkpoint", "name": artifact_name(name)})
        if not answer.get("found"):
            return default
        return blobs[0] if answer.get("kind") == "bytes" else answer.get("value")

    def use(self, item: Any) -> None:
        """Inputs named inside a sandbox are not recorded (the worker would have to
        trust the child's word for their hashes)."""

    def _ask_for(self, message: dict[str, Any], blobs: Sequence[bytes] = ()) -> dict[str, Any]:
        return self._ask_both(message, blobs)[0]

    def _ask_both(
        self, message: dict[str, Any], blobs: Sequence[bytes] = ()
    ) -> tuple[dict[str, Any], list[bytes]]:
        with self._ask:
            self._channel.send(message, blobs)
            answer = self._channel.recv()
        if answer is None:
            raise ChannelBroken("the worker closed the channel")
        return answer


# -- the zygote ------------------------------------------------------------------------


def zygote_main(fd: int) -> None:
    """Serve fork requests of one worker until it closes the control socket."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a preemption is the run's, not ours
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _sandbox._prctl(_sandbox._PR_SET_PDEATHSIG, signal.SIGKILL)
    control = Channel(socket.socket(fileno=fd))
    init = control.recv()
    if init is None:
        return
    if sys.path and sys.path[0] == str(Path.cwd()):  # "/" (python -m puts its folder first)
        del sys.path[0]
    for path in reversed(init[0]["sys_path"]):
        if path not in sys.path:
            sys.path.insert(0, path)
    _preload()
    _sweep(init[0]["tmp"])
    count = 0
    while True:
        got = socket.recv_fds(control.sock, 1, 1)
        if not got[0] or not got[1]:
            return
        request = control.recv()
        if request is None:
            return
        count += 1
        _fork_one(control, request[0], request[1], got[1][0], init[0]["tmp"], count)


def _preload() -> None:
    """What every child needs, imported once here (never any of the user's code)."""
    import cloudpickle  # noqa: F401

    import kiln
    import kiln.record.runs  # noqa: F401
    from kiln.govern import _seccomp

    _seccomp.available()  # loads libseccomp before Landlock could hide it
    _sandbox.detect()


def _sweep(tmp: str) -> None:
    """Remove the scratch folders and cgroups of zygotes that were killed mid-run (a
    timeout kills the worker's whole process group, its zygote too)."""
    import shutil

    alive = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    _sandbox.PidsGroup.sweep(alive)
    keep = tuple(f"{_sandbox.PidsGroup.PREFIX}{pid}-" for pid in alive)
    for path in Path(tmp).glob(f"{_sandbox.PidsGroup.PREFIX}*"):
        if not path.name.startswith(keep) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _fork_one(control: Channel, request: dict[str, Any], payloads: list[bytes], fd: int,
              tmp: str, count: int) -> None:  # fmt: skip
    scratch = tempfile.mkdtemp(prefix=f"{_sandbox.PidsGroup.PREFIX}{os.getpid()}-", dir=tmp)
    pids: _sandbox.PidsGroup | None = None
    failure: SandboxError | None = None
    try:
        limit = int(request["sandbox"]["pids"])
        if _sandbox.PidsGroup.parent() is not None:
            pids = _sandbox.PidsGroup(f"{_sandbox.PidsGroup.PREFIX}{os.getpid()}-{count}", limit)
    except (OSError, SandboxError) as exc:
        failure = exc if isinstance(exc, SandboxError) else SandboxError("pids", str(exc))
    code = tuple(request["code"]) + tuple(p for p in sys.path if p not in ("", "/"))
    hidden = tuple(h for h in request["hidden"] if h)
    with contextlib.suppress(OSError):
        _sandbox.readable(code, hidden)  # found here once, for every child of this zygote
    pid = os.fork()
    if pid == 0:
        control.sock.close()
        _child(request, payloads, fd, scratch, pids, failure)
    os.close(fd)
    control.send({"op": "started", "pid": pid})
    _, status = os.waitpid(pid, 0)
    if pids is not None:
        pids.close()
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    control.send({"op": "ended", "status": status})


# -- the child ---------------------------------------------------------------------------


def _child(request: dict[str, Any], payloads: list[bytes], fd: int, scratch: str,
           pids: _sandbox.PidsGroup | None, failure: SandboxError | None) -> NoReturn:  # fmt: skip
    status = 0
    try:
        channel = Channel(socket.socket(fileno=fd))
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        spec = _sandbox.Sandbox.from_json(request["sandbox"])
        environ = {k: os.environ[k] for k in KEPT if k in os.environ}
        code = tuple(request["code"]) + tuple(p for p in sys.path if p not in ("", "/"))
        place = _sandbox.Place(scratch, code, tuple(h for h in request["hidden"] if h),
                               environ, pids, request.get("cwd"))  # fmt: skip
        try:
            if failure is not None:
                raise failure
            layers = _sandbox.confine(spec, place)
        except SandboxError as exc:
            channel.send({"op": "refused", "layer": exc.layer, "reason": exc.reason})
            os._exit(3)
        channel.send({"op": "confined", "layers": list(layers)})
        _run(channel, request, payloads)
    except BaseException:  # nothing may escape into the zygote's loop
        status = 4
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


def _run(channel: Channel, request: dict[str, Any], payloads: list[bytes]) -> None:
    """Unpickle and call the function (confined by now), as the run's proxy."""
    import cloudpickle

    from kiln.compute._worker import _Functions, _preempted

    signal.signal(signal.SIGTERM, _preempted)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with ProxyRun(channel, request["run_id"], request["app"]):
        try:
            fn = _Functions().get(request["fn_key"], payloads[0])
            args, kwargs = cloudpickle.loads(payloads[1])
            channel.send({"op": "start"})
            result = fn(*args, **kwargs)
            try:
                value = to_json(result, "result")
            except ValidationError as exc:
                raise ValidationError("result", f"{exc}; a sandboxed function returns "
                                      "JSON-like values only") from None  # fmt: skip
            channel.send({"op": "result", "value": value})
        except BaseException as exc:  # the function's error goes back as text
            cause = "".join(traceback.format_exception_only(exc)).strip()
            channel.send({"op": "error", "error": "".join(traceback.format_exception(exc)),
                          "cause": cause})  # fmt: skip


if __name__ == "__main__":
    zygote_main(int(sys.argv[1]))
