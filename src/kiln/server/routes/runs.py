"""``RunStore`` over HTTP: batches in, runs, metric history, lineage, rows and removal out."""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from dataclasses import asdict
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from pydantic import ValidationError as PydanticError

from kiln.errors import NotFoundError, ValidationError
from kiln.record.blobs import FileBlobStore
from kiln.record.store._wire import from_number, number, points_to_wire, record_to_wire
from kiln.record.store.base import RunQuery, WriteBatch
from kiln.record.store.sql import SqlStore
from kiln.server import schemas
from kiln.server.auth import Authenticated, need
from kiln.server.deps import Blobs, Bounds, Store
from kiln.server.metrics import INGESTED
from kiln.server.operations import guard_route

router = APIRouter(prefix="/api/v1", tags=["runs"])
_KEY = re.compile(r"[A-Za-z0-9_-]{8,64}")
MAX_SERIES, MAX_SERIES_POINTS = 1000, 4_000_000  # of one runs:series request


def gzip_body(schema: str) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads JSON by hand (maybe gzipped)."""
    ref = {"schema": {"$ref": f"#/components/schemas/{schema}"}}
    return {"required": True, "content": {"application/json": ref}}


_BATCH_BODY = {
    "requestBody": gzip_body("Batch"),
    "parameters": [{
        "name": "Idempotency-Key", "in": "header", "required": False,
        "description": "The batch's key: a batch sent again with it is applied once.",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{8,64}$"},
    }],
}  # fmt: skip
IDEMPOTENCY_HEADER = "Idempotency-Key"


async def read_json_body(request: Request, limit: int) -> bytes:
    """The request's body, gunzipped if it says so, refused (413) past ``limit`` bytes
    read or inflated: a small compressed body cannot make the server hold gigabytes."""
    from starlette.exceptions import HTTPException

    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        raise HTTPException(415, f"Content-Encoding {encoding!r}; send gzip or identity")
    inflate = zlib.decompressobj(wbits=31) if encoding == "gzip" else None
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            if inflate is not None:
                chunk = inflate.decompress(chunk, limit + 1 - size)
                if inflate.unconsumed_tail:
                    size = limit + 1
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"the body is larger than {limit} bytes")
            parts.append(chunk)
    except zlib.error as e:
        raise HTTPException(400, f"the gzip body is malformed ({e})") from None
    if inflate is not None and not inflate.eof:
        raise HTTPException(400, "the gzip body is cut short")
    if inflate is not None and inflate.unused_data:
        raise HTTPException(400, "the gzip body has bytes after its end")
    return b"".join(parts)


M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], data: bytes) -> M:
    """``data`` as ``model``, or a 422 naming the field (as FastAPI's own bodies)."""
    try:
        return model.model_validate_json(data)
    except PydanticError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        ) from None


def _new_run(row: schemas.RunRow, request: Request, caller: str) -> schemas.RunRow:
    """A new run's row; with authentication, who ran it is the token's principal,
    whatever the row says."""
    return row.model_copy(update={"actor": caller}) if request.app.state.auth else row


def _check_blobs(batch: WriteBatch, store: SqlStore, blobs: FileBlobStore) -> None:
    """Refuse a batch naming a blob the caller's project does not hold (upload it first):
    a record cannot claim another project's bytes by naming their hash."""
    for sha, where in batch.blobs().items():
        if not (blobs.exists(sha) and store.holds_blob(sha)):
            raise ValidationError(
                where, f"names blob {sha[:12]}, which this server does not hold; "
                "upload it first (PUT /api/v1/blobs/{sha256})",
            )  # fmt: skip


def _own_runs_only(batch: WriteBatch, store: SqlStore, agent: str) -> None:
    """Refuse an agent's batch touching a run it did not make (a person's run rewritten
    is a record no longer trustworthy, and its artifacts what a model was made of)."""
    new = {r.id for r in batch.new_runs}
    touched = {r for r, *_ in batch.metrics} | {r for r, *_ in batch.summaries}
    touched |= {a.run_id for a in batch.artifacts} | {u.id for u in batch.updates}
    touched |= set(batch.seal) | {r for r, _ in batch.warnings} | {r for r, *_ in batch.logs}
    for run_id in sorted(touched - new):
        try:
            actor = store.get_run(run_id).actor
        except NotFoundError:
            continue  # the store refuses rows of a run it does not have
        if actor != agent:
            from starlette.exceptions import HTTPException

            raise HTTPException(403, f"an agent writes only its own runs; run {run_id} is "
                                f"{actor}'s")  # fmt: skip


