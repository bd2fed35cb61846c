"""``kiln audit ls|verify``: the tamper-evident log of every mutating action."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from kiln.cli._render import console, fmt_time, plain, reader
from kiln.errors import ValidationError
from kiln.record.store.base import KilnStore

app = typer.Typer(help="Read and verify the audit log.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts and agents.")]


def _store() -> KilnStore:
    return reader().store


@app.command("ls")
def ls(
    actor: Annotated[str | None, typer.Option(help="Only this actor.")] = None,
    action: Annotated[str | None, typer.Option(help="Only this action, e.g. run.end.")] = None,
    target: Annotated[str | None, typer.Option(help="Only targets starting with this.")] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, max=1_000_000, help="How many events.")
    ] = 50,
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
def verify(
    anchors: Annotated[
        Path | None, typer.Option("--anchors", help="The anchors file (kiln audit anchor).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the hash chain, every sealed run, the registry and every referenced blob,
    and check the chain still holds every anchor. Exits 1 naming each problem."""
    from kiln.record.anchors import anchors_file, check_anchors

    store = _store()
    problems = list(store.verify())
    path = anchors or anchors_file(store.url)
    problems += list(check_anchors(path, store.event_hash))
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": not problems,
                    "problems": [{"seq": p.seq, "message": p.message} for p in problems],
                    "anchors": str(path) if path.is_file() else None,
                }
            )
        )
    elif problems:
        for p in problems:
            console().print(Text.assemble(("broken", "bold red"), " ", p.message))
    else:
        anchored = f"; anchors in {path} held" if path.is_file() else ""
        console().print(
            "[green]audit log verified[/]: chain, sealed runs, registry and blobs intact"
            + anchored,
            soft_wrap=True,
        )
    if problems:
        sys.exit(1)


@app.command("anchor")
def anchor(
    to: Annotated[Path | None, typer.Option("--to", help="The anchors file to append to.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the chain's head (event number and hash) outside the database, so that
    `kiln audit verify` finds the newest events removed."""
    from kiln.record.anchors import anchors_file, write_anchor

    store = _store()
    problems = list(store.verify())
    if problems:
        for p in problems:
            console().print(Text.assemble(("broken", "bold red"), " ", p.message))
        console().print("not anchored: the log does not verify")
        sys.exit(1)
    path = to or anchors_file(store.url)
    if path.is_dir() or not path.name:
        raise ValidationError("--to", f"{str(path)!r} is a folder", allowed="a file to append to")
    written = write_anchor(path, *store.chain_head())
    if as_json:
        typer.echo(json.dumps({**written, "file": str(path)}))
    else:
        console().print(
            plain(f"anchored event {written['seq']} ({str(written['hash'])[:12]}) in {path}")
        )
