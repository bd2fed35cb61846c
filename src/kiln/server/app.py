"""The ASGI application of ``kiln server`` over one SQL store and its blobs.

FastAPI on uvicorn: the team's choice for its OpenAPI 3.1 document made from the
typed routes (checked by schemathesis in CI) and because Kiln's endpoints and
benchmarks already stand on the same stack. Routes that touch the database are plain
functions (run in the thread pool, as the store is synchronous); uploads, downloads
and batch bodies are read asynchronously.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.errors import KilnError
from kiln.observe.cost import Prices
from kiln.record.blobs import FileBlobStore
from kiln.record.store.sql import SqlStore
from kiln.server import mcp, problems
from kiln.server.auth import Guard, public
from kiln.server.deps import Limits
from kiln.server.metrics import LATENCY, REQUESTS, exposition
from kiln.server.quotas import LEASE_S, Admissions
from kiln.server.routes import (
    approvals,
    audit,
    blobs,
    identity,
    quotas,
    registry,
    runs,
    serving,
    ui,
)

API_VERSION = "v1"


def build_app(
    store: SqlStore,
    blob_store: FileBlobStore,
    home: Path,
    *,
    limits: Limits | None = None,
    auth: bool = True,
    prices: Prices | None = None,
    lease_s: float = LEASE_S,
    public_url: str | None = None,
    functions: Mapping[str, Any] | None = None,
    run_settings: Any = None,
) -> FastAPI:
    """The server's application: ``/api/v1/...``, ``/openapi.json``, ``/healthz``,
    ``/readyz``, ``/metrics``, the MCP server at ``/mcp`` and the dashboard at ``/``.
    ``public_url`` is where clients reach it (the MCP resource's address);
    ``functions`` (name: a ``kiln.Function``) may be run through the MCP tools, on an
    engine of ``run_settings`` recording through this server as each caller."""
    app = FastAPI(
        title="Kiln", version=API_VERSION, docs_url=None, redoc_url=None,
        description="The record of every run, the model registry, endpoints and traces.",
    )  # fmt: skip
    app.state.store = store
    app.state.blobs = blob_store
    app.state.home = home
    app.state.limits = limits or Limits()
    app.state.draining = False
    app.state.auth = auth  # False: --insecure-no-auth
    app.state.guard = Guard()
    app.state.handoffs = {}  # one-time code: token (`kiln ui`)
    app.state.admissions = Admissions(store, prices, lease_s)
    app.state.functions = dict(functions or {})
    app.state.run_settings = run_settings
    routers = (runs.router, blobs.router, serving.router, registry.router, audit.router,
               identity.router, quotas.router, approvals.router, ui.router)  # fmt: skip
    for router in routers:
        app.include_router(router)
    app.router.lifespan_context = _with(app.router.lifespan_context,
                                        mcp.mount(app, public_url=public_url))  # fmt: skip
    app.add_exception_handler(KilnError, problems.kiln_error)
    app.add_exception_handler(RequestValidationError, problems.invalid_request)
    app.add_exception_handler(StarletteHTTPException, problems.http_error)
    app.add_exception_handler(IntegrityError, problems.conflict)
    app.add_exception_handler(ClientDisconnect, problems.gone)
    app.add_exception_handler(Exception, problems.internal_error)

    @app.get("/healthz", tags=["health"], dependencies=[public()])
    def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], dependencies=[public()],
             responses={503: {"description": "not ready"}})  # fmt: skip
    def readyz(request: Request) -> Response:
        """The store answers and the server is not draining."""
        if request.app.state.draining:
            return problems.problem(503, "Service Unavailable", "the server is shutting down")
        try:
            store.chain_head()
        except KilnError as e:
            return problems.problem(503, "Service Unavailable", str(e))
        return Response('{"status":"ready"}', media_type="application/json")

    @app.get("/metrics", tags=["health"], response_class=Response, dependencies=[public()],
             responses={200: {"content": {"text/plain": {}}}})  # fmt: skip
    def metrics() -> Response:
        """Requests by route and code, latency, ingested points, and runs queued or
        running by project and status (Prometheus text)."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(exposition(store.count_runs), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Bounded, limit=app.state.limits.json_bytes)
    app.add_middleware(Measured)
    app.openapi = lambda: document(app)  # type: ignore[method-assign]
    return app


def _with(inner: Any, extra: Callable[[], AbstractAsyncContextManager[None]]) -> Any:
    """The app's lifespan ``inner`` with ``extra`` (the MCP sessions) running inside it."""

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with inner(app) as state, extra():
            yield state

    return lifespan


def document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI 3.1 document: FastAPI's, plus what it cannot see. Every operation may
    answer an error as a problem (RFC 9457, the ``default`` response); the batch body,
    and the span batch, read by hand to inflate them within limits, have their schemas."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    from kiln.server.schemas import Batch, EndpointLogsIn, Problem, SpansIn

    found = get_openapi(title=app.title, version=app.version, description=app.description,
                        routes=app.routes)  # fmt: skip
    schemas = found.setdefault("components", {}).setdefault("schemas", {})
    for model in (Batch, SpansIn, EndpointLogsIn):  # bodies read by hand (gzip): unseen
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        schemas[model.__name__] = body
    schemas["Problem"] = Problem.model_json_schema()
    ref = {"schema": {"$ref": "#/components/schemas/Problem"}}
    problem = {"description": "An error (RFC 9457)", "content": {problems.MEDIA_TYPE: ref}}
    for operations in found["paths"].values():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for code in [c for c in responses if c.startswith(("4", "5"))]:
                if not (method == "head" and code == "404"):  # HEAD: "not stored", no body
                    responses[code] = problem  # FastAPI's 422 names its own model
            responses["default"] = problem
    app.openapi_schema = found
    return found


class Bounded:
    """Every body but a blob's is refused past the JSON bound: a declared length at
    once (413), a chunked body by ending it there (the route sees the client gone).
    Routes that read JSON by hand check the bound again after decompression."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/api/v1/blobs/"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            answer = problems.problem(413, "Content Too Large",
                                      f"the body is larger than {self.limit} bytes")  # fmt: skip
            await answer(scope, receive, send)
            return
        size = 0

        async def bounded() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.limit:
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, bounded, send)


class Measured:
    """Counts every answer by route template (not by path: ids would explode the
    series), method and code, and times it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        code = 500

        async def sending(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            REQUESTS.labels(template, scope["method"], str(code)).inc()
            LATENCY.labels(template).observe(time.perf_counter() - start)
