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
from kiln.errors import ValidationError

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
    sign: Annotated[
        str | None, typer.Option("--sign", help="Sign it with this key (see kiln keys).")
    ] = None,
) -> None:
    """Write a run, its metrics, code patch, env lock and artifacts to one file."""
    from kiln.record.bundle import export_bundle
    from kiln.record.signing import keys_dir

    if not out.name or out.is_dir() or not out.parent.is_dir():
        raise ValidationError(
            "--output", f"{str(out)!r} is not a file path in an existing folder",
            allowed="a file to write, like run.kiln",
        )  # fmt: skip
    rec = _recorder(create=False)
    signer = (keys_dir(), sign) if sign is not None else None
    manifest = export_bundle(
        rec.store, rec.blobs, run_id, out, include_artifacts=not no_blobs, sign=signer
    )
    blobs = manifest["blobs"]
    left_out = [f"{b['what']} {b['sha256'][:12]} ({b['why']})" for b in blobs["left_out"]]
    console().print(plain(
        f"run {manifest['run']['id']} -> {out} ({out.stat().st_size:,} bytes; "
        f"{len(blobs['included'])} blobs in, {len(left_out)} left out"
        + (": " + ", ".join(left_out) if left_out else "") + ")"
        + (f"; signed with {sign}" if sign else "")
    ), soft_wrap=True)  # fmt: skip


def verify(
    bundle: Annotated[Path, typer.Argument(help="A bundle written by kiln export.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check every hash in a bundle, offline. Exits 1 if anything does not match."""
    from kiln.record.bundle import check
    from kiln.record.signing import keys_dir

    checked = check(bundle, keys_dir())
    problems = checked.problems
    if as_json:
        typer.echo(json.dumps({
            "ok": not problems, "problems": problems, "signer": checked.signer,
            "known_signer": checked.known_signer, "signed_by": checked.signed_by,
        }))  # fmt: skip
    elif problems:
        for p in problems:
            console().print(Text.assemble(("bad", "bold red"), " ", p))
    else:
        console().print(Text.assemble(
            (f"{bundle} verified", "green"), f": every hash matches; {checked.signed_by}"
        ))  # fmt: skip
    if problems:
        sys.exit(1)


def import_(
    bundle: Annotated[Path, typer.Argument(help="A bundle written by kiln export.")],
    require_signed: Annotated[
        bool, typer.Option("--require-signed", help="Refuse it unless a known key signed it.")
    ] = False,
) -> None:
    """Add a bundle's run to this store, identical (same ids and hashes). Twice is a no-op."""
    from kiln.record.bundle import import_bundle
    from kiln.record.signing import keys_dir

    rec = _recorder(create=True)
    run_id, written = import_bundle(
        rec.store, rec.blobs, bundle, keys=keys_dir(), require_signed=require_signed
    )
    console().print(
        plain(f"run {run_id} " + ("imported" if written else "was already here: nothing to do"))
    )
