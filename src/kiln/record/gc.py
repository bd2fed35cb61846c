"""Blob garbage collection: remove blobs that no record references, never one that is.

A record references a blob through an artifact, a code snapshot (patch or module
source), an environment (package list, lock) or the env cache (declared locks).
A blob younger than ``min_age_s`` is kept even if nothing names it yet: a running
process may have stored it and not yet flushed the row that names it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kiln.record.blobs import BlobStore


def referenced_by_envs(home: Path) -> set[str]:
    """Locks the env cache needs to rebuild an env without the resolver."""
    found = set()
    envs = home / "envs"
    for meta in (*envs.glob("declarations/*.json"), *envs.glob("*/.kiln-env.json")):
        try:
            found.add(json.loads(meta.read_text())["lock_sha256"])
        except (OSError, ValueError, KeyError):
            continue
    return found


def collect(
    store: Any, blobs: BlobStore, home: Path, *, min_age_s: float, dry_run: bool = False
) -> tuple[list[str], int]:
    """Remove unreferenced blobs older than ``min_age_s``; return them and how many stay."""
    keep = store.referenced_blobs() | referenced_by_envs(home)
    cutoff = time.time() - min_age_s
    removed: list[str] = []
    kept = 0
    if not blobs.root.is_dir():
        return removed, kept
    for path in sorted(blobs.root.glob("??/*")):
        sha = path.parent.name + path.name
        if sha in keep or path.name.startswith(".tmp-") or path.stat().st_mtime > cutoff:
            kept += 1
            continue
        if not dry_run:
            path.unlink()
        removed.append(sha)
    return removed, kept
