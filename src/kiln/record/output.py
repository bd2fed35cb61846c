"""What a run prints, recorded as its logs while it still reaches the terminal.

Two ways to listen, one per place a run executes:

- In an engine's worker (local or Ray), a worker runs one task at a time, so
  :class:`FdTee` replaces file descriptors 1 and 2 with pipes once: everything the
  process writes there (``print``, C extensions, child processes) is read by a thread
  per stream, written on to where it went before, and handed to the run.
- In the caller's own process (``app.run``, ``f.local``), other code shares the
  descriptors, so :class:`StreamTee` wraps ``sys.stdout`` and ``sys.stderr`` instead
  (a terminal stays a terminal to the run's code); text goes to the run current in
  the writing context, or to the only run open in the process.

Both cut the text into chunks of whole lines (a line longer than
:data:`~kiln.record.store.base.LOG_CHUNK_CHARS` is split), time-stamped when read,
undecodable bytes and NUL replaced, and a run keeps at most :data:`LOG_LIMIT_BYTES`:
past it, output still reaches the terminal and the log ends with a note of what was
left out. A worker killed outright loses what it printed in its last flush interval
(about a second), as its metrics.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import sys
import termios
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from kiln.record.store.base import LOG_CHUNK_CHARS, LogRow

LOG_LIMIT_BYTES = 16 << 20  # of one run's output; more reaches the terminal only
_READ = 1 << 20
_PIPE_BYTES = 1 << 20  # a larger pipe: fewer, larger reads (Linux; best effort)
_F_SETPIPE_SZ = 1031
_STREAMS = {1: "stdout", 2: "stderr"}

Sink = Callable[[str, float, bytes], None]  # (stream, time read, whole lines)


def clean(data: bytes) -> str:
    """Bytes as text a store keeps: UTF-8, undecodable bytes and NUL replaced."""
    return data.decode("utf-8", "replace").replace("\x00", "\ufffd")


class RunLog:
    """One run's output as log rows, up to :data:`LOG_LIMIT_BYTES`; what is past the
    limit is counted and said in a last row."""

    def __init__(self, run_id: str, flush: Callable[[list[LogRow]], None]) -> None:
        self.run_id = run_id
        self._flush = flush
        self._lock = threading.RLock()  # a signal handler may print while it is held
        self._kept = 0
        self._dropped = 0
        self._closed = False  # the run has ended: what comes later is not its output

    def add_bytes(self, stream: str, at: float, data: bytes) -> None:
        """Whole lines read from a descriptor (decoded only if they are kept)."""
        if self._keeps(len(data)):
            self._rows(stream, at, clean(data))

    def add(self, stream: str, at: float, text: str) -> None:
        data = text.encode("utf-8", "replace")  # lone surrogates (os.fsdecode) become ?
        if self._keeps(len(data)):
            self._rows(stream, at, clean(data))

    def _keeps(self, size: int) -> bool:
        with self._lock:
            if self._closed:
                return False
            if self._dropped or self._kept + size > LOG_LIMIT_BYTES:
                self._dropped += size  # once past the limit, nothing more: no gaps
                return False
            self._kept += size
            return True

    def _rows(self, stream: str, at: float, text: str) -> None:
        rows = [(self.run_id, at, stream, text[i : i + LOG_CHUNK_CHARS])
                for i in range(0, len(text), LOG_CHUNK_CHARS)]  # fmt: skip
        self._flush(rows)

    def close(self) -> None:
        """Note what was left out, if anything; later output is refused."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            dropped, self._dropped = self._dropped, 0
        if dropped:
            note = (f"[kiln] {dropped:,} bytes of output past this run's limit of "
                    f"{LOG_LIMIT_BYTES >> 20} MiB were not recorded\n")  # fmt: skip
            self._flush([(self.run_id, time.time(), "kiln", note)])


class Lines:
    """Bytes in, chunks of whole lines out (a partial line waits for its end, for a
    drain, or until it is a chunk long)."""

    def __init__(self) -> None:
        self.partial = b""

    def feed(self, data: bytes) -> bytes:
        data = self.partial + data
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) < LOG_CHUNK_CHARS:
            self.partial = data
            return b""
        if cut == 0:  # a chunk's worth of one line: not inside a UTF-8 character
            cut = _whole_characters(data)
        self.partial = data[cut:]
        return data[:cut]

    def rest(self) -> bytes:
        data, self.partial = self.partial, b""
        return data


def _whole_characters(data: bytes) -> int:
    """How much of ``data`` ends on a whole UTF-8 character (its last one may be cut)."""
    start = len(data)
    while start > 0 and len(data) - start < 3 and data[start - 1] & 0xC0 == 0x80:
        start -= 1  # back over continuation bytes
    if start == 0 or data[start - 1] < 0xC0:
        return len(data)  # ASCII or not UTF-8 at all: cut anywhere
    lead = data[start - 1]
    size = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return len(data) if len(data) - (start - 1) >= size else start - 1


