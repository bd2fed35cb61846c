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

from kiln.errors import KilnError, NotFoundError
from kiln.record import audit
from kiln.record.store._schema import endpoints
from kiln.record.store.sql import SqlStore
from kiln.registry.policy import PolicyError
from kiln.registry.refs import parse_ref
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
    store: SqlStore,
    name: str,
    traffic: dict[str, Any] | None,
    *,
    actor: str,
    override_reason: str | None = None,
) -> dict[str, float] | None:
    """Set a live split for endpoint ``name`` (None: follow its declared model again).

    Every version named must be registered, and when the endpoint follows an alias,
    every version given traffic must pass the gates a promotion to that alias would
    (:class:`TrafficRefused` names each failure). ``override_reason`` sends it anyway;
    the override, who made it and why are kept in the ``endpoint.traffic`` audit event.
    """
    from kiln.registry.models import Models

    info = get(store, name)
    model_name = parse_ref(info.model)[0]
    split = None if traffic is None else parse_traffic(traffic, model_name)
    models = Models(store, app=info.app, actor=actor)
    for ref in split or {}:
        models.get(ref)  # NotFoundError names the missing version
    payload: dict[str, Any] = {"traffic": split}
    failures = gate_failures(store, info.model, split or info.spec.get("traffic"), actor=actor)
    if failures:
        if override_reason is None:
            raise TrafficRefused(name, info.model, failures)
        payload["override_policy"] = {"reason": override_reason, "failures": failures}
    with store.transaction() as conn:
        conn.execute(endpoints.update().where(endpoints.c.name == name).values(traffic=split))
        store.append_events(
            conn, [audit.Event("endpoint.traffic", name, payload, time.time(), actor)]
        )
    return split


class TrafficRefused(PolicyError):
    """A split would send requests to versions that fail the promotion gates of the
    alias the endpoint follows; ``failures`` names each, prefixed by its version."""

    def __init__(self, endpoint: str, model: str, failures: list[str]) -> None:
        self.failures = failures
        KilnError.__init__(
            self,
            f"endpoint {endpoint}: a split through {model} may only send traffic to versions "
            f"that pass its promotion policy: {'; '.join(failures)}. Promote them first, or "
            "override with `kiln endpoints set-traffic ... --override-policy --reason TEXT` "
            "(audited)",
        )


def gate_failures(
    store: SqlStore, model: str, split: dict[str, float] | None, *, actor: str
) -> list[str]:
    """What each version given traffic by ``split`` fails of the promotion gates of the
    alias ``model`` follows (``name@alias``); nothing for a pinned model or no split."""
    from kiln.registry.models import Models

    name, _, alias = parse_ref(model)
    if alias is None or not split:
        return []
    models = Models(store, app="", actor=actor)
    failures = []
    for ref, weight in split.items():
        version = parse_ref(ref)[1]
        if weight > 0 and version is not None:
            failures += [f"{ref}: {f}" for f in models.gate_failures(name, version, alias)]
    return failures


def check_declared_traffic(store: SqlStore, spec: EndpointSpec, actor: str) -> None:
    """Refuse to start serving a declared ``traffic=`` split that fails the gates of the
    alias the endpoint follows (a live split, set and checked by ``set_traffic``, wins)."""
    if spec.traffic and live_traffic(store, spec.name) is None:
        failures = gate_failures(store, spec.model, spec.traffic, actor=actor)
        if failures:
            raise TrafficRefused(spec.name, spec.model, failures)


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
