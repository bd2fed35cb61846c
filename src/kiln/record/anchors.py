"""Anchors: the audit chain's head written down outside the database.

The chain proves that no event was changed, removed or reordered *before its end*;
deleting the newest events leaves a shorter chain that is still whole. An anchor,
``{"seq": N, "hash": H, "time": T}``, kept where the database's writer cannot
reach it (a file on other storage, a commit, a ticket; the team server will publish
signed checkpoints), closes that gap: ``verify`` fails when the chain no longer
holds event N with hash H.

Anchors of a store go in one JSON-lines file: ``KILN_ANCHORS``, else a file named
after the store's URL in the user's state folder (``$XDG_STATE_HOME/kiln/anchors``
or ``~/.local/state/kiln/anchors``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from kiln.record.audit import Problem


def anchors_file(store_url: str, environ: Mapping[str, str] | None = None) -> Path:
    """Where the anchors of the store at ``store_url`` are kept by default."""
    env = os.environ if environ is None else environ
    if env.get("KILN_ANCHORS"):
        return Path(env["KILN_ANCHORS"]).expanduser().absolute()
    xdg = env.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "state"
    name = hashlib.sha256(store_url.encode()).hexdigest()[:16]
    return base / "kiln" / "anchors" / f"{name}.jsonl"


def write_anchor(path: Path, seq: int, digest: str) -> dict[str, object]:
    """Append the chain's head to ``path``; return the anchor written."""
    anchor: dict[str, object] = {"seq": seq, "hash": digest, "time": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(anchor) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return anchor


def check_anchors(path: Path, event_hash: Callable[[int], str | None]) -> Iterator[Problem]:
    """A problem for each anchor in ``path`` the chain no longer extends."""
    if not path.is_file():
        return
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            anchor = json.loads(line)
            seq, digest = int(anchor["seq"]), str(anchor["hash"])
        except (ValueError, KeyError, TypeError):
            yield Problem(None, f"{path} line {number} is not an anchor")
            continue
        found = event_hash(seq)
        if found is None:
            yield Problem(seq, f"event {seq}, anchored in {path}, is gone: the log was cut")
        elif found != digest:
            yield Problem(
                seq, f"event {seq} is not the one anchored in {path}: the log was rewritten"
            )
