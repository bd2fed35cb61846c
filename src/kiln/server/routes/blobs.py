"""``BlobStore`` over HTTP: ask first, upload streaming (checked against its sha256 before
it is named), download streaming with ranges.

Blobs are stored once, whoever sends them, but a project sees only the blobs it sent
(or that its records named before projects existed): to any other project a blob is
one the server does not hold. So a project that sends bytes another project holds
sends them whole and has them checked, as if they were new, and the answer is the
same 201: a content hash tells no project what another holds."""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

from kiln.errors import NotFoundError, ValidationError
from kiln.server.auth import need
from kiln.server.deps import Blobs, Bounds, Store

router = APIRouter(prefix="/api/v1", tags=["blobs"])
Sha = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="the blob's sha256, hex")]
_UPLOAD = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}  # fmt: skip


@router.head(
    "/blobs/{sha256}",
    dependencies=[need("blobs", "read")],
    responses={404: {"description": "not stored"}},
)
def has_blob(sha256: Sha, blobs: Blobs, store: Store) -> Response:
    """200 (with its size) if the server holds the blob for the caller's project, else 404."""
    if not blobs.exists(sha256) or not store.holds_blob(sha256):
        return Response(status_code=404)
    size = blobs.path(sha256).stat().st_size
    return Response(status_code=200, headers={"Content-Length": str(size)})


@router.get(
    "/blobs/{sha256}",
    dependencies=[need("blobs", "read")],
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "a range"}},
)
def get_blob(sha256: Sha, blobs: Blobs, store: Store) -> FileResponse:
    """The blob's bytes, streamed; a ``Range`` header gets part of them (206)."""
    if not store.holds_blob(sha256):
        raise NotFoundError(f"no blob {sha256}")
    path = blobs.fetch(sha256)  # NotFoundError: 404
    immutable = {"Cache-Control": "public, max-age=31536000, immutable"}
    return FileResponse(path, media_type="application/octet-stream", headers=immutable)


@router.put(
    "/blobs/{sha256}", dependencies=[need("blobs", "write")], status_code=201,
    openapi_extra=_UPLOAD, responses={200: {"description": "already stored"}},
)  # fmt: skip
async def put_blob(
    sha256: Sha, request: Request, blobs: Blobs, bounds: Bounds, store: Store
) -> Response:
    """Store the body as blob ``sha256``. It is streamed to disk and named only once its
    bytes hash to ``sha256`` (else 422 and nothing is kept): 201, or 200 if the caller's
    project had it already (the body is then not read)."""
    from starlette.concurrency import run_in_threadpool

    if await run_in_threadpool(store.holds_blob, sha256) and blobs.exists(sha256):
        return Response(status_code=200)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > bounds.blob_bytes:
        raise HTTPException(413, f"a blob larger than {bounds.blob_bytes} bytes")
    digest = hashlib.sha256()
    out, tmp = blobs.incoming(sha256)
    try:
        with out:
            size = await _receive(request, out, digest, bounds.blob_bytes)
        if digest.hexdigest() != sha256:
            raise ValidationError(
                "sha256", f"the body does not hash to {sha256} (its {size} bytes hash to "
                f"{digest.hexdigest()}); nothing was stored",
            )  # fmt: skip
        blobs.adopt(tmp, sha256)  # the same bytes, if another project sent them first
    finally:
        tmp.unlink(missing_ok=True)
    await run_in_threadpool(store.note_blob, sha256)
    return Response(status_code=201)


async def _receive(request: Request, out: BinaryIO, digest: Any, limit: int) -> int:
    """Write the body to ``out`` and hash it, a MiB at a time in a thread while the next
    MiB arrives; its size. 413 past ``limit`` bytes."""
    loop = asyncio.get_running_loop()
    writing: asyncio.Future[None] | None = None
    size = 0
    pending: list[bytes] = []
    held = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"a blob larger than {limit} bytes")
            pending.append(chunk)
            held += len(chunk)
            if held >= 1 << 20:
                if writing is not None:
                    await writing
                writing = loop.run_in_executor(None, _write, out, digest, pending)
                pending, held = [], 0
        if writing is not None:
            await writing
        await loop.run_in_executor(None, _write, out, digest, pending)
        await loop.run_in_executor(None, _sync, out)  # durable before it is named
    finally:
        if writing is not None and not writing.done():
            await asyncio.wait([writing])  # the file closes only after its last write
    return size


def _sync(out: BinaryIO) -> None:
    out.flush()
    os.fsync(out.fileno())


def _write(out: BinaryIO, digest: Any, chunks: list[bytes]) -> None:
    for chunk in chunks:
        digest.update(chunk)
        out.write(chunk)
