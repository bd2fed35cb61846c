"""``kiln audit ls|verify``: the tamper-evident log of every mutating action."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from kiln.cli._render import console, fmt_time, plain, reader
from kiln.record.store.sql import SqlStore

app = typer.Typer(help="Read and verify the audit log.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts and agents.")]


def _store() -> SqlStore:
    return reader().store


@app.command("ls")
def ls(
    actor: Annotated[str | None, typer.Option(help="Only this actor.")] = None,
    action: Annotated[str | None, typer.Option(help="Only this action, e.g. run.end.")] = None,
    target: Annotated[str | None, typer.Option(help="Only targets starting with this.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many events.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Audit events, newest first."""
    events = _store().audit_events(actor=actor, action=action, target=target, limit=limit)
    if as_json:
        for e in events:
            e["payload"] = json.loads(e["payload"])
        typer.echo(json.dumps(events, indent=2))
        return
    table = Table(header_style="bold", show_edge=False)
    for col in ("seq", "time", "actor", "action"):
        table.add_column(col, no_wrap=True)
    # A target is whole (a run id, fraud@production, a blob): it wraps, never cut short.
    table.add_column("target", overflow="fold", ratio=1)
    table.add_column("hash", no_wrap=True)
    for e in events:
        table.add_row(str(e["seq"]), fmt_time(e["time"]), plain(e["actor"]), plain(e["action"]),
                      plain(e["target"]), e["hash"][:12])  # fmt: skip
    console().print(table)


@app.command("verify")
def verify(as_json: JsonOpt = False) -> None:
    """Recompute the hash chain, every sealed run's data and every referenced blob.
    Exits 1 at the first broken link, naming its sequence number."""
    problems = list(_store().verify())
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": not problems,
                    "problems": [{"seq": p.seq, "message": p.message} for p in problems],
                }
            )
        )
    elif problems:
        for p in problems:
            console().print(Text.assemble(("broken", "bold red"), " ", p.message))
    else:
        console().print("[green]audit log verified[/]: chain, sealed runs and blobs intact")
    if problems:
        sys.exit(1)
