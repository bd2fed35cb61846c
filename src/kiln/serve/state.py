"""Endpoints in the store: what is served where, its live traffic split and its figures.

A serving process writes its row when it starts, its figures every few seconds and
``stopped`` when it ends; ``kiln endpoints ls|show`` read them. ``set_traffic`` is
how another process changes a live split: the server polls its row and follows.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from kiln.errors import NotFoundError
from kiln.record import audit
from kiln.record.store._schema import endpoints
from kiln.record.store.sql import SqlStore
from kiln.serve.endpoint import EndpointSpec, parse_traffic


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    name: str
    app: str
    model: str
    spec: dict[str, Any]
    traffic: dict[str, float] | None
    url: str | None
    host: str | None
    pid: int | None
    status: str
    stats: dict[str, Any]
    started_at: float | None
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def targets(store: SqlStore, spec: EndpointSpec, actor: str) -> dict[int, float]:
    """Which versions get what share now: the live split, the declared split, or the
    holder of the model reference."""
    from kiln.registry.models import Models
    from kiln.registry.refs import parse_ref

    split = live_traffic(store, spec.name) or spec.traffic
    if split:
        return {parse_ref(ref)[1] or 0: w for ref, w in split.items()}
    return {Models(store, app=spec.app, actor=actor).get(spec.model).version: 100.0}


def announce(store: SqlStore, spec: EndpointSpec, url: str) -> None:
    """Record that this process serves ``spec`` at ``url`` (a live split set earlier is kept)."""
    now = time.time()
    values = {
        "app": spec.app, "model": spec.model, "spec": spec.to_json(), "url": url,
        "host": socket.gethostname(), "pid": os.getpid(), "status": "serving", "stats": {},
        "started_at": now, "updated_at": now,
    }  # fmt: skip
    with store.transaction() as conn:
        exists = conn.execute(
            sa.select(endpoints.c.name).where(endpoints.c.name == spec.name)
        ).first()
        if exists is None:
            conn.execute(endpoints.insert().values(name=spec.name, traffic=None, **values))
        else:
            conn.execute(endpoints.update().where(endpoints.c.name == spec.name).values(**values))
        store.append_events(conn, [audit.Event("endpoint.serve", spec.name,
                                               {"model": spec.model, "url": url}, now,
                                               store.actor)])  # fmt: skip


def report(
    store: SqlStore, name: str, stats: dict[str, Any], *, status: str = "serving",
    url: str | None = None,
) -> None:  # fmt: skip
    values: dict[str, Any] = {"stats": stats, "status": status, "updated_at": time.time()}
    if url:
        values["url"] = url
    with store.transaction() as conn:
        conn.execute(endpoints.update().where(endpoints.c.name == name).values(**values))


def live_traffic(store: SqlStore, name: str) -> dict[str, float] | None:
    with store.connect() as conn:
        value = conn.execute(
            sa.select(endpoints.c.traffic).where(endpoints.c.name == name)
        ).scalar()
    return dict(value) if value else None


def set_traffic(
    store: SqlStore, name: str, traffic: dict[str, Any] | None, *, actor: str
) -> dict[str, float] | None:
    """Set a live split for endpoint ``name`` (None: follow its declared model again).
    Every version named must be registered. Audited as ``endpoint.traffic``."""
    from kiln.registry.models import Models

    info = get(store, name)
    model_name = info.model.partition("@")[0].partition(":")[0]
    split = None if traffic is None else parse_traffic(traffic, model_name)
    if split:
        models = Models(store, app=info.app, actor=actor)
        for ref in split:
            models.get(ref)  # NotFoundError names the missing version
    with store.transaction() as conn:
        conn.execute(endpoints.update().where(endpoints.c.name == name).values(traffic=split))
        store.append_events(
            conn, [audit.Event("endpoint.traffic", name, {"traffic": split}, time.time(), actor)]
        )
    return split


def get(store: SqlStore, name: str) -> EndpointInfo:
    with store.connect() as conn:
        row = conn.execute(sa.select(endpoints).where(endpoints.c.name == name)).mappings().first()
    if row is None:
        raise NotFoundError(f"no endpoint {name!r}; `kiln endpoints ls` lists them")
    return _info(dict(row))


def all_endpoints(store: SqlStore) -> list[EndpointInfo]:
    with store.connect() as conn:
        rows = conn.execute(sa.select(endpoints).order_by(endpoints.c.name)).mappings()
        return [_info(dict(r)) for r in rows]


def _info(row: dict[str, Any]) -> EndpointInfo:
    row["stats"] = row["stats"] or {}
    if row["status"] == "serving" and not _alive(row):
        row["status"] = "gone"  # its process ended without saying so
    return EndpointInfo(**row)


def _alive(row: dict[str, Any]) -> bool:
    if row["host"] != socket.gethostname() or not row["pid"]:
        return True  # another machine's process: trust its last report
    try:
        os.kill(int(row["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
