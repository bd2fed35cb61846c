"""``kiln logs RUN [-f] [--since]``: what a run printed, from the record."""

from __future__ import annotations

import functools
import json
import socket
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer

from kiln.cli._render import parse_duration, reader
from kiln.errors import NotFoundError, ValidationError
from kiln.record.model import LogChunk, RunRecord, RunStatus
from kiln.record.recorder import LOST_AFTER_S, pid_alive
from kiln.record.store.base import EndpointLog

POLL_S = 0.5
PAGE = 1000


def logs(
    run_id: Annotated[str | None, typer.Argument(help="Run id or a unique prefix of it.")] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="An endpoint's replicas instead of a run.")
    ] = None,
    version: Annotated[
        int | None, typer.Option(min=1, help="With --endpoint: only this model version's.")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the run ends.")
    ] = False,
    since: Annotated[
        str | None,
        typer.Option(help="Only output from the last DURATION (30s, 10m, 2h, 1d)."),
    ] = None,
    timestamps: Annotated[
        bool, typer.Option("--timestamps", "-t", help="Start each chunk with when it was read.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per chunk (id, time, stream, text).")
    ] = False,
) -> None:
    """Print what a run printed (stdout and stderr, in order), and with -f follow it.

    Works on this machine's store and through a server (KILN_SERVER) alike. A run
    still open when its process died is closed as lost: -f then stops, saying so.
    With --endpoint, what the endpoint's replicas printed, each line marked with the
    model version it served; -f follows until Ctrl-C.
    """
    if (run_id is None) == (endpoint is None):
        raise ValidationError("RUN_ID", "name a run, or an endpoint with --endpoint (not both)")
    if version is not None and endpoint is None:
        raise ValidationError("--version", "goes with --endpoint")
    cutoff = None if since is None else time.time() - parse_duration(since, "--since")
    show = functools.partial(_print, as_json=as_json, timestamps=timestamps, cutoff=cutoff)
    store = reader().store
    if endpoint is not None:
        _endpoint_logs(store, endpoint, version, follow=follow, show=show)
        return
    assert run_id is not None  # noqa: S101  checked above
    _run_logs(store, run_id, follow=follow, as_json=as_json, show=show)


def _run_logs(
    store: Any, run_id: str, *, follow: bool, as_json: bool, show: Callable[..., None]
) -> None:
    run = store.get_run(run_id)

    def fetch(after: int) -> list[Any]:
        return list(store.run_logs(run.id, after=after, limit=PAGE))

    after = _drain(fetch, 0, show)
    while follow:
        now = store.get_run(run.id)
        gone = None if now.status.terminal else _owner_gone(now)
        if gone is not None:
            typer.echo(f"kiln: run {run.id[:8]} is still open, but {gone}: it is lost; "
                       "what it printed before is above", err=True)  # fmt: skip
            raise typer.Exit(1)
        if now.status.terminal:
            _drain(fetch, after, show)  # its last flush
            if now.status is not RunStatus.SUCCEEDED and not as_json:
                typer.echo(f"kiln: run {run.id[:8]} ended {now.status}", err=True)
            return
        time.sleep(POLL_S)
        after = _drain(fetch, after, show)


def _endpoint_logs(
    store: Any, name: str, version: int | None, *, follow: bool, show: Callable[..., None]
) -> None:
    if store.endpoint(name) is None:
        raise NotFoundError(f"no endpoint {name!r}; `kiln endpoints ls` lists them")

    def fetch(after: int) -> list[Any]:
        return list(store.endpoint_logs(name, version=version, after=after, limit=PAGE))

    def marked(chunk: Any) -> None:
        show(chunk, mark=version is None)

    after = _drain(fetch, 0, marked)
    while follow:
        time.sleep(POLL_S)
        after = _drain(fetch, after, marked)


def _drain(fetch: Callable[[int], list[Any]], after: int, show: Callable[[Any], None]) -> int:
    """Show every chunk past the id ``after``, a page at a time; the last id shown."""
    while True:
        chunks = fetch(after)
        for chunk in chunks:
            show(chunk)
        if chunks:
            after = chunks[-1].id
        if len(chunks) < PAGE:
            return after


def _owner_gone(run: RunRecord) -> str | None:
    """Why the process recording ``run`` is known to be gone (as ``mark_lost_runs``
    decides: its pid on this host, or its heartbeat elsewhere); None if it may live."""
    if run.host == socket.gethostname() and run.pid is not None:
        return None if pid_alive(run.pid) else f"its process (pid {run.pid}) has ended"
    if run.heartbeat_at is not None and time.time() - run.heartbeat_at > LOST_AFTER_S:
        return f"nothing was heard from {run.host} for {LOST_AFTER_S:.0f}s"
    return None


def _print(
    chunk: LogChunk | EndpointLog, *, as_json: bool, timestamps: bool, cutoff: float | None,
    mark: bool = False,
) -> None:  # fmt: skip
    if cutoff is not None and chunk.time < cutoff:
        return
    if as_json:
        record = {"id": chunk.id, "time": chunk.time, "stream": chunk.stream, "text": chunk.text}
        if isinstance(chunk, EndpointLog):
            record |= {"version": chunk.version, "replica": chunk.replica}
        sys.stdout.write(json.dumps(record) + "\n")
    else:
        text = chunk.text
        prefix = ""
        if timestamps:
            prefix = time.strftime("%H:%M:%S ", time.localtime(chunk.time))
        if mark and isinstance(chunk, EndpointLog):  # which version's replica said it
            prefix += f"[v{chunk.version}] " if chunk.version is not None else "[standby] "
        if prefix:
            text = "".join(f"{prefix}{line}" for line in text.splitlines(keepends=True))
        (sys.stderr if chunk.stream != "stdout" else sys.stdout).write(text)
    sys.stdout.flush()
