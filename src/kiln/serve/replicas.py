"""Replica processes seen from the front door: start one, send it requests, stop it.

A replica's resources are reserved through the process's engine, so the scheduler
that admits function calls admits replicas too and neither oversubscribes the
machine. Requests go out as frames over a pipe, written together when several
are ready in the same turn of the event loop; replies come back matched by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kiln.compute.scheduler import Allocation
from kiln.record.output import Lines

if TYPE_CHECKING:
    from kiln.registry.models import ModelVersion
    from kiln.serve.endpoint import Endpoint
from kiln.serve._replica import (
    BROKEN,
    INIT,
    PRELOAD,
    READY,
    REPLY,
    request_frame,
)

_ids = itertools.count(1)
# What a replica printed: (the replica, "stdout" or "stderr", when read, whole lines).
OnOutput = Callable[["Replica", str, float, bytes], None]


class ReplicaDied(Exception):
    """The replica process ended while requests were in flight."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int  # kiln.serve._replica.OK, INVALID or FAILED
    body: bytes
    cpu_ns: int
    wall_ns: int
    traceparent: bytes  # of its span; zeros if not traced


class _Replies(asyncio.Protocol):
    def __init__(self, replica: Replica) -> None:
        self._replica = replica
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        size = REPLY.size
        offset = 0
        waiting = self._replica.waiting
        while len(buffer) - offset >= size:
            length, status, rid, cpu_ns, wall_ns, traced = REPLY.unpack_from(buffer, offset)
            end = offset + size + length
            if end > len(buffer):
                break
            future = waiting.pop(rid, None)
            if future is not None and not future.done():
                body = bytes(buffer[offset + size : end])
                future.set_result(Answer(status, body, cpu_ns, wall_ns, traced))
            offset = end
        del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self._replica.lost()


