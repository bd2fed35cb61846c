"""The SQL side of :class:`~kiln.record.store.base.EndpointStore` and
:class:`~kiln.record.store.base.SpanStore`: endpoints, their servers, and spans."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kiln.errors import AmbiguousIdError, NotFoundError
from kiln.record import audit
from kiln.record.store._schema import endpoint_logs, endpoint_servers, endpoints, spans
from kiln.record.store.base import (
    EndpointLog,
    EndpointLogRow,
    EndpointRow,
    ServerRow,
    trace_prefix,
)


class EndpointsAndSpans:
    """Mixed into :class:`~kiln.record.store.sql.SqlStore`."""

    if TYPE_CHECKING:  # what SqlStore provides
        actor: str
        project: str

        def transaction(self) -> AbstractContextManager[Connection]: ...

        def connect(self) -> Connection: ...

        def append_events(self, conn: Connection, events: list[audit.Event]) -> None: ...

    # -- endpoints ---------------------------------------------------------------------

    def announce_server(
        self, endpoint: EndpointRow, server: ServerRow, *, forget: Sequence[str] = ()
    ) -> None:
        declared = {"app": endpoint.app, "model": endpoint.model, "spec": endpoint.spec,
                    "updated_at": endpoint.updated_at}  # fmt: skip
        with self.transaction() as conn:
            mine = (endpoints.c.name == endpoint.name, endpoints.c.project == self.project)
            exists = conn.execute(sa.select(endpoints.c.name).where(*mine)).first()
            if exists is None:
                new = {"name": endpoint.name, "traffic": None, "project": self.project}
                conn.execute(endpoints.insert().values(**new, **declared))
            else:
                conn.execute(endpoints.update().where(*mine).values(**declared))
            if forget:
                conn.execute(endpoint_servers.delete().where(
                    endpoint_servers.c.endpoint == endpoint.name,
                    endpoint_servers.c.project == self.project,
                    endpoint_servers.c.id.in_(list(forget))))  # fmt: skip
            conn.execute(endpoint_servers.insert().values(
                id=server.id, endpoint=endpoint.name, url=server.url, host=server.host,
                pid=server.pid, status=server.status, stats=server.stats,
                started_at=server.started_at, updated_at=server.updated_at,
                project=self.project,
            ))  # fmt: skip
            payload = {"model": endpoint.model, "url": server.url, "server": server.id,
                       "pid": server.pid}  # fmt: skip
            self.append_events(conn, [audit.Event("endpoint.serve", endpoint.name, payload,
                                                  server.started_at, self.actor)])  # fmt: skip

    def report_server(
        self, server_id: str, *, status: str, stats: dict[str, Any] | None, url: str | None
    ) -> None:
        values: dict[str, Any] = {"status": status, "updated_at": time.time()}
        if stats is not None:
            values["stats"] = stats
        if url:
            values["url"] = url
        with self.transaction() as conn:
            conn.execute(
                endpoint_servers.update()
                .where(endpoint_servers.c.id == server_id,
                       endpoint_servers.c.project == self.project)
                .values(**values)
            )  # fmt: skip

    def endpoint(self, name: str) -> EndpointRow | None:
        with self.connect() as conn:
            row = conn.execute(
                sa.select(endpoints).where(endpoints.c.name == name,
                                           endpoints.c.project == self.project)
            ).mappings()  # fmt: skip
            found = row.first()
        return None if found is None else _endpoint(found)

    def endpoints(self) -> list[EndpointRow]:
        with self.connect() as conn:
            rows = conn.execute(
                sa.select(endpoints).where(endpoints.c.project == self.project)
                .order_by(endpoints.c.name)
            ).mappings()  # fmt: skip
            return [_endpoint(r) for r in rows]

    def servers(self, names: Sequence[str]) -> list[ServerRow]:
        with self.connect() as conn:
            rows = conn.execute(
                sa.select(endpoint_servers)
                .where(endpoint_servers.c.endpoint.in_(list(names)),
                       endpoint_servers.c.project == self.project)
                .order_by(endpoint_servers.c.started_at.desc())
            ).mappings()  # fmt: skip
            return [ServerRow(**{**{k: v for k, v in r.items() if k != "project"},
                                 "stats": r["stats"] or {}}) for r in rows]  # fmt: skip

    def set_live_traffic(
        self, name: str, split: dict[str, float] | None, *, actor: str, payload: dict[str, Any]
    ) -> None:
        with self.transaction() as conn:
            changed = conn.execute(
                endpoints.update()
                .where(endpoints.c.name == name, endpoints.c.project == self.project)
                .values(traffic=split)
            ).rowcount
            if not changed:
                raise NotFoundError(f"no endpoint {name!r}; `kiln endpoints ls` lists them")
            self.append_events(
                conn, [audit.Event("endpoint.traffic", name, payload, time.time(), actor)]
            )

    def write_endpoint_logs(self, rows: list[EndpointLogRow]) -> None:
        if not rows:
            return
        values = [{"project": self.project, "endpoint": e, "version": v, "replica": p,
                   "time": t, "stream": s, "text": x} for e, v, p, t, s, x in rows]  # fmt: skip
        with self.transaction() as conn:
            conn.execute(endpoint_logs.insert(), values)

    def endpoint_logs(
        self, name: str, *, version: int | None = None, after: int = 0, limit: int = 1000
    ) -> list[EndpointLog]:
        c = endpoint_logs.c
        stmt = (
            sa.select(c.id, c.time, c.stream, c.text, c.version, c.replica)
            .where(c.project == self.project, c.endpoint == name, c.id > after)
            .order_by(c.id)
            .limit(limit)
        )
        if version is not None:
            stmt = stmt.where(c.version == version)
        with self.connect() as conn:
            return [EndpointLog(*row) for row in conn.execute(stmt)]

    # -- spans ------------------------------------------------------------------------

    def list_spans(
        self, *, endpoint: str | None = None, run_id: str | None = None,
        errors_only: bool = False, limit: int | None = 50,
    ) -> list[dict[str, Any]]:  # fmt: skip
        stmt = (
            sa.select(spans)
            .where(spans.c.project == self.project)
            .order_by(spans.c.start_ns.desc())
            .limit(limit)
        )
        if endpoint:
            stmt = stmt.where(spans.c.endpoint == endpoint)
        if run_id:
            stmt = stmt.where(spans.c.run_id.startswith(run_id))
        if errors_only:
            stmt = stmt.where(spans.c.status == "error")
        with self.connect() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def find_trace(self, trace_id: str) -> list[dict[str, Any]]:
        ref = trace_prefix(trace_id)
        with self.connect() as conn:
            ids = list(conn.execute(
                sa.select(spans.c.trace_id)
                .where(spans.c.trace_id.startswith(ref), spans.c.project == self.project)
                .distinct().limit(5)
            ).scalars())  # fmt: skip
            if not ids:
                raise NotFoundError(
                    f"no trace {trace_id!r} in the store (spans are written about a second "
                    "after the request); `kiln traces ls` lists recent ones"
                )
            if len(ids) > 1:
                raise AmbiguousIdError(trace_id, ids)
            rows = conn.execute(
                sa.select(spans)
                .where(spans.c.trace_id == ids[0], spans.c.project == self.project)
                .order_by(spans.c.start_ns)
            ).mappings()
            return [dict(r) for r in rows]


def _endpoint(row: Any) -> EndpointRow:
    return EndpointRow(name=row["name"], app=row["app"], model=row["model"], spec=row["spec"],
                       traffic=dict(row["traffic"]) if row["traffic"] else None,
                       updated_at=row["updated_at"])  # fmt: skip
