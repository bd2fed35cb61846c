"""Content-addressed blob storage: ``blobs/ab/cdef…`` named by the sha256 of the bytes.

Writes go to a temporary file (``.tmp-*``) in the same directory and are renamed
into place, so a reader never sees a partial blob and two writers of the same
content both succeed. A blob that already exists is not written again, but its
modification time is set to now: ``kiln gc`` keeps young blobs, and bytes just saved
again are young whatever the age of the file that already held them.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, BinaryIO

from kiln._hashing import sha256_bytes, sha256_file
from kiln.errors import NotFoundError

PENDING = ".pending"  # notes of temporary files written outside the store (exports)


class FileBlobStore:
    """Blobs under one directory, addressed by sha256 hex digest."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        """Where the blob with this digest lives (it may not exist)."""
        return self.root / sha256[:2] / sha256[2:]

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def fetch(self, sha256: str) -> Path:
        """A local file holding the blob, to read or load from (never to write to): here,
        the blob itself. Callers outside the record layer use this, never :meth:`path`,
        so that a store whose blobs are elsewhere (a team server's) can download it
        into a cache instead. NotFoundError if it is missing."""
        path = self.path(sha256)
        if not path.is_file():
            raise NotFoundError(f"blob {sha256[:12]} is missing from {self.root}")
        return path

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; return its sha256."""
        sha = sha256_bytes(data)
        if not self._refresh(sha):
            self._write_atomically(sha, lambda f: f.write(data))
        return sha

    def put_file(self, source: Path) -> tuple[str, int]:
        """Copy the file at ``source`` into the store; return its sha256 and size."""
        sha, size = sha256_file(source)
        if not self._refresh(sha):
            with source.open("rb") as src:
                self._write_atomically(sha, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        return sha, size

    def put_stream(self, source: IO[bytes], sha256: str) -> None:
        """Store the bytes of ``source``, which must hash to ``sha256``; else ValueError."""
        if self._refresh(sha256):
            return
        digest = hashlib.sha256()

        def copy(f: BinaryIO) -> None:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
            if digest.hexdigest() != sha256:
                raise ValueError(f"content does not hash to {sha256}")

        self._write_atomically(sha256, copy)

    def _refresh(self, sha256: str) -> bool:
        """Mark an existing blob as just saved; False if there is none (to write it).

        Against ``kiln gc``: if gc took the blob away before this, the blob is written
        again; if after, gc sees it young (it checks the age once more, after moving
        the blob aside) and puts it back."""
        try:
            os.utime(self.path(sha256))
        except FileNotFoundError:
            return False
        except PermissionError:  # another user's blob in a shared store: it is there
            pass
        return True

    def read(self, sha256: str) -> bytes:
        """The blob's bytes; :class:`NotFoundError` if it is missing."""
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"blob {sha256} is missing from {self.root}") from None

    @contextmanager
    def temp_beside(self, out: Path) -> Iterator[Path]:
        """A temporary path next to ``out`` (to write, then rename onto ``out``), noted
        under ``.pending/`` so that ``kiln gc`` removes it if its writer is killed."""
        token = secrets.token_hex(8)
        tmp = out.with_name(f".{out.name}.{token}.tmp")
        note = self.root / PENDING / token
        note.parent.mkdir(parents=True, exist_ok=True)
        writer = {"path": str(tmp.absolute()), "pid": os.getpid(), "host": socket.gethostname()}
        note.write_text(json.dumps(writer))
        try:
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)  # renamed onto ``out`` already, unless it failed
            note.unlink(missing_ok=True)

    def incoming(self, sha256: str) -> tuple[BinaryIO, Path]:
        """A new temporary file beside where blob ``sha256`` goes, open to write (an upload
        arriving in pieces); :meth:`adopt` names it once its bytes are checked. If its
        writer dies, ``kiln gc`` removes it (it is a ``.tmp-`` file)."""
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        return os.fdopen(fd, "wb"), Path(tmp)

    def adopt(self, tmp: Path, sha256: str) -> None:
        """Make the temporary file ``tmp`` (from :meth:`incoming`, closed, its bytes
        checked to hash to ``sha256``) the blob ``sha256``."""
        os.chmod(tmp, 0o444)  # noqa: PTH101  blobs are immutable once named
        tmp.replace(self.path(sha256))

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
