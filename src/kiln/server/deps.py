"""What a route is handed: the store as the request's actor, the blob store, the limits."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import unquote

from fastapi import Depends, Header, Request

from kiln.errors import ValidationError
from kiln.record.blobs import FileBlobStore
from kiln.record.store.sql import SqlStore
from kiln.server.auth import Authenticated

ACTOR_HEADER = "Kiln-Actor"
_ACTOR = re.compile(r"[^\x00-\x1f\x7f]{1,200}")


@dataclass(frozen=True, slots=True)
class Limits:
    """Largest bodies the server reads: JSON (after decompression) and one blob."""

    json_bytes: int = 64 << 20
    blob_bytes: int = 64 << 30


def server_store(request: Request) -> SqlStore:
    store: SqlStore = request.app.state.store
    return store


def actor_store(
    request: Request,
    who: Authenticated,
    kiln_actor: Annotated[str | None, Header(pattern=r"^[\x21-\x7e]{1,2400}$")] = None,
) -> SqlStore:
    """The store, recording as the request's caller (the token's principal) and seeing
    only the caller's project. Without
    authentication (``--insecure-no-auth``) the client declares who it is in
    ``Kiln-Actor``, percent-encoded (a declared name is ignored when a token says who)."""
    store: SqlStore = request.app.state.store
    if who.name:
        return store.as_actor(who.name, who.project, token_id=who.token_id,
                              sponsor=who.sponsor)  # fmt: skip
    if kiln_actor is None:
        return store.in_project(who.project)
    actor = _unquote(kiln_actor)
    if actor is None or not _ACTOR.fullmatch(actor):
        raise ValidationError(ACTOR_HEADER, "is not a name", allowed="1-200 printable "
                              "characters, percent-encoded UTF-8")  # fmt: skip
    return store.as_actor(actor, who.project)


def _unquote(text: str) -> str | None:
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        return None


def blob_store(request: Request) -> FileBlobStore:
    blobs: FileBlobStore = request.app.state.blobs
    return blobs


def limits(request: Request) -> Limits:
    found: Limits = request.app.state.limits
    return found


Store = Annotated[SqlStore, Depends(actor_store)]
Blobs = Annotated[FileBlobStore, Depends(blob_store)]
Bounds = Annotated[Limits, Depends(limits)]
