"""``kiln export``, ``kiln verify`` and ``kiln import``: run bundles."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from kiln.cli._render import console, plain
from kiln.config import Settings

if TYPE_CHECKING:
    from kiln.record.recorder import Recorder


def _recorder(*, create: bool) -> Recorder:
    from kiln.record.recorder import recorder_for

    return recorder_for(Settings.from_env(), create=create)


def export(
    run_id: Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="The bundle file to write.")],
    no_blobs: Annotated[
        bool, typer.Option("--no-blobs", help="Leave artifacts out (their hashes stay in).")
    ] = False,
) -> None:
    """Write a run, its metrics, code patch, env lock and artifacts to one file."""
    from kiln.record.bundle import export_bundle

    rec = _recorder(create=False)
    manifest = export_bundle(rec.store, rec.blobs, run_id, out, include_artifacts=not no_blobs)
    blobs = manifest["blobs"]
    left_out = [f"{b['what']} {b['sha256'][:12]} ({b['why']})" for b in blobs["left_out"]]
    console().print(plain(
        f"run {manifest['run']['id']} -> {out} ({out.stat().st_size:,} bytes; "
        f"{len(blobs['included'])} blobs in, {len(left_out)} left out"
        + (": " + ", ".join(left_out) if left_out else "") + ")"
    ), soft_wrap=True)  # fmt: skip


def verify(
    bundle: Annotated[Path, typer.Argument(help="A bundle written by kiln export.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check every hash in a bundle, offline. Exits 1 if anything does not match."""
    from kiln.record.bundle import verify as check

    problems = check(bundle)
    if as_json:
        typer.echo(json.dumps({"ok": not problems, "problems": problems}))
    elif problems:
        for p in problems:
            console().print(Text.assemble(("bad", "bold red"), " ", p))
    else:
        console().print(Text.assemble((f"{bundle} verified", "green"), ": every hash matches"))
    if problems:
        sys.exit(1)


def import_(
    bundle: Annotated[Path, typer.Argument(help="A bundle written by kiln export.")],
) -> None:
    """Add a bundle's run to this store, identical (same ids and hashes). Twice is a no-op."""
    from kiln.record.bundle import import_bundle

    rec = _recorder(create=True)
    run_id, written = import_bundle(rec.store, rec.blobs, bundle)
    console().print(
        plain(f"run {run_id} " + ("imported" if written else "was already here: nothing to do"))
    )
