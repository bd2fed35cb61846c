"""``kiln gc``: remove blobs that no record references."""

from __future__ import annotations

import json
import re
from typing import Annotated

import typer

from kiln.cli._render import console
from kiln.config import Settings
from kiln.errors import ValidationError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def gc(
    min_age: Annotated[
        str, typer.Option("--min-age", help="Keep blobs younger than this (30m, 1h, 2d).")
    ] = "1h",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Remove blobs no run, artifact or environment references; never a referenced one."""
    match = _DURATION.match(min_age)
    if match is None:
        raise ValidationError("--min-age", f"{min_age!r} is not a duration", allowed="30m, 1h, 2d")
    from kiln.record.gc import collect
    from kiln.record.recorder import recorder_for

    settings = Settings.from_env()
    rec = recorder_for(settings, create=False)
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    removed, kept = collect(rec.store, rec.blobs, settings.home, min_age_s=seconds, dry_run=dry_run)
    if as_json:
        typer.echo(json.dumps({"removed": removed, "kept": kept, "dry_run": dry_run}))
        return
    verb = "would remove" if dry_run else "removed"
    console().print(f"{verb} {len(removed)} blob(s); {kept} kept")
