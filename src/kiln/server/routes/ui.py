"""The web dashboard: one page and its scripts, served as files. Everything it shows
comes from ``/api/v1`` with the token the person signed in with, through the same
routes, roles and projects as every other client; nothing here reads the store.

The page may run only its own scripts (a Content-Security-Policy with no inline
script), may not be framed, and sends no referrer: a run name or log line holding
markup is shown as text, never run.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from starlette.exceptions import HTTPException

from kiln.server.auth import public

router = APIRouter(include_in_schema=False)
FILES = {
    "app.js": "text/javascript",
    "app.css": "text/css",
    "vendor/uPlot.iife.min.js": "text/javascript",
    "vendor/uPlot.min.css": "text/css",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_cache: dict[str, bytes] = {}


def _read(name: str) -> bytes:
    if name not in _cache:
        _cache[name] = (resources.files("kiln.server") / "static" / name).read_bytes()
    return _cache[name]


@router.api_route("/", methods=["GET", "HEAD"], dependencies=[public()])
def index() -> Response:
    """The dashboard's page (its routes are in the address's fragment)."""
    return Response(_read("index.html"), media_type="text/html; charset=utf-8",
                    headers={**HEADERS, "Cache-Control": "no-cache"})  # fmt: skip


@router.api_route("/ui/{name:path}", methods=["GET", "HEAD"], dependencies=[public()])
def asset(name: Annotated[str, Path(max_length=100)], request: Request) -> Response:
    """One of the page's scripts or style sheets (only those: no path is looked up)."""
    if name not in FILES:
        raise HTTPException(404, f"the dashboard has no file {name!r}")
    body = _read(name)
    etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
    headers = {**HEADERS, "ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=FILES[name], headers=headers)
