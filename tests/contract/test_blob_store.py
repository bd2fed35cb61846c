"""The BlobStore interface on every implementation: files under KILN_HOME, a real
``kiln server`` over HTTP, and the in-memory fake of kiln.testing. Tests see the interface only."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln._hashing import sha256_bytes
from kiln.errors import NotFoundError
from kiln.record.blobs import FileBlobStore
from kiln.record.store.base import BlobStore
from kiln.record.store.http import HttpStore
from kiln.testing import MemoryBlobStore


@pytest.fixture(params=["files", "http", "memory"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "memory":
        yield MemoryBlobStore(tmp_path / "cache")
    elif request.param == "http":
        server = request.getfixturevalue("start_server")()
        with HttpStore(server.url, cache=tmp_path / "cache") as store:
            yield store.blob_store
    else:
        yield FileBlobStore(tmp_path / "blobs")


def test_bytes_files_and_streams_are_stored_by_content(blobs: BlobStore, tmp_path: Path) -> None:
    sha = blobs.put_bytes(b"weights")
    assert sha == sha256_bytes(b"weights") and blobs.exists(sha)
    assert blobs.put_bytes(b"weights") == sha  # stored once
    source = tmp_path / "model.bin"
    source.write_bytes(b"model" * 1000)
    assert blobs.put_file(source) == (sha256_bytes(b"model" * 1000), 5000)
    streamed = sha256_bytes(b"streamed")
    blobs.put_stream(io.BytesIO(b"streamed"), streamed)
    assert blobs.read(streamed) == b"streamed"
    assert blobs.fetch(sha).read_bytes() == b"weights"


def test_a_stream_that_does_not_hash_to_its_name_stores_nothing(blobs: BlobStore) -> None:
    claimed = sha256_bytes(b"what was promised")
    with pytest.raises(ValueError, match="does not hash"):
        blobs.put_stream(io.BytesIO(b"something else"), claimed)
    assert not blobs.exists(claimed)
    with pytest.raises(NotFoundError):
        blobs.read(claimed)
    with pytest.raises(NotFoundError):
        blobs.fetch(claimed)