class FdTee:
    """File descriptors 1 and 2 of this process, read by threads that pass everything
    on to where it went before and to :attr:`sink` (one per process; see the module)."""

    _installed: FdTee | None = None
    _install_lock = threading.Lock()

    def __init__(self) -> None:
        self.sink: Sink | None = None
        self._state = threading.Condition()
        self._busy = 0
        self._pipes: dict[int, tuple[int, int, Lines]] = {}  # fd: (read end, saved, lines)
        for fd, stream in _STREAMS.items():
            saved = os.dup(fd)
            read_end, write_end = os.pipe()
            with contextlib.suppress(OSError):
                fcntl.fcntl(write_end, _F_SETPIPE_SZ, _PIPE_BYTES)
            os.dup2(write_end, fd)
            os.close(write_end)
            self._pipes[fd] = (read_end, saved, Lines())
            threading.Thread(target=self._pump, args=(fd, stream), daemon=True,
                             name=f"kiln-{stream}").start()  # fmt: skip

    @classmethod
    def installed(cls) -> FdTee:
        with cls._install_lock:
            if cls._installed is None:
                cls._installed = FdTee()
            return cls._installed

    def _pump(self, fd: int, stream: str) -> None:
        read_end, saved, lines = self._pipes[fd]
        ready = select.poll()
        ready.register(read_end, select.POLLIN)
        while True:
            # Wait with the bytes left in the pipe, and count this pump busy before it
            # takes them: `drain` then sees them either unread or being delivered, never
            # in neither state (a read then a count let it pass them by).
            try:
                ready.poll()
            except OSError:
                return
            with self._state:
                self._busy += 1
            try:
                try:
                    data = os.read(read_end, _READ)
                except OSError:
                    return
                if not data:
                    return
                _write_all(saved, data)
                whole = lines.feed(data)
                sink = self.sink
                if whole and sink is not None:
                    try:
                        sink(stream, time.time(), whole)
                    except Exception as exc:  # recording failed: the output still flows
                        self.sink = None
                        with contextlib.suppress(Exception):
                            _write_all(saved, f"kiln: output is no longer recorded: "
                                              f"{exc}\n".encode())  # fmt: skip
            finally:
                with self._state:
                    self._busy -= 1
                    self._state.notify_all()

    def drain(self, timeout_s: float = 5.0) -> None:
        """Deliver everything written to 1 and 2 so far, partial lines included."""
        for f in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                f.flush()
        deadline = time.monotonic() + timeout_s
        with self._state:
            while self._busy or any(_unread(r) for r, _, _ in self._pipes.values()):
                if not self._state.wait(0.005) and time.monotonic() > deadline:
                    break
            sink = self.sink
            for fd, (_, _, lines) in self._pipes.items():
                rest = lines.rest()
                if rest and sink is not None:
                    sink(_STREAMS[fd], time.time(), rest)


def _unread(fd: int) -> int:
    """Bytes waiting in the pipe ``fd``."""
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except OSError:  # where it went is gone (a closed terminal): keep recording
            return


class StreamTee:
    """``sys.stdout`` or ``sys.stderr`` wrapped: what is written goes on as before and,
    in whole lines, to the run that :attr:`route` names (see the module)."""

    def __init__(self, inner: TextIO, stream: str, route: Callable[[], RunLog | None]) -> None:
        self._inner = inner
        self._stream = stream
        self._route = route
        self._partial: dict[str, str] = {}  # run id: its unfinished line
        self._lock = threading.RLock()  # a signal handler may print while it is held

    @property
    def inner(self) -> TextIO:
        return self._inner

    def write(self, text: str) -> int:
        with self._lock:  # the record keeps the order the terminal shows
            written = self._inner.write(text)
            log = self._route()
            if log is None or not isinstance(text, str) or not text:
                return written
            data = self._partial.pop(log.run_id, "") + text
            cut = data.rfind("\n") + 1
            if cut == 0 and len(data) < LOG_CHUNK_CHARS:
                self._partial[log.run_id] = data
                return written
            cut = cut or len(data)
            if data[cut:]:
                self._partial[log.run_id] = data[cut:]
            log.add(self._stream, time.time(), data[:cut])
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def finish(self, log: RunLog) -> None:
        """Hand the run its unfinished line."""
        with self._lock:
            rest = self._partial.pop(log.run_id, "")
        if rest:
            log.add(self._stream, time.time(), rest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class StreamTees:
    """The process's pair of :class:`StreamTee`, installed while a run records with
    them and removed when the last one ends (unless someone replaced them since)."""

    _lock = threading.Lock()
    _users = 0
    _tees: tuple[StreamTee, StreamTee] | None = None

    @classmethod
    def enter(cls, route: Callable[[], RunLog | None]) -> None:
        with cls._lock:
            if cls._tees is None:
                out = StreamTee(sys.stdout, "stdout", route)
                err = StreamTee(sys.stderr, "stderr", route)
                cls._tees = (out, err)
                sys.stdout, sys.stderr = out, err
            cls._users += 1

    @classmethod
    def leave(cls, log: RunLog) -> None:
        with cls._lock:
            tees = cls._tees
            if tees is None:
                return
            for tee in tees:
                tee.finish(log)
            cls._users -= 1
            if cls._users == 0:
                out, err = tees
                if sys.stdout is out:
                    sys.stdout = out.inner
                if sys.stderr is err:
                    sys.stderr = err.inner
                cls._tees = None
