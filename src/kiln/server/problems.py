"""Errors as RFC 9457 problem details: ``application/problem+json`` naming the field.

Kiln's own errors keep their class name in ``type`` (``urn:kiln:error:NotFoundError``)
and their context (``field``, ``allowed``, ``run_id``, ``matches``, ``dependants``,
``failures``) as extension members, so the HTTP client raises the same error the
embedded store would. HTTP status codes are chosen here and nowhere else.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.errors import (
    AmbiguousIdError,
    ConfigError,
    DependencyError,
    KilnError,
    NotFoundError,
    StoreRefusedError,
    StoreUnavailableError,
    ValidationError,
)
from kiln.registry.policy import PolicyError

MEDIA_TYPE = "application/problem+json"
_CONTEXT = ("field", "allowed", "run_id", "prefix", "matches", "dependants", "failures",
            "setting")  # fmt: skip


def problem(
    status: int, title: str, detail: str, *, type_: str = "about:blank",
    headers: dict[str, str] | None = None, **extra: Any,
) -> JSONResponse:  # fmt: skip
    body = {"type": type_, "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def status_of(error: KilnError) -> int:
    if isinstance(error, NotFoundError):
        return 404
    if isinstance(error, AmbiguousIdError | DependencyError):
        return 409
    if isinstance(error, StoreUnavailableError):
        return 503
    if isinstance(error, ValidationError | ConfigError | StoreRefusedError):
        return 422
    if isinstance(error, PolicyError):
        return 409
    return 400


async def kiln_error(request: Request, error: Exception) -> JSONResponse:
    if not isinstance(error, KilnError):  # pragma: no cover - registered for KilnError only
        raise error
    extra = {k: getattr(error, k) for k in _CONTEXT if getattr(error, k, None) is not None}
    status = status_of(error)
    return problem(status, type(error).__name__, _scrub(request, str(error)),
                   type_=f"urn:kiln:error:{type(error).__name__}", **extra)  # fmt: skip


def _scrub(request: Request, detail: str) -> str:
    """``detail`` without the server's own paths and database URL: a client is told
    what was wrong with its request, not where the server keeps things."""
    state = request.app.state
    for secret, said in ((str(state.store.url), "the server's store"),
                         (str(state.blobs.root), "the server's blob store")):  # fmt: skip
        detail = detail.replace(f"store {secret}:", f"{said}:").replace(secret, said)
    return detail


async def invalid_request(_request: Request, error: Exception) -> JSONResponse:
    if not isinstance(error, RequestValidationError):  # pragma: no cover
        raise error
    errors = [
        {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in error.errors()
    ]
    first = errors[0] if errors else {"field": "body", "message": "invalid"}
    return problem(
        422, "Invalid request", f"{first['field']}: {first['message']}",
        type_="urn:kiln:error:ValidationError", field=first["field"], errors=errors,
    )  # fmt: skip


async def http_error(request: Request, error: Exception) -> JSONResponse:
    if not isinstance(error, StarletteHTTPException):  # pragma: no cover
        raise error
    headers = dict(error.headers or {})
    if error.status_code == 405:  # every method of the path, not only of one route
        headers["Allow"] = ", ".join(allowed_methods(request))
    titles = {401: "Unauthorized", 403: "Forbidden", 429: "Too Many Requests",
              404: "Not Found", 405: "Method Not Allowed", 413: "Content Too Large",
              411: "Length Required", 416: "Range Not Satisfiable"}  # fmt: skip
    return problem(error.status_code, titles.get(error.status_code, "Error"), str(error.detail),
                   headers=headers)  # fmt: skip


def allowed_methods(request: Request) -> list[str]:
    """The methods some route takes at this path (FastAPI's included routers match a
    method only as a whole, so each is tried)."""
    from starlette.routing import Match

    allowed = []
    for method in ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


async def conflict(_request: Request, _error: Exception) -> JSONResponse:
    # A row with the same key exists (a span or a server sent twice, an id reused).
    detail = "the request conflicts with a stored record (its id is taken); nothing was written"
    return problem(409, "Conflict", detail, type_="urn:kiln:error:StoreRefusedError")


async def gone(_request: Request, _error: Exception) -> JSONResponse:
    # The client went away mid-body (or the 408 sweep cut it off): nothing was stored,
    # and nobody is left to read an answer; not a server failure, so no traceback.
    return problem(400, "Client Closed Request", "the body did not arrive whole")


async def internal_error(_request: Request, _error: Exception) -> JSONResponse:
    # The message may hold anything (paths, values): it goes to the server's log only.
    return problem(500, "Internal Server Error", "the server failed; its log says why")
