"""Endpoints in the store: what is served where, its live traffic split and its figures.

An endpoint's row holds what is declared (model, spec) and its live split. Each
process serving it has a row of its own in ``endpoint_servers``: written when it
starts, its figures every few seconds (its heartbeat) and ``stopped`` when it ends.
Several processes may serve one endpoint (on other ports or machines), so one of
them stopping or dying says nothing of the others: ``kiln endpoints ls|show`` show
the endpoint serving while any of them is, with their figures added up.
``set_traffic`` is how another process changes a live split: servers poll the
endpoint's row and follow.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any

from kiln.errors import NotFoundError
from kiln.record.store.base import EndpointRow, KilnStore, ServerRow
from kiln.registry.refs import parse_ref
from kiln.registry.traffic import TrafficRefused, gate_failures
from kiln.serve.endpoint import EndpointSpec

# A server reports every few seconds (2 s locally, 5 s on Ray); one silent this long
# is gone, whatever its pid says (the pid may since belong to another process).
STALE_S = 60.0


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """One process serving an endpoint: ``serving``, ``stopped``, or ``gone`` (it ended
    without saying so: its pid is no more, or its reports stopped)."""

    id: str
    url: str | None
    host: str | None
    pid: int | None
    status: str
    stats: dict[str, Any]
    started_at: float
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """An endpoint as ``kiln endpoints`` shows it: what is declared, and its servers.

    ``status`` is ``serving`` while any server is; ``url``, ``host``, ``pid`` and
    ``started_at`` are those of the newest live server (or the newest one); ``stats``
    add up the live servers' figures (or, when none is live, the last ones')."""

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
    servers: tuple[ServerInfo, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = {f: getattr(self, f) for f in self.__dataclass_fields__}
        out["servers"] = [s.to_dict() for s in self.servers]
        return out


def targets(store: KilnStore, spec: EndpointSpec, actor: str) -> dict[int, float]:
    """Which versions get what share now: the live split, the declared split, or the
    holder of the model reference."""
    from kiln.registry.models import models_for

    split = live_traffic(store, spec.name) or spec.traffic
    if split:
        return {parse_ref(ref)[1] or 0: w for ref, w in split.items()}
    return {models_for(store, app=spec.app, actor=actor).get(spec.model).version: 100.0}


def announce(store: KilnStore, spec: EndpointSpec, url: str) -> str:
    """Record that this process serves ``spec`` at ``url``; returns its server id, which
    its reports name. A live split set earlier is kept; rows of servers of this endpoint
    that are no longer live are cleared."""
    now = time.time()
    server_id = secrets.token_hex(8)
    ended = [s.id for s in map(_server, store.servers([spec.name])) if s.status != "serving"]
    store.announce_server(
        EndpointRow(name=spec.name, app=spec.app, model=spec.model, spec=spec.to_json(),
                    traffic=None, updated_at=now),
        ServerRow(id=server_id, endpoint=spec.name, url=url, host=socket.gethostname(),
                  pid=os.getpid(), status="serving", stats={}, started_at=now, updated_at=now),
        forget=ended,
    )  # fmt: skip
    return server_id


def report(
    store: KilnStore, server_id: str, stats: dict[str, Any] | None, *, status: str = "serving",
    url: str | None = None,
) -> None:  # fmt: skip
    """The figures of one server (its heartbeat), or its ``stopped`` as it ends
    (``stats=None`` keeps the figures it reported last)."""
    store.report_server(server_id, status=status, stats=stats, url=url)


def live_traffic(store: KilnStore, name: str) -> dict[str, float] | None:
    found = store.endpoint(name)
    return None if found is None else found.traffic


def check_declared_traffic(store: KilnStore, spec: EndpointSpec, actor: str) -> None:
    """Refuse to start serving a declared ``traffic=`` split that fails the gates of the
    alias the endpoint follows (a live split, set and checked by ``set_traffic``, wins)."""
    if spec.traffic and live_traffic(store, spec.name) is None:
        failures = gate_failures(store, spec.model, spec.traffic, actor=actor)
        if failures:
            raise TrafficRefused(spec.name, spec.model, failures)


def get(store: KilnStore, name: str) -> EndpointInfo:
    row = store.endpoint(name)
    if row is None:
        raise NotFoundError(f"no endpoint {name!r}; `kiln endpoints ls` lists them")
    return _info(row, [_server(s) for s in store.servers([name])])


def all_endpoints(store: KilnStore) -> list[EndpointInfo]:
    rows = store.endpoints()
    servers: dict[str, list[ServerInfo]] = {}
    for server in store.servers([r.name for r in rows]):
        servers.setdefault(server.endpoint, []).append(_server(server))
    return [_info(r, servers.get(r.name, [])) for r in rows]


def _server(row: ServerRow) -> ServerInfo:
    status, stats = row.status, row.stats
    if status == "serving" and not _alive(row):
        status = "gone"  # its process ended without saying so
    if status != "serving":
        stats = _ended(stats)
    return ServerInfo(
        id=row.id, url=row.url, host=row.host, pid=row.pid, status=status, stats=stats,
        started_at=row.started_at, updated_at=row.updated_at,
    )  # fmt: skip


def _ended(stats: dict[str, Any]) -> dict[str, Any]:
    """The figures of a server that ended: its counts stay, its replicas are no more."""
    if not stats:
        return stats
    versions = {k: {**v, "replicas": 0} for k, v in stats.get("versions", {}).items()}
    return {**stats, "replicas": 0, "inflight": 0, "versions": versions}


def _info(row: EndpointRow, servers: list[ServerInfo]) -> EndpointInfo:
    live = [s for s in servers if s.status == "serving"]
    counted = live or servers
    shown = counted[0] if counted else None
    if live:
        status = "serving"
    elif servers:  # what the last one to say anything said: stopped, or gone silent
        status = max(servers, key=_last_word).status
    else:
        status = "stopped"
    return EndpointInfo(
        name=row.name, app=row.app, model=row.model, spec=row.spec,
        traffic=row.traffic, url=shown.url if shown else None,
        host=shown.host if shown else None, pid=shown.pid if shown else None,
        status=status, stats=combine([s.stats for s in counted]),
        started_at=shown.started_at if shown else None,
        updated_at=max([row.updated_at, *(s.updated_at for s in servers)]),
        servers=tuple(servers),
    )  # fmt: skip


def _last_word(server: ServerInfo) -> float:
    return server.updated_at


def _alive(row: ServerRow) -> bool:
    """Whether a server that said it serves still does: its reports keep coming (every
    few seconds), and on this machine its process still exists."""
    if time.time() - row.updated_at > STALE_S:
        return False
    if row.host != socket.gethostname() or not row.pid:
        return True  # another machine's process: its reports are all we can see
    try:
        os.kill(int(row.pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- figures of several servers added up ---------------------------------------------------

_SUMMED = ("requests", "errors", "inflight", "replicas")


def combine(figures: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of several servers of one endpoint as one: counts added up, per
    request costs weighted by requests, latency quantiles the worst server's (quantiles
    cannot be added; the worst is an upper bound)."""
    figures = [f for f in figures if f]
    if len(figures) <= 1:
        return dict(figures[0]) if figures else {}
    out = {k: v for f in reversed(figures) for k, v in f.items()}  # the newest's wins
    for key in _SUMMED:
        out[key] = sum(f.get(key, 0) for f in figures)
    quantiles = {q for f in figures for q in f.get("latency_ms", {})}
    out["latency_ms"] = {q: max(f.get("latency_ms", {}).get(q, 0.0) for f in figures)
                         for q in sorted(quantiles)}  # fmt: skip
    out["per_request"] = _weighted([(f.get("requests", 0), f.get("per_request", {}))
                                    for f in figures])  # fmt: skip
    if any("cost_per_1k_requests" in f for f in figures):
        out["cost_per_1k_requests"] = _weighted(
            [(f.get("requests", 0), {"c": f.get("cost_per_1k_requests", 0.0)}) for f in figures]
        )["c"]
    versions: dict[str, list[dict[str, Any]]] = {}
    for f in figures:
        for version, v in f.get("versions", {}).items():
            versions.setdefault(str(version), []).append(v)
    out["versions"] = {k: _combine_version(vs) for k, vs in versions.items()}
    return out


def _combine_version(figures: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: v for f in reversed(figures) for k, v in f.items()}
    for key in ("requests", "errors", "replicas"):
        out[key] = sum(f.get(key, 0) for f in figures)
    out["usage"] = _weighted([(f.get("requests", 0), f.get("usage", {})) for f in figures])
    out["cold_starts_s"] = [c for f in figures for c in f.get("cold_starts_s", [])][-5:]
    return out


def _weighted(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    total = sum(n for n, _ in parts)
    keys = {k for _, values in parts for k in values}
    return {k: sum(n * v.get(k, 0.0) for n, v in parts) / max(total, 1) for k in sorted(keys)}
