"""``EndpointStore`` and ``SpanStore`` over HTTP: endpoints announce, report and find their
traffic split here; replicas send their spans here; ``kiln why`` finds traces here."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from kiln.errors import NotFoundError
from kiln.record.store.base import EndpointLogRow, EndpointRow, ServerRow
from kiln.registry import traffic
from kiln.server import schemas
from kiln.server.auth import Authenticated, need
from kiln.server.deps import Bounds, Store
from kiln.server.operations import guard_route
from kiln.server.routes.runs import gzip_body, parse_body, read_json_body

router = APIRouter(prefix="/api/v1", tags=["serving"])
Name = Annotated[str, Path(pattern=schemas.NAME_PATTERN)]


def _not_an_agent(who: Authenticated) -> None:
    """Endpoints are declared by their servers (a person's ``kiln serve``, a service
    account's replicas), never by an agent: it changes traffic through an approval."""
    if who.kind == "agent":
        raise HTTPException(403, "an agent does not declare endpoints or report for their "
                            "servers; it asks to change traffic (traffic_set), which a "
                            "person approves")  # fmt: skip


@router.post("/servers", dependencies=[need("endpoints", "write")], status_code=204)
def announce(body: schemas.Announce, store: Store, who: Authenticated) -> None:
    """Declare the endpoint (its live split kept), add a server of it and forget old ones.
    Not an agent's: a declaration names the model and split that serve."""
    _not_an_agent(who)
    endpoint = EndpointRow(**body.endpoint.model_dump())
    server = ServerRow(endpoint=endpoint.name, **body.server.model_dump())
    store.announce_server(endpoint, server, forget=body.forget)


@router.patch("/servers/{server_id}", dependencies=[need("endpoints", "write")], status_code=204)
def report(
    server_id: Annotated[str, Path(min_length=1, max_length=32)], body: schemas.Report,
    store: Store, who: Authenticated,
) -> None:  # fmt: skip
    """A server's heartbeat (no stats: keep its last ones), or its end (not an agent's)."""
    _not_an_agent(who)
    store.report_server(server_id, status=body.status, stats=body.stats, url=body.url)


@router.get(
    "/endpoints", dependencies=[need("endpoints", "read")], response_model=schemas.Endpoints
)
def endpoints(store: Store) -> Any:
    """Every declared endpoint, by name."""
    return {"endpoints": [asdict(e) for e in store.endpoints()]}


@router.get(
    "/endpoints/{name}", dependencies=[need("endpoints", "read")], response_model=schemas.EndpointIn
)
def endpoint(name: Name, store: Store) -> Any:
    found = store.endpoint(name)
    if found is None:
        raise NotFoundError(f"no endpoint {name!r}; `kiln endpoints ls` lists them")
    return asdict(found)


@router.get("/servers", dependencies=[need("endpoints", "read")], response_model=schemas.Servers)
def servers(
    store: Store,
    endpoint: Annotated[list[Annotated[str, Query(max_length=200)]], Query(max_length=100)],
) -> Any:  # fmt: skip
    """The servers of these endpoints, newest first."""
    return {"servers": [asdict(s) for s in store.servers(endpoint)]}


@router.post(
    "/endpoints/{name}/logs",
    dependencies=[need("endpoints", "write")],
    status_code=204,
    openapi_extra={"requestBody": gzip_body("EndpointLogsIn")},
)
async def write_endpoint_logs(name: Name, request: Request, store: Store, bounds: Bounds) -> None:
    """Store what replicas of the endpoint printed (it must be declared in the project;
    the body may be gzipped)."""
    raw = await read_json_body(request, bounds.json_bytes)
    body = parse_body(schemas.EndpointLogsIn, raw)
    if await run_in_threadpool(store.endpoint, name) is None:
        raise NotFoundError(f"no endpoint {name!r}")
    rows: list[EndpointLogRow] = [(name, v, p, t, s, x) for v, p, t, s, x in body.logs]
    await run_in_threadpool(store.write_endpoint_logs, rows)


@router.get("/endpoints/{name}/logs", dependencies=[need("endpoints", "read")],
            response_model=schemas.EndpointLogs)  # fmt: skip
def endpoint_logs(
    name: Name,
    store: Store,
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Any:
    """What the replicas of an endpoint (of one version) printed, past the chunk ``after``
    (none for an endpoint this project does not have)."""
    found = store.endpoint_logs(name, version=version, after=after, limit=limit)
    return {"logs": [asdict(c) for c in found]}


@router.put(
    "/endpoints/{name}/traffic",
    dependencies=[need("endpoints", "write")],
    response_model=schemas.TrafficSet,
)
def set_traffic(name: Name, body: schemas.Traffic, store: Store, who: Authenticated) -> Any:
    """Check and set (null: clear) the endpoint's live split, with its audit event: every
    version named is registered and, when the endpoint follows an alias, passes its
    promotion gates (409 naming each failure), unless ``override_reason`` says why not.
    An agent's change waits for a human's approval of exactly these arguments."""
    if who.kind == "agent":
        guard_route(store, who, "traffic_set", {"endpoint": name, **body.model_dump()})
    split = traffic.set_traffic(store, name, body.traffic, actor=store.actor,
                                override_reason=body.override_reason)  # fmt: skip
    return {"traffic": split}


@router.post(
    "/spans",
    dependencies=[need("traces", "write")],
    status_code=204,
    openapi_extra={"requestBody": gzip_body("SpansIn")},
)
async def write_spans(request: Request, store: Store, bounds: Bounds) -> None:
    """Store finished spans (the body may be gzipped), all or none."""
    body = parse_body(schemas.SpansIn, await read_json_body(request, bounds.json_bytes))
    await run_in_threadpool(store.write_spans, body.spans)


@router.get("/spans", dependencies=[need("traces", "read")], response_model=schemas.Spans)
def list_spans(
    store: Store,
    endpoint: Annotated[str | None, Query(max_length=200)] = None,
    run_id: Annotated[str | None, Query(max_length=32)] = None,
    errors_only: bool = False,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 50,
) -> Any:
    """Recorded spans, newest first."""
    return {"spans": store.list_spans(endpoint=endpoint, run_id=run_id,
                                      errors_only=errors_only, limit=limit)}  # fmt: skip


@router.get(
    "/traces/{trace_id}", dependencies=[need("traces", "read")], response_model=schemas.Spans
)
def find_trace(trace_id: Annotated[str, Path(pattern=schemas.TRACE_PATTERN)], store: Store) -> Any:
    """The spans of a trace, by its id or a unique prefix of 8 or more, oldest first."""
    return {"spans": store.find_trace(trace_id)}


@router.get("/traces/{trace_id}/why", dependencies=[need("traces", "read")])
def why(
    trace_id: Annotated[str, Path(min_length=8, max_length=60, pattern=r"^[0-9a-fA-F-]+$")],
    store: Store,
) -> dict[str, Any]:
    """Everything behind one answer (a trace id, a unique prefix of 8 or more, or the
    traceparent it carried): input, output, model version, promotions, run, code, data
    and environment, as ``kiln why --json`` prints it."""
    import json

    from kiln.observe.why import explain

    found: dict[str, Any] = json.loads(json.dumps(explain(store, trace_id), default=str))
    return found