def _summary(value: float | str | None) -> float:
    found = from_number(value)
    return math.nan if found is None else found


@router.post(
    "/batches",
    dependencies=[need("runs", "write")],
    response_model=schemas.BatchApplied,
    openapi_extra=_BATCH_BODY,
)
async def write_batch(
    request: Request,
    store: Store,
    bounds: Bounds,
    blobs: Blobs,
    who: Authenticated,
) -> dict[str, int]:
    """Apply one batch in one transaction. A batch sent again with the same
    ``Idempotency-Key`` (its sender did not hear back) is applied once. A file or
    pickle artifact names a blob the server holds (upload it first). An agent writes
    only its own runs."""
    idempotency_key = request.headers.get(IDEMPOTENCY_HEADER)
    if idempotency_key is not None and not _KEY.fullmatch(idempotency_key):
        raise ValidationError(IDEMPOTENCY_HEADER, "is not a key", allowed="8-64 of A-Z a-z 0-9 _ -")
    raw = await read_json_body(request, bounds.json_bytes)
    body = parse_body(schemas.Batch, raw)
    batch = WriteBatch(
        new_runs=[_new_run(r, request, store.actor) for r in body.new_runs],
        metrics=[(r, k, s, t, from_number(v)) for r, k, s, t, v in body.metrics],
        summaries=[(r, a, k, _summary(v)) for r, a, k, v in body.summaries],
        artifacts=body.artifacts,
        updates=body.updates,
        seal=body.seal,
        warnings=[(r, m) for r, m in body.warnings],
        logs=[(r, t, s, x) for r, t, s, x in body.logs],
        origin=body.origin,
        key=idempotency_key,
        digest=hashlib.sha256(raw).hexdigest() if idempotency_key else None,
        actor=store.actor,
    )  # fmt: skip
    from starlette.concurrency import run_in_threadpool

    await run_in_threadpool(_check_blobs, batch, store, blobs)
    if who.kind == "agent":
        await run_in_threadpool(_own_runs_only, batch, store, who.name)
    await run_in_threadpool(store.write, batch)
    INGESTED.inc(len(batch.metrics))
    return {"points": len(batch.metrics)}


@router.get("/runs/{run_id}", dependencies=[need("runs", "read")], response_model=schemas.Run)
def get_run(run_id: Annotated[str, Path(max_length=32)], store: Store) -> Any:
    """The run with this id or unique id prefix."""
    return record_to_wire(store.get_run(run_id))


@router.post("/runs:search", dependencies=[need("runs", "read")], response_model=schemas.Runs)
def query_runs(query: schemas.Query, store: Store) -> Any:
    """Runs matching a filter, in its order (with ``total``: how many match in all)."""
    wanted = _run_query(query)
    total = store.count_matching(wanted) if query.total else None
    return {"runs": [record_to_wire(r) for r in store.query_runs(wanted)], "total": total}


def _run_query(query: schemas.Query) -> RunQuery:
    return RunQuery(
        app=query.app, status=tuple(query.status), params=query.params, tags=query.tags,
        parent_id=query.parent_id, env_id=query.env_id, order_by=query.order_by,
        limit=query.limit, reproductions=query.reproductions, text=query.text,
        metrics=tuple((m.key, m.op, m.value) for m in query.metrics), offset=query.offset,
    )  # fmt: skip


@router.post("/runs:groups", dependencies=[need("runs", "read")], response_model=schemas.Groups)
def group_runs(body: schemas.GroupQuery, store: Store) -> Any:
    """Runs matching a filter grouped by a param or tag, largest groups first (at most
    1,000), with each metric's mean, median, min and max per group."""
    return {"groups": store.group_runs(_run_query(body.query), body.by, body.metrics)}


@router.post("/runs:columns", dependencies=[need("runs", "read")], response_model=schemas.Columns)
def run_columns(query: schemas.Query, store: Store) -> Any:
    """The param, tag and metric names of the newest 1,000 runs matching a filter."""
    return store.run_columns(_run_query(query))


