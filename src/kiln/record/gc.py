"""Blob garbage collection: remove blobs that no record references, never one that is.

A record references a blob through an artifact, a code snapshot (patch or module
source), an environment (package list, lock) or the env cache (declared locks).
A blob younger than ``min_age_s`` is kept even if nothing names it yet: a running
process may have stored it and not yet flushed the row that names it (saving bytes
a blob already holds makes that blob young again, see ``FileBlobStore._refresh``).

Each blob to remove is first moved aside (``.gc-NAME``); then the references and its
age are read once more, and a blob that a run named or saved again meanwhile is put
back. A gc killed midway leaves blobs aside, which the next one puts back first.
Temporary files of killed writers (blob writes, exports) older than ``min_age_s``
are removed too.
"""

from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.record.blobs import PENDING, FileBlobStore
from kiln.record.recorder import pid_alive

if TYPE_CHECKING:
    from kiln.record.store.sql import SqlStore


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
    store: SqlStore, blobs: FileBlobStore, home: Path, *, min_age_s: float, dry_run: bool = False
) -> tuple[list[str], int]:
    """Remove unreferenced blobs older than ``min_age_s``; return them and how many stay."""
    if not blobs.root.is_dir():
        return [], 0
    if not dry_run:
        _put_back_aside(blobs)
    cutoff = time.time() - min_age_s
    keep = store.referenced_blobs() | referenced_by_envs(home)
    doomed, kept = [], 0
    for path in sorted(blobs.root.glob("??/*")):
        if path.name.startswith("."):  # a temporary file (see below) or a blob aside
            continue
        sha = path.parent.name + path.name
        if sha in keep or _mtime(path) > cutoff:
            kept += 1
        else:
            doomed.append(sha)
    if dry_run:
        return doomed, kept
    aside = {sha: _move_aside(blobs.path(sha)) for sha in doomed}
    keep = store.referenced_blobs() | referenced_by_envs(home)  # what was named meanwhile
    removed = []
    for sha, moved in aside.items():
        if moved is None:
            continue
        if sha in keep or _mtime(moved) > cutoff:
            moved.replace(blobs.path(sha))
            kept += 1
        else:
            moved.unlink()
            removed.append(sha)
    _remove_temporary(blobs, cutoff)
    return removed, kept


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # removed meanwhile: as good as young, so left alone
        return math.inf


def _move_aside(path: Path) -> Path | None:
    moved = path.with_name(f".gc-{path.name}")
    try:
        path.rename(moved)
    except FileNotFoundError:
        return None
    return moved


def _put_back_aside(blobs: FileBlobStore) -> None:
    """Blobs a killed gc left aside go back, unless saved again since (then a copy)."""
    for moved in blobs.root.glob("??/.gc-*"):
        target = moved.with_name(moved.name.removeprefix(".gc-"))
        if target.exists():
            moved.unlink()
        else:
            moved.rename(target)


def _remove_temporary(blobs: FileBlobStore, cutoff: float) -> None:
    """Temporary files of writers killed before ``cutoff``: blob writes (``.tmp-*``
    beside the blobs) and exports (noted under ``.pending/``, see ``temp_beside``)."""
    for tmp in blobs.root.glob("??/.tmp-*"):
        if _mtime(tmp) < cutoff:
            tmp.unlink(missing_ok=True)
    for note in (blobs.root / PENDING).glob("*"):
        try:
            pending = json.loads(note.read_text())
            path, pid, host = Path(pending["path"]), int(pending["pid"]), pending["host"]
        except (OSError, ValueError, KeyError, TypeError):
            note.unlink(missing_ok=True)
            continue
        here = host == socket.gethostname()
        if (here and pid_alive(pid)) or (not here and _mtime(note) > cutoff):
            continue  # an export still under way
        if path.name.endswith(f".{note.name}.tmp") and path.name.startswith("."):
            path.unlink(missing_ok=True)  # only the file this note was made for
        note.unlink(missing_ok=True)
