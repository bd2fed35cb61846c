"""Content-addressed blob storage: ``blobs/ab/cdef…`` named by the sha256 of the bytes.

Writes go to a temporary file in the same directory and are renamed into place, so
a reader never sees a partial blob and two writers of the same content both
succeed. A blob that already exists is not written again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO

from kiln._hashing import sha256_bytes, sha256_file
from kiln.errors import NotFoundError


class BlobStore:
    """Blobs under one directory, addressed by sha256 hex digest."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        """Where the blob with this digest lives (it may not exist)."""
        return self.root / sha256[:2] / sha256[2:]

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; return its sha256."""
        sha = sha256_bytes(data)
        if not self.exists(sha):
            self._write_atomically(sha, lambda f: f.write(data))
        return sha

    def put_file(self, source: Path) -> tuple[str, int]:
        """Copy the file at ``source`` into the store; return its sha256 and size."""
        sha, size = sha256_file(source)
        if not self.exists(sha):
            with source.open("rb") as src:
                self._write_atomically(sha, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        return sha, size

    def put_stream(self, source: IO[bytes], sha256: str) -> None:
        """Store the bytes of ``source``, which must hash to ``sha256``; else ValueError."""
        if self.exists(sha256):
            return
        digest = hashlib.sha256()

        def copy(f: BinaryIO) -> None:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
            if digest.hexdigest() != sha256:
                raise ValueError(f"content does not hash to {sha256}")

        self._write_atomically(sha256, copy)

    def read(self, sha256: str) -> bytes:
        """The blob's bytes; :class:`NotFoundError` if it is missing."""
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"blob {sha256} is missing from {self.root}") from None

    def _write_atomically(self, sha: str, write: Callable[[BinaryIO], object]) -> None:
        target = self.path(sha)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o444)  # noqa: PTH101  blobs are immutable once named
            Path(tmp).replace(target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
