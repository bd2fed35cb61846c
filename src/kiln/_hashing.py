"""sha256 of bytes, files and directory trees, streamed so large data never sits in memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> tuple[str, int]:
    """Return the file's sha256 and size in bytes."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def sha256_tree(root: Path) -> tuple[str, int]:
    """Hash a directory: every file's relative path and content, in sorted order.

    Two trees hash alike exactly when they hold the same files with the same bytes.
    """
    digest = hashlib.sha256()
    total = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        file_sha, size = sha256_file(path)
        digest.update(f"{path.relative_to(root).as_posix()}\0{file_sha}\n".encode())
        total += size
    return digest.hexdigest(), total
