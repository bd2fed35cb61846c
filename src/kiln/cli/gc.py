"""``kiln gc``: remove blobs that no record references."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from kiln.cli._render import console, parse_duration
from kiln.config import Settings


def gc(
    min_age: Annotated[
        str, typer.Option("--min-age", help="Keep blobs younger than this (30m, 1h, 2d).")
    ] = "1h",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Remove blobs no run, artifact or environment references; never a referenced one."""
    seconds = parse_duration(min_age, "--min-age")
    from kiln.record.blobs import FileBlobStore
    from kiln.record.gc import collect
    from kiln.record.recorder import recorder_for
    from kiln.record.store.http import HttpStore
    from kiln.record.store.sql import SqlStore

    settings = Settings.from_env()
    rec = recorder_for(settings, create=False)
    if isinstance(rec.store, HttpStore):  # the server collects its own blobs
        removed, kept = rec.store.collect_garbage(min_age_s=seconds, dry_run=dry_run)
    else:
        assert isinstance(rec.store, SqlStore) and isinstance(rec.blobs, FileBlobStore)  # noqa: S101
        removed, kept = collect(rec.store, rec.blobs, settings.home, min_age_s=seconds,
                                dry_run=dry_run)  # fmt: skip
    if as_json:
        typer.echo(json.dumps({"removed": removed, "kept": kept, "dry_run": dry_run}))
        return
    verb = "would remove" if dry_run else "removed"
    console().print(f"{verb} {len(removed)} blob(s); {kept} kept")
