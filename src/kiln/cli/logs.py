"""``kiln logs RUN [-f] [--since]``: what a run printed, from the record."""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Annotated

import typer

from kiln.cli._render import parse_duration, reader
from kiln.record.model import LogChunk, RunRecord, RunStatus
from kiln.record.recorder import LOST_AFTER_S, pid_alive

POLL_S = 0.5
PAGE = 1000


def logs(
    run_id: Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")],
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
    """
    cutoff = None if since is None else time.time() - parse_duration(since, "--since")
    store = reader().store
    run = store.get_run(run_id)
    after = 0
    while True:
        chunks = store.run_logs(run.id, after=after, limit=PAGE)
        for chunk in chunks:
            if cutoff is None or chunk.time >= cutoff:
                _print(chunk, as_json=as_json, timestamps=timestamps)
        if chunks:
            after = chunks[-1].id
        if len(chunks) == PAGE:
            continue
        if not follow:
            return
        now = store.get_run(run.id)
        status = now.status
        gone = None if status.terminal else _owner_gone(now)
        if gone is not None:
            typer.echo(f"kiln: run {run.id[:8]} is still open, but {gone}: it is lost; "
                       "what it printed before is above", err=True)  # fmt: skip
            raise typer.Exit(1)
        if status.terminal:
            rest = store.run_logs(run.id, after=after, limit=PAGE)  # its last flush
            if rest:
                after = rest[-1].id
                for chunk in rest:
                    _print(chunk, as_json=as_json, timestamps=timestamps)
                continue
            if status is not RunStatus.SUCCEEDED and not as_json:
                typer.echo(f"kiln: run {run.id[:8]} ended {status}", err=True)
            return
        time.sleep(POLL_S)


def _owner_gone(run: RunRecord) -> str | None:
    """Why the process recording ``run`` is known to be gone (as ``mark_lost_runs``
    decides: its pid on this host, or its heartbeat elsewhere); None if it may live."""
    if run.host == socket.gethostname() and run.pid is not None:
        return None if pid_alive(run.pid) else f"its process (pid {run.pid}) has ended"
    if run.heartbeat_at is not None and time.time() - run.heartbeat_at > LOST_AFTER_S:
        return f"nothing was heard from {run.host} for {LOST_AFTER_S:.0f}s"
    return None


def _print(chunk: LogChunk, *, as_json: bool, timestamps: bool) -> None:
    if as_json:
        record = {"id": chunk.id, "time": chunk.time, "stream": chunk.stream, "text": chunk.text}
        sys.stdout.write(json.dumps(record) + "\n")
    else:
        text = chunk.text
        if timestamps:
            stamp = time.strftime("%H:%M:%S", time.localtime(chunk.time))
            text = "".join(f"{stamp} {line}" for line in text.splitlines(keepends=True))
        (sys.stderr if chunk.stream != "stdout" else sys.stdout).write(text)
    sys.stdout.flush()
