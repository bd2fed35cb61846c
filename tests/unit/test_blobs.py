import os
from pathlib import Path

import pytest

from kiln._hashing import sha256_bytes
from kiln.errors import NotFoundError
from kiln.record.blobs import FileBlobStore


def test_blobs_are_addressed_by_content_and_deduplicated(tmp_path: Path) -> None:
    blobs = FileBlobStore(tmp_path)
    sha = blobs.put_bytes(b"hello")
    assert sha == sha256_bytes(b"hello")
    assert blobs.put_bytes(b"hello") == sha
    assert blobs.read(sha) == b"hello"
    src = tmp_path / "f.txt"
    src.write_bytes(b"hello")
    assert blobs.put_file(src) == (sha, 5)
    stored = [p for p in tmp_path.rglob("*") if p.is_file() and p != src]
    assert stored == [blobs.path(sha)]


def test_blobs_are_read_only_and_no_temp_files_remain(tmp_path: Path) -> None:
    blobs = FileBlobStore(tmp_path)
    sha = blobs.put_bytes(b"x" * 10_000)
    assert not os.access(blobs.path(sha), os.W_OK) or os.geteuid() == 0
    assert blobs.path(sha).stat().st_mode & 0o222 == 0
    assert not [p for p in tmp_path.rglob(".tmp-*")]


def test_a_failed_write_leaves_no_partial_blob(tmp_path: Path) -> None:
    blobs = FileBlobStore(tmp_path)

    def explode(f: object) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        blobs._write_atomically("ab" * 32, explode)
    assert not blobs.exists("ab" * 32)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_reading_a_missing_blob_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="missing"):
        FileBlobStore(tmp_path).read("0" * 64)


def test_fetch_gives_a_local_file_to_read_or_a_clear_error(tmp_path: Path) -> None:
    blobs = FileBlobStore(tmp_path)
    sha = blobs.put_bytes(b"model")
    assert blobs.fetch(sha).read_bytes() == b"model"
    with pytest.raises(NotFoundError, match="is missing"):
        blobs.fetch(sha256_bytes(b"never stored"))