@router.post("/runs:series", dependencies=[need("runs", "read")],
             response_model=schemas.SeriesOut)  # fmt: skip
def series(body: schemas.SeriesQuery, store: Store) -> Any:
    """Metric series of up to 1,000 runs for a chart, each cut to about ``points``
    points keeping every bucket's extremes (exact where the range holds fewer). At most
    1,000 series and 4,000,000 points in all are asked at once."""
    series_n = len(body.runs) * len(body.keys)
    if series_n > MAX_SERIES or series_n * body.points > MAX_SERIES_POINTS:
        raise ValidationError("runs", f"asks for {series_n} series of {body.points} points",
                              allowed=f"at most {MAX_SERIES} series and "
                              f"{MAX_SERIES_POINTS:,} points in all")  # fmt: skip
    found = store.series(body.runs, body.keys, points=body.points, min_step=body.min_step,
                         max_step=body.max_step)  # fmt: skip
    for one in found:
        one["points"] = [[s, number(v)] for s, v in one["points"]]
    return {"series": found}


@router.get(
    "/runs/{run_id}/metrics/{key}",
    dependencies=[need("runs", "read")],
    response_model=schemas.Points,
)
def metric_history(
    run_id: Annotated[str, Path(max_length=32)],
    key: Annotated[str, Path(max_length=250)],
    store: Store,
) -> Any:
    """Every point of one metric of one run, by step then time."""
    return {"points": points_to_wire(store.metric_history(run_id, key))}


@router.get("/runs/{run_id}/fit", dependencies=[need("runs", "read")])
def run_fit(run_id: Annotated[str, Path(max_length=32)], store: Store) -> dict[str, Any]:
    """What the run used against what it asked, and the advice (``kiln runs show``)."""
    from kiln.observe import rightsizing

    found: dict[str, Any] = rightsizing.fit(store.get_run(run_id)).to_dict()
    return found


@router.get("/runs/{run_id}/rows", dependencies=[need("runs", "read")], response_model=schemas.Rows)
def export_rows(run_id: Annotated[str, Path(max_length=32)], store: Store) -> Any:
    """A run's rows as stored, for bundles."""
    rows = store.export_rows(run_id)
    return {
        "run": rows["run"],
        "metrics": [[k, s, t, number(v)] for k, s, t, v in rows["metrics"]],
        "summary": {k: number(v) for k, v in rows["summary"].items()},
        "artifacts": rows["artifacts"],
        "logs": [list(r) for r in rows.get("logs", [])],
    }


@router.get("/runs/{run_id}/logs", dependencies=[need("runs", "read")], response_model=schemas.Logs)
def run_logs(
    run_id: Annotated[str, Path(max_length=32)],
    store: Store,
    after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Any:
    """What a run (id or unique prefix) printed, oldest first, past the chunk ``after``."""
    found = store.run_logs(store.get_run(run_id).id, after=after, limit=limit)
    return {"logs": [asdict(c) for c in found]}


@router.get(
    "/runs/{run_id}/dependants", dependencies=[need("runs", "read")], response_model=schemas.Names
)
def dependants(run_id: Annotated[str, Path(max_length=32)], store: Store) -> Any:
    """What depends on a run (so that it cannot be removed)."""
    return {"items": store.dependants(run_id)}


@router.delete(
    "/runs/{run_id}", dependencies=[need("runs", "delete")], response_model=schemas.Names
)
def delete_run(
    run_id: Annotated[str, Path(max_length=32)],
    store: Store,
    who: Authenticated,
    with_runs: bool = False,
    force: bool = False,
) -> Any:
    """Remove a run (with ``with_runs``, a sweep and its runs); the ids removed. An
    agent's removal waits for a human's approval of exactly these arguments."""
    if who.kind == "agent":  # the run by its whole id: what the approval names
        run_id = guard_route(store, who, "run_delete", {"run_id": run_id, "with_runs": with_runs,
                                                        "force": force}).run_id  # fmt: skip
    return {"items": store.delete_run(run_id, with_runs=with_runs, force=force)}


@router.get(
    "/lineage/{ref}",
    dependencies=[need("runs", "read")],
)
def lineage(
    ref: Annotated[str, Path(min_length=1, max_length=64)],
    store: Store,
    depth: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    """The graph up and down from a run or an artifact."""
    return store.lineage(ref, depth=depth).to_dict()