class Replica:
    """One running replica process of one model version."""

    def __init__(self) -> None:
        self.lease_id = ""  # its reservation with the scheduler (none while a standby)
        self.inflight = 0
        self.waiting: dict[int, asyncio.Future[Answer]] = {}
        self.pid = 0
        self.load_s = 0.0
        self.started_at = time.monotonic()
        self.alive = True
        self._proc: subprocess.Popen[bytes] | None = None
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._flushing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.version: int | None = None  # the model version it serves (None: a standby)

    async def spawn(
        self, *, python: str, env: dict[str, str], on_output: OnOutput | None = None
    ) -> None:
        """Start the process (it waits for PRELOAD or INIT). It talks over one end of a
        socket pair; the event loop owns the other, so closing it leaves nothing open.
        With ``on_output``, what it prints is read here, passed on to this process's
        stdout and stderr, and handed to ``on_output`` in whole lines."""
        loop = self._loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        piped = subprocess.PIPE if on_output is not None else None
        try:
            fd = str(theirs.fileno())
            self._proc = subprocess.Popen(
                [python, "-m", "kiln.serve._replica", fd, fd],
                pass_fds=(theirs.fileno(),),
                env=env,
                start_new_session=True,  # Ctrl-C reaches the front door, which drains first
                stdout=piped,
                stderr=piped,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = self._proc.pid
        if on_output is not None:
            for pipe, name, to in ((self._proc.stdout, "stdout", 1),
                                   (self._proc.stderr, "stderr", 2)):  # fmt: skip
                threading.Thread(target=self._pump, args=(pipe, name, to, on_output),
                                 daemon=True, name=f"kiln-replica-{name}").start()  # fmt: skip
        try:
            self._transport, _ = await loop.create_unix_connection(
                lambda: _Replies(self), sock=ours
            )
        except BaseException:  # cancelled half way: leave nothing running or open
            ours.close()
            self.close()
            raise

    def _pump(self, pipe: Any, stream: str, to: int, on_output: OnOutput) -> None:
        """Pass on and hand over what the replica writes to ``stream``, until it ends."""
        lines = Lines()
        with pipe:
            while data := pipe.read1(1 << 16):
                with contextlib.suppress(OSError):
                    os.write(to, data)
                whole = lines.feed(data)
                if whole:
                    on_output(self, stream, time.time(), whole)
        rest = lines.rest()
        if rest:
            on_output(self, stream, time.time(), rest)

    async def preload(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Make it a standby: import the class and ``spec["preload"]``, load nothing."""
        return await self._setup(PRELOAD, spec)

    async def start(self, lease_id: str, init: dict[str, Any]) -> list[str]:
        """Load the model (the process must be spawned); returns the modules it imported."""
        self.lease_id = lease_id
        self.started_at = time.monotonic()
        self.version = init.get("model_version")
        ready = await self._setup(INIT, init)
        self.load_s = float(ready["load_s"])
        return list(ready.get("learned", ()))

    async def _setup(self, kind: int, spec: dict[str, Any]) -> dict[str, Any]:
        answer = await self.send(kind, json.dumps(spec).encode())
        if answer.status == BROKEN:
            await self.stop()
            raise RuntimeError(answer.body.decode(errors="replace").rstrip())
        if answer.status != READY:
            raise RuntimeError(f"replica answered {answer.status} to its setup")
        ready: dict[str, Any] = json.loads(answer.body)
        return ready

    def send(
        self, kind: int, body: bytes, *, received_ns: int = 0, context: bytes = b""
    ) -> asyncio.Future[Answer]:
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[Answer] = loop.create_future()
        if not self.alive:
            future.set_exception(ReplicaDied(f"replica {self.pid} is not running"))
            return future
        rid = next(_ids)
        self.waiting[rid] = future
        self._out.append(request_frame(kind, rid, body, received_ns=received_ns, context=context))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flushing = False
        if self._out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def exit_code(self) -> int | None:
        """Its exit code (negative: the signal that killed it); None while it runs."""
        return self._proc.poll() if self._proc else None

    def lost(self) -> None:
        self.alive = False
        for future in self.waiting.values():
            if not future.done():  # the caller is told no more than that (no pid, no code)
                future.set_exception(ReplicaDied("the replica answering it died"))
        self.waiting.clear()

    async def stop(self, timeout: float = 10.0) -> None:
        """Close its pipe: it answers what it has read, flushes its spans and exits."""
        self._flush()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write_eof()  # it answers what it has read, then exits
        proc = self._proc
        if proc is None:
            return
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            await asyncio.to_thread(proc.wait)
        # Its last replies and the end of its pipe are read by the loop; then the pipe
        # closes itself. Closed here if that has not happened soon after it exited.
        deadline = time.monotonic() + 1.0
        while self.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
            await asyncio.sleep(0)  # its close callback closes the socket
        self.alive = False

    def close(self) -> None:
        """Stop it at once and close its pipes (for the front door's last cleanup)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, 9)
            self._proc.wait()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        self.alive = False


def replica_env(env_lock: str | None, cpu: float) -> dict[str, str]:
    """A replica's environment variables: its numeric libraries get as many threads as
    the CPUs it asked for, as a function's task does (its GPUs come with INIT, set
    before ``load``)."""
    from kiln.compute._threads import thread_env

    env = {**os.environ, **thread_env(cpu)}
    env.pop("VIRTUAL_ENV", None)
    env.pop("KILN_METRICS_PORT", None)  # the serving process's engine has that port
    if env_lock:
        env["KILN_ENV_LOCK"] = env_lock
    return env


async def reserve(
    backend: Any, resources: Any, priority: int = 0, *, held: set[str] | None = None
) -> tuple[str, Allocation]:
    """Wait until the scheduler admits a replica with ``resources``. A wait that is
    cancelled withdraws its reservation, or gives back what was granted meanwhile.
    ``held`` collects the lease ids its caller must release (all of them, at its end)."""
    loop = asyncio.get_running_loop()
    granted: asyncio.Future[Allocation] = loop.create_future()
    lease_id = "replica-" + secrets.token_hex(8)

    def settle(allocation: Allocation) -> None:
        if granted.done():  # the wait was cancelled: give it back
            backend.release(lease_id)
        else:
            granted.set_result(allocation)

    def grant(allocation: Allocation) -> None:  # called from the engine's loop thread
        try:
            loop.call_soon_threadsafe(settle, allocation)
        except RuntimeError:  # the event loop is gone: nobody will use it
            backend.release(lease_id)

    if held is not None:
        held.add(lease_id)
    backend.reserve(lease_id, resources, priority, grant)
    try:
        return lease_id, await granted
    except BaseException:
        backend.release(lease_id)
        if held is not None:
            held.discard(lease_id)
        raise


def setup(
    endpoint: Endpoint[Any], store_url: str, version: ModelVersion | None = None,
    model_path: str = "", *, url: str = "", route: str = "/predict",
) -> dict[str, Any]:  # fmt: skip
    """A replica's PRELOAD setup (no ``version``) or INIT setup (with the version to
    load); ``url`` is the server it answers for (none for a batch job's replicas)."""
    source, spec = endpoint.source, endpoint.spec
    out: dict[str, Any] = {
        "module": source.module, "qualname": source.qualname, "sys_path": list(source.sys_path),
        "endpoint": spec.name, "kind": spec.kind, "tracing": spec.tracing, "store_url": store_url,
        "reference": spec.model, "span_attributes": spec.span_attributes,
        "http": {"url": url, "route": route} if url else None,
    }  # fmt: skip
    if version is not None:
        out.update(model_path=model_path, model_name=version.name,
                   model_version=version.version, run_id=version.run_id)  # fmt: skip
    return out
