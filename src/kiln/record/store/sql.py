"""The SQL store: SQLAlchemy Core over SQLite (embedded, WAL) or PostgreSQL (teams).

The hot paths bypass ORM objects: metric points go to the driver's ``executemany``
as tuples, and a whole flush is one transaction.
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, Engine, make_url

from kiln.config import DEFAULT_PROJECT
from kiln.errors import (
    AmbiguousIdError,
    ConfigError,
    DependencyError,
    RunNotFoundError,
    StoreCorruptError,
    StoreRefusedError,
    StoreUnavailableError,
    ValidationError,
)
from kiln.record import audit
from kiln.record.blobs import FileBlobStore
from kiln.record.lineage import Lineage
from kiln.record.model import (
    Artifact,
    LogChunk,
    MetricPoint,
    RunRecord,
    RunStatus,
    record_from_row,
)
from kiln.record.store._approvals import Approvals
from kiln.record.store._endpoints import EndpointsAndSpans
from kiln.record.store._identities import Identities
from kiln.record.store._quotas import Quotas
from kiln.record.store._registry import RegistryAccess
from kiln.record.store._schema import (
    artifacts,
    blob_refs,
    ingest_keys,
    metrics,
    model_versions,
    run_logs,
    runs,
    spans,
    summary,
)
from kiln.record.store._schema import audit as audit_log
from kiln.record.store._verify import registry_problems
from kiln.record.store._views import Views
from kiln.record.store.base import METRIC_OPS, RunQuery, WriteBatch, check_key
from kiln.record.store.rows import RunUpdate, SpanRow

SCHEMA_HEAD = "0017"
_MIGRATIONS = Path(__file__).with_name("migrations")
_RUN_FIELDS = {
    "created": runs.c.created_at,
    "started": runs.c.started_at,
    "ended": runs.c.ended_at,
    "name": runs.c.name,
    "status": runs.c.status,
    "app": runs.c.app,
}
_HEX = frozenset("0123456789abcdef")
_LOCK_RETRIES = 12
PG_TIMEOUT_S = 30  # default connect and statement timeouts on PostgreSQL
T = TypeVar("T")
_log = logging.getLogger("kiln")


class SqlStore(EndpointsAndSpans, RegistryAccess, Identities, Quotas, Approvals, Views):
    """A :class:`~kiln.record.store.base.Store` on SQLite or PostgreSQL.

    Opening it creates or migrates the schema (Alembic), unless ``create`` is false,
    in which case a missing SQLite file is an error rather than a new empty store.
    """

    def __init__(
        self,
        url: str,
        blobs: FileBlobStore | None = None,
        *,
        create: bool = True,
        actor: str = "unknown",
        home_origin: str | None = None,
        project: str = DEFAULT_PROJECT,
    ) -> None:
        parsed = make_url(url)
        self.project = project  # every run read or written is this project's
        self.token_id: str | None = None  # the request's token, named by its events
        self.sponsor: str | None = None  # an agent's human, named by its events
        self._home_origin = home_origin  # how KILN_HOME was found: said when there is no store
        self.actor = actor  # recorded on audit events that carry no actor of their own
        # Writers in this process take turns (the engine's and the recorder's threads);
        # writers in other processes are handled by the retry in _retry_locked.
        self._write_lock = threading.Lock()
        # The chain's end as this process last wrote it. Appending after it is optimistic:
        # if another process appended since, the primary key refuses our next number and
        # the retry reads the end again. So the chain cannot fork either way.
        self._chain_end: tuple[int, str] | None = None
        self.url = parsed.render_as_string(hide_password=True)
        self.blobs = blobs
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            self._engine = self._sqlite_engine(parsed, create=create)
        else:
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            from kiln._optional import require

            require("psycopg", extra="postgres")
            self._engine = sa.create_engine(_with_timeouts(parsed), pool_pre_ping=True, pool_size=2)
        self._metric_sql = self._metric_insert_sql()
        self._span_sql = self._span_insert_sql()
        self._guard(self._ensure_schema)

    # -- lifecycle -----------------------------------------------------------------

    @property
    def blob_store(self) -> FileBlobStore:
        """Its blob store; ConfigError for a store opened without one (a span writer's)."""
        if self.blobs is None:
            raise ConfigError("KILN_HOME", f"the store {self.url} was opened without its blobs")
        return self.blobs

    def as_actor(
        self, actor: str, project: str | None = None, *, token_id: str | None = None,
        sponsor: str | None = None,
    ) -> SqlStore:  # fmt: skip
        """This store (its connections shared) recording ``actor`` on the audit events
        that carry no actor of their own, and seeing only ``project``'s runs (this
        store's, if None): a server's view for one request. Its events also name the
        token the request came with and, for an agent, its sponsor."""
        view = copy.copy(self)
        view.actor = actor
        view.project = project or self.project
        view.token_id, view.sponsor = token_id, sponsor
        view._chain_end = None  # not shared: the view reads the chain's end when it writes
        return view

    def in_project(self, project: str) -> SqlStore:
        """This store seeing only ``project``'s runs (see :meth:`as_actor`)."""
        return self.as_actor(self.actor, project)

    @property
    def _mine(self) -> sa.ColumnElement[bool]:
        """Runs of this store's project: every read and write of runs is filtered by it,
        in SQL, so another project's runs are never fetched (and are, to this project,
        runs that do not exist)."""
        return runs.c.project == self.project

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> SqlStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- writes --------------------------------------------------------------------

    def write(self, batch: WriteBatch) -> None:
        """Write ``batch`` in one transaction. Raises :class:`StoreRefusedError` if the
        database refuses what it holds (writing it again would fail again)."""
        if not batch:
            return
        batch.cut_texts()
        try:
            self._guard(lambda: self._retry_locked(lambda: self._write(batch)))
        except (exc.DataError, exc.IntegrityError) as e:
            if "audit" in str(e.orig):  # a race for the chain's next number, lost too often
                raise
            raise StoreRefusedError(self.url, _first_line(e)) from e
        except exc.StatementError as e:
            if isinstance(e, exc.DBAPIError):  # the database, or the connection to it
                raise
            raise StoreRefusedError(self.url, _first_line(e)) from e  # a value it cannot bind
        except (OverflowError, ValueError, TypeError) as e:  # the driver's, binding a value
            raise StoreRefusedError(self.url, _first_line(e)) from e

    def _write(self, batch: WriteBatch) -> None:
        with self._write_lock:
            self._pending_end: tuple[int, str] | None = None
            try:
                self._write_transaction(batch)
            except BaseException:
                self._chain_end = None  # read the end again next time
                raise
            if self._pending_end is not None:
                self._chain_end = self._pending_end

    def _write_transaction(self, batch: WriteBatch) -> None:
        with self._engine.begin() as conn:
            if batch.key is not None and not self._first_time(conn, batch.key, batch.digest):
                return  # a retried copy of a batch applied already
            batch = self._without_removed_runs(conn, batch)
            if batch.new_runs:
                project = {"project": self.project}
                conn.execute(runs.insert(), [row.columns() | project for row in batch.new_runs])
            named = batch.blobs()
            if named:  # the project may read what its records name (see note_blob)
                self._note_blobs(conn, sorted(named))
            if batch.metrics:
                conn.exec_driver_sql(self._metric_sql, batch.metrics)
            if batch.logs:
                conn.execute(run_logs.insert(), [
                    {"run_id": r, "time": t, "stream": s, "text": x} for r, t, s, x in batch.logs
                ])  # fmt: skip
            if batch.summaries:
                self._upsert(
                    conn,
                    summary,
                    [
                        {"run_id": r, "app": a, "key": k, "value": None if math.isnan(v) else v}
                        for r, a, k, v in batch.summaries
                    ],
                    keys=("run_id", "key"),
                    update=("value",),
                )
            if batch.artifacts:
                self._upsert(
                    conn,
                    artifacts,
                    [art.model_dump() for art in batch.artifacts],
                    keys=("run_id", "direction", "name"),
                    update=("kind", "sha256", "size", "uri"),
                )
            # Updates of the same columns go out as one executemany. A run updated twice
            # in one batch flushes what is pending first, so its updates keep their order.
            pending: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            seen: set[str] = set()
            for update in batch.updates:
                if update.id in seen:
                    self._update(conn, pending)
                    pending, seen = {}, set()
                seen.add(update.id)
                fields = update.columns()
                cols = tuple(sorted(k for k in fields if k != "id"))
                pending.setdefault(cols, []).append(
                    {"_id": update.id, **{k: fields[k] for k in cols}}
                )
            self._update(conn, pending)
            events = self._events(conn, batch)
            if events:
                self._append(conn, events)

    def _events(self, conn: Connection, batch: WriteBatch) -> list[audit.Event]:
        """The audit events of ``batch``: run created and ended, artifacts saved, imports,
        seals and warnings."""
        actor = batch.actor or self.actor
        events = audit.events_for_writes(
            batch.new_runs, batch.updates, batch.artifacts, actor=actor, now=time.time(),
            imported=batch.origin is not None,
        )  # fmt: skip
        if batch.origin is not None:
            events += [audit.Event("run.import", row.id, batch.origin, time.time(),
                                   actor) for row in batch.new_runs]  # fmt: skip
        if batch.seal:
            events += self._seals(conn, batch.seal)
        now = time.time()
        for run_id, message in batch.warnings:
            events.append(audit.Event("run.warning", run_id, {"message": message}, now, actor))
        return events

    def _note_blobs(self, conn: Connection, shas: list[str]) -> None:
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
        rows = [{"project": self.project, "sha256": sha} for sha in shas]
        conn.execute(insert(blob_refs).on_conflict_do_nothing(), rows)

    def _first_time(self, conn: Connection, key: str, digest: str | None) -> bool:
        """Note the idempotency key ``key`` (of a batch whose sha256 is ``digest``) in
        this transaction; False if it was noted before for the same batch (this one is
        a retried copy). A key noted for another batch is refused. Keys are per project:
        another project's key is one never seen."""
        noted_as = key  # the column holds 64 characters: another project's, hashed
        if self.project != DEFAULT_PROJECT:
            noted_as = hashlib.sha256(f"{self.project}\n{key}".encode()).hexdigest()
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
        stmt = (
            insert(ingest_keys)
            .values(key=noted_as, applied_at=time.time(), digest=digest)
            .on_conflict_do_nothing(index_elements=["key"])
            .returning(ingest_keys.c.key)  # rowcount says nothing here on psycopg
        )
        if conn.execute(stmt).first() is not None:
            return True
        noted = conn.execute(
            sa.select(ingest_keys.c.digest).where(ingest_keys.c.key == noted_as)
        ).scalar()
        if digest is not None and noted is not None and noted != digest:
            raise StoreRefusedError(
                self.url, f"idempotency key {key!r} was used for another batch; send each "
                "batch with a key of its own",
            )  # fmt: skip
        return False

    def _without_removed_runs(self, conn: Connection, batch: WriteBatch) -> WriteBatch:
        """``batch`` less the rows of runs that no longer exist: a run removed (``kiln
        runs rm --force``) while a process still records it leaves nothing behind."""
        named = {r[0] for r in batch.metrics} | {r[0] for r in batch.summaries}
        named |= {a.run_id for a in batch.artifacts} | {u.id for u in batch.updates}
        named |= {r[0] for r in batch.logs}
        named |= {*batch.seal, *(w[0] for w in batch.warnings)}
        named -= {r.id for r in batch.new_runs}
        if not named:
            return batch
        ids = sorted(named)
        found: set[str] = set()
        for chunk in (ids[i : i + 5000] for i in range(0, len(ids), 5000)):
            found.update(
                conn.execute(sa.select(runs.c.id).where(runs.c.id.in_(chunk), self._mine)).scalars()
            )
        gone = named - found
        if not gone:
            return batch
        _log.warning("kiln: runs %s were removed; what this process recorded for them "
                     "since is dropped", ", ".join(sorted(gone)))  # fmt: skip
        return WriteBatch(
            new_runs=batch.new_runs,
            metrics=[r for r in batch.metrics if r[0] not in gone],
            summaries=[r for r in batch.summaries if r[0] not in gone],
            artifacts=[a for a in batch.artifacts if a.run_id not in gone],
            updates=[u for u in batch.updates if u.id not in gone],
            seal=[r for r in batch.seal if r not in gone],
            warnings=[w for w in batch.warnings if w[0] not in gone],
            logs=[r for r in batch.logs if r[0] not in gone],
            origin=batch.origin, key=batch.key, actor=batch.actor,
        )  # fmt: skip

    def _append(self, conn: Connection, events: list[audit.Event]) -> None:
        if self.dialect == "postgresql":  # one appender at a time; SQLite's write lock does this
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7152)"))
        end = self._chain_end
        if end is None:
            last = conn.execute(
                sa.select(audit_log.c.seq, audit_log.c.hash)
                .order_by(audit_log.c.seq.desc())
                .limit(1)
            ).first()
            end = (last[0], last[1]) if last else (0, audit.GENESIS)
        self._chain_end = None  # until this transaction commits
        extra: dict[str, str] = {}
        if self.project != DEFAULT_PROJECT:  # hashed with the event: it cannot be moved
            extra["project"] = self.project
        if self.token_id is not None:
            extra["via_token"] = self.token_id
        if self.sponsor is not None:
            extra["sponsor"] = self.sponsor
        if extra:
            events = [dataclasses.replace(e, payload={**e.payload, **extra}) for e in events]
        rows = audit.chain(events, *end)
        for row in rows:
            row["project"] = self.project
        conn.execute(audit_log.insert(), rows)
        self._pending_end = (rows[-1]["seq"], rows[-1]["hash"])

    def _seals(self, conn: Connection, run_ids: list[str]) -> list[audit.Event]:
        now = time.time()
        payloads = self._seal_payloads(conn, run_ids)
        return [audit.Event("run.seal", r, payloads[r], now, self.actor) for r in run_ids]

    def _seal_payloads(self, conn: Connection, run_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Seal digests for many runs, three queries in all (not three per run)."""
        points: dict[str, list[tuple[str, int, float, float | None]]] = defaultdict(list)
        values: dict[str, dict[str, float | None]] = defaultdict(dict)
        arts: dict[str, list[tuple[str, str, str, int]]] = defaultdict(list)
        rows: dict[str, dict[str, Any]] = {}
        logged: dict[str, list[tuple[float, str, str]]] = defaultdict(list)
        for chunk in (run_ids[i : i + 500] for i in range(0, len(run_ids), 500)):
            for r, t, stream, text in conn.execute(
                sa.select(run_logs.c.run_id, run_logs.c.time, run_logs.c.stream, run_logs.c.text)
                .where(run_logs.c.run_id.in_(chunk))
                .order_by(run_logs.c.run_id, run_logs.c.id)
            ):  # fmt: skip
                logged[r].append((t, stream, text))
            sealed = [runs.c[name] for name in audit.SEALED_RUN_FIELDS]
            for row in conn.execute(sa.select(*sealed).where(runs.c.id.in_(chunk))).mappings():
                rows[row["id"]] = dict(row)
            for r, k, st, t, v in conn.execute(
                sa.select(metrics.c.run_id, metrics.c.key, metrics.c.step, metrics.c.time,
                          metrics.c.value)
                .where(metrics.c.run_id.in_(chunk))
                .order_by(metrics.c.run_id, metrics.c.key, metrics.c.step, metrics.c.time)
            ):  # fmt: skip
                points[r].append((k, st, t, _nan_none(v)))
            for r, k, v in conn.execute(
                sa.select(summary.c.run_id, summary.c.key, summary.c.value)
                .where(summary.c.run_id.in_(chunk))
            ):  # fmt: skip
                values[r][k] = _nan_none(v)
            for r, name, direction, sha, size in conn.execute(
                sa.select(artifacts.c.run_id, artifacts.c.name, artifacts.c.direction,
                          artifacts.c.sha256, artifacts.c.size)
                .where(artifacts.c.run_id.in_(chunk))
            ):  # fmt: skip
                arts[r].append((name, direction, sha, size))
        return {r: audit.seal_payload(points[r], values[r], arts[r], rows.get(r), logged[r])
                for r in run_ids}  # fmt: skip

    def export_rows(self, run_id: str) -> dict[str, Any]:
        """A run's rows as stored (for bundles): the run, its metric points in
        (key, step, time) order, its summary and its artifacts."""

        def read() -> dict[str, Any]:
            with self._engine.connect() as conn:
                row = (
                    conn.execute(sa.select(runs).where(runs.c.id == run_id, self._mine))
                    .mappings()
                    .first()
                )
                if row is None:
                    raise RunNotFoundError(run_id)
                points = conn.execute(
                    sa.select(metrics.c.key, metrics.c.step, metrics.c.time, metrics.c.value)
                    .where(metrics.c.run_id == run_id)
                    .order_by(metrics.c.key, metrics.c.step, metrics.c.time)
                ).all()
                values = conn.execute(
                    sa.select(summary.c.key, summary.c.value).where(summary.c.run_id == run_id)
                ).all()
                arts = conn.execute(
                    sa.select(artifacts)
                    .where(artifacts.c.run_id == run_id)
                    .order_by(artifacts.c.direction, artifacts.c.name)
                ).mappings()
                logged = conn.execute(
                    sa.select(run_logs.c.time, run_logs.c.stream, run_logs.c.text)
                    .where(run_logs.c.run_id == run_id)
                    .order_by(run_logs.c.id)
                ).all()
                run = dict(row)
                del run["project"]  # a bundle is imported into the importer's project
                for late in ("volatile_metrics", "trace_id", "span_id"):  # 0009, 0014
                    if run.get(late) is None:  # as bundles from before them have it
                        del run[late]
                return {
                    "run": run,
                    "metrics": [tuple(p) for p in points],
                    "summary": {k: _nan_none(v) for k, v in values},
                    "artifacts": [dict(a) for a in arts],
                    "logs": [tuple(r) for r in logged],
                }

        return self._guard(read)

    def dependants(self, run_id: str) -> list[str]:
        """What depends on a run: model versions registered from it, runs that used its
        outputs, its sweep's runs, its reproductions. A run with dependants cannot be
        removed."""
        self._get_run(run_id)  # another project's run is one that does not exist
        return [what for _, what in self._dependants(run_id)]

    def _dependants(self, run_id: str) -> list[tuple[str | None, str]]:
        """(the dependent run's id, or None for a model version; what it is) pairs."""
        with self._engine.connect() as conn:
            produced = sa.select(artifacts.c.sha256).where(
                artifacts.c.run_id == run_id, artifacts.c.direction == "out"
            )
            users = conn.execute(
                sa.select(artifacts.c.run_id, artifacts.c.name)
                .distinct()
                .select_from(artifacts.join(runs, runs.c.id == artifacts.c.run_id))
                .where(
                    artifacts.c.sha256.in_(produced),
                    artifacts.c.direction == "in",
                    artifacts.c.run_id != run_id,
                    self._mine,
                )
            ).all()
            children = conn.execute(
                sa.select(runs.c.id).where(runs.c.parent_id == run_id, self._mine)
            ).all()
            copies = conn.execute(
                sa.select(runs.c.id).where(
                    _json_equals(runs.c.tags, "reproduced_from", run_id, field="tags"), self._mine
                )
            ).all()
            registered = conn.execute(
                sa.select(model_versions.c.name, model_versions.c.version).where(
                    model_versions.c.run_id == run_id, model_versions.c.project == self.project
                )
            ).all()
        out: list[tuple[str | None, str]] = [
            (None, f"model {n}:{v} was made by it") for n, v in registered
        ]
        out += [(u, f"run {u} uses its {name}") for u, name in users]
        out += [(c, f"run {c} belongs to it (a sweep)") for (c,) in children]
        out += [(c, f"run {c} reproduces it") for (c,) in copies]
        return out

    def delete_run(self, run_id: str, *, with_runs: bool = False, force: bool = False) -> list[str]:
        """Remove a run and its metrics, summary and artifact rows (not their blobs: see
        ``kiln gc``), with an audit event. Refused while anything depends on it, and
        while it is still recording unless ``force``, which first ends it as cancelled
        (what its process records afterwards is dropped, see ``_without_removed_runs``).

        With ``with_runs``, a sweep goes together with its runs, in one transaction;
        refused, naming them, while anything outside the sweep depends on any of them.
        Returns the ids removed, the sweep's runs first.
        """

        def delete() -> list[str]:
            record = self._get_run(run_id)
            doomed = [*self._children(record.id), record.id] if with_runs else [record.id]
            blocking = [
                what if rid == record.id else f"its run {rid}: {what}"
                for rid in doomed
                for other, what in self._dependants(rid)
                if other not in doomed
            ]
            live = self._live(doomed)
            if not force:
                blocking += [
                    f"{'it' if rid == record.id else f'its run {rid}'} is still recording "
                    f"({what}): wait for it to end, or pass --force to cancel it first"
                    for rid, what in live.items()
                ]
            if blocking:
                raise DependencyError(f"run {record.id}", blocking)
            with self._engine.begin() as conn:
                events = self._cancel(conn, list(live))
                events += [self._delete_one(conn, rid) for rid in doomed]
                self._append(conn, events)
            return doomed

        return self._guard(lambda: self._retry_locked(delete))

    def _live(self, run_ids: list[str]) -> dict[str, str]:
        """The runs among ``run_ids`` that have not ended, with where they run."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(runs.c.id, runs.c.status, runs.c.host, runs.c.pid)
                .where(runs.c.id.in_(run_ids), runs.c.status.not_in(audit.TERMINAL))
            ).all()  # fmt: skip
        return {rid: f"{status}, pid {pid} on {host}" for rid, status, host, pid in rows}

    def _cancel(self, conn: Connection, run_ids: list[str]) -> list[audit.Event]:
        """End these runs as cancelled (before removing them); their run.end events."""
        if not run_ids:
            return []
        now = time.time()
        end: dict[str, Any] = {"status": RunStatus.CANCELLED, "ended_at": now,
               "error": f"cancelled: removed by {self.actor} (kiln runs rm --force)"}  # fmt: skip
        conn.execute(runs.update().where(runs.c.id.in_(run_ids)).values(**end))
        updates = [RunUpdate(id=rid, **end) for rid in run_ids]
        return audit.events_for_writes([], updates, [], actor=self.actor, now=now)

    def _children(self, run_id: str) -> list[str]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(runs.c.id)
                .where(runs.c.parent_id == run_id, self._mine)
                .order_by(runs.c.created_at)
            ).all()
        return [rid for (rid,) in rows]

    def _delete_one(self, conn: Connection, run_id: str) -> audit.Event:
        record = self._get_run(run_id)
        rows = self.export_rows(run_id)
        for table in (metrics, summary, artifacts, run_logs):
            conn.execute(table.delete().where(table.c.run_id == run_id))
        conn.execute(runs.delete().where(runs.c.id == run_id))
        payload = {
            "app": record.app,
            "status": str(record.status),
            "params": record.params,
            "artifacts": len(rows["artifacts"]),
            "metric_points": len(rows["metrics"]),
        }
        return audit.Event("run.delete", run_id, payload, time.time(), self.actor)

    def referenced_blobs(self) -> set[str]:
        """Every blob sha256 a record names: artifacts, registered models' artifacts (kept
        even when their run's artifact row was written again), code, environment lists
        and locks."""
        with self._engine.connect() as conn:
            found = {r[0] for r in conn.execute(sa.select(artifacts.c.sha256).distinct())}
            versions = sa.select(model_versions.c.artifact_sha256).distinct()
            found |= {r[0] for r in conn.execute(versions)}
            for code, env in conn.execute(sa.select(runs.c.code, runs.c.environment)):
                code, env = code or {}, env or {}
                for blob in (code.get("patch_sha256"), code.get("source_blob"),
                             env.get("packages_sha256"), env.get("lock_sha256")):  # fmt: skip
                    if blob:
                        found.add(blob)
        return found

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction for the layers above the record (the registry), holding
        the store's write lock from its first statement, so what it reads stays true
        until it commits. Audit events go in with :meth:`append_events`."""
        with self._write_lock, self._engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7153)"))
            else:  # a write first: SQLite then holds its write lock for the whole transaction
                conn.execute(sa.text("UPDATE models SET name = name WHERE 1 = 0"))
            yield conn

    def append_events(self, conn: Connection, events: list[audit.Event]) -> None:
        """Append audit events inside a :meth:`transaction`. The chain's end is read in
        the transaction, which holds the write lock, so another process's appends since
        this one last wrote cannot make it fork (nothing retries these transactions)."""
        self._chain_end = None
        self._append(conn, events)

    def connect(self) -> Connection:
        """A connection for reads by the layers above the record (registry, serve);
        use it as a context manager."""
        return self._engine.connect()

    def write_spans(self, rows: list[SpanRow]) -> None:
        """Insert finished spans (rows of the ``spans`` table; see kiln.observe).

        Straight to the driver, one executemany: a serving replica exports thousands
        of spans a second from the thread beside its ``predict``.
        """
        if rows:
            names = [c.name for c in spans.columns]
            params = [
                tuple(json.dumps(r.attributes, default=str) if n == "attributes"
                      else self.project if n == "project" else getattr(r, n) for n in names)
                for r in rows
            ]  # fmt: skip

            def insert() -> None:
                with self._engine.begin() as conn:
                    conn.exec_driver_sql(self._span_sql, params)

            self._guard(lambda: self._retry_locked(insert))

    # -- lineage ---------------------------------------------------------------------

    def lineage(self, ref: str, *, depth: int = 20) -> Lineage:
        """The graph upstream and downstream of a run (id or prefix) or an artifact (sha256
        or prefix of at least 8 characters)."""
        return self._guard(lambda: self._lineage(ref, depth))

    def _lineage(self, ref: str, depth: int) -> Lineage:
        with self._engine.connect() as conn:
            try:
                root = self._get_run(ref).id
                start_runs, start_shas = {root}, set()
            except RunNotFoundError:
                found = (
                    conn.execute(
                        sa.select(artifacts.c.sha256)
                        .distinct()
                        .select_from(artifacts.join(runs, runs.c.id == artifacts.c.run_id))
                        .where(
                            artifacts.c.sha256 >= ref.lower(),
                            artifacts.c.sha256 < ref.lower() + "g",
                            self._mine,
                        )
                        .limit(2)
                    )
                    .scalars()
                    .all()
                )
                if len(ref) < 8 or len(found) != 1:
                    raise RunNotFoundError(ref) from None
                root = found[0]
                start_runs, start_shas = set(), {root}
            graph = Lineage(root)
            for direction in ("up", "down"):
                self._walk(conn, graph, set(start_runs), set(start_shas), direction, depth)
            for row in conn.execute(
                sa.select(runs.c.id, runs.c.app, runs.c.name, runs.c.function, runs.c.status).where(
                    runs.c.id.in_(list(graph.runs))
                )
            ):
                graph.runs[row.id] = {
                    "app": row.app,
                    "name": row.name,
                    "function": row.function,
                    "status": row.status,
                }
        graph.edges = sorted(set(graph.edges))
        return graph

    def _walk(
        self,
        conn: Connection,
        graph: Lineage,
        run_ids: set[str],
        shas: set[str],
        direction: str,
        depth: int,
    ) -> None:
        # Upstream: a run's inputs, then the runs that produced them. Downstream: a
        # run's outputs, then the runs that consumed them. One query per hop.
        mine, theirs = ("in", "out") if direction == "up" else ("out", "in")
        seen_runs: set[str] = set()
        for _ in range(depth):
            run_ids -= seen_runs
            seen_runs |= run_ids
            if run_ids:
                for a in conn.execute(
                    sa.select(artifacts)
                    .select_from(artifacts.join(runs, runs.c.id == artifacts.c.run_id))
                    .where(
                        artifacts.c.run_id.in_(list(run_ids)),
                        artifacts.c.direction == mine,
                        self._mine,
                    )
                ).mappings():
                    _link(graph, a)
                    shas.add(a["sha256"])
            if not shas:
                break
            next_runs = set()
            for a in conn.execute(
                sa.select(artifacts)
                .select_from(artifacts.join(runs, runs.c.id == artifacts.c.run_id))
                .where(
                    artifacts.c.sha256.in_(list(shas)),
                    artifacts.c.direction == theirs,
                    self._mine,
                )
            ).mappings():
                _link(graph, a)
                next_runs.add(a["run_id"])
            for run_id in run_ids | next_runs:
                graph.runs.setdefault(run_id, {})
            shas = set()
            run_ids = next_runs
            if not run_ids:
                break
        for run_id in seen_runs:
            graph.runs.setdefault(run_id, {})

    # -- the audit log ---------------------------------------------------------------

    def audit_events(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
        limit: int | None = 100,
    ) -> list[dict[str, Any]]:
        """This project's audit events, newest first, filtered by actor, action and
        target (prefix)."""
        stmt = (
            sa.select(audit_log)
            .where(audit_log.c.project == self.project)
            .order_by(audit_log.c.seq.desc())
            .limit(limit)
        )
        if actor:
            stmt = stmt.where(audit_log.c.actor == actor)
        if action:
            stmt = stmt.where(audit_log.c.action == action)
        if target:
            stmt = stmt.where(audit_log.c.target.startswith(target))
        with self._engine.connect() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def event_hash(self, seq: int) -> str | None:
        """The hash of audit event ``seq``, or None if there is none."""
        with self._engine.connect() as conn:
            found: str | None = conn.execute(
                sa.select(audit_log.c.hash).where(audit_log.c.seq == seq)
            ).scalar()
        return found

    def events_of_project(self, seqs: list[int]) -> set[int]:
        """Those of the events ``seqs`` that are this store's project's."""
        if not seqs:
            return set()
        with self._engine.connect() as conn:
            return set(conn.execute(
                sa.select(audit_log.c.seq)
                .where(audit_log.c.seq.in_(seqs), audit_log.c.project == self.project)
            ).scalars())  # fmt: skip

    def chain_head(self) -> tuple[int, str]:
        """The newest audit event's number and hash; (0, genesis) for an empty log."""
        with self._engine.connect() as conn:
            last = conn.execute(
                sa.select(audit_log.c.seq, audit_log.c.hash)
                .order_by(audit_log.c.seq.desc())
                .limit(1)
            ).first()
        return (last[0], last[1]) if last else (0, audit.GENESIS)

    def verify(self) -> Iterator[audit.Problem]:
        """Recompute the chain, every seal against the data, and every referenced blob."""
        cols = [
            audit_log.c[name]
            for name in ("seq", "time", "actor", "action", "target", "payload",
                         "payload_sha256", "prev_hash", "hash", "project")
        ]  # fmt: skip
        with self._engine.connect() as conn:
            rows = conn.execution_options(yield_per=10_000).execute(
                sa.select(*cols).order_by(audit_log.c.seq)
            )
            problems = list(audit.verify_chain(iter(rows)))
            yield from problems
            if problems:
                return
            for check in (self._verify_seals, registry_problems, self._verify_blobs):
                try:
                    yield from check(conn)
                except (ValueError, TypeError, KeyError) as e:  # JSON no writer of ours wrote
                    yield audit.Problem(
                        None, f"a row holds malformed data ({_first_line(e)[:100]}): it was "
                        "changed outside Kiln",
                    )  # fmt: skip

    def _verify_seals(self, conn: Connection) -> Iterator[audit.Problem]:
        """Every sealed run's data and record, against its latest seal."""
        seals = conn.execute(
            sa.select(audit_log.c.seq, audit_log.c.target, audit_log.c.payload)
            .where(audit_log.c.action == "run.seal")
            .order_by(audit_log.c.seq)
        ).all()
        latest = {target: (seq, payload) for seq, target, payload in seals}
        deleted = set(conn.execute(
            sa.select(audit_log.c.target).where(audit_log.c.action == "run.delete")
        ).scalars())  # fmt: skip
        check = [r for r in latest if r not in deleted]  # removed runs have their event
        current = self._seal_payloads(conn, check)
        for run_id in check:
            seq, payload = latest[run_id]
            now = current[run_id]
            recorded = json.loads(payload)
            for part in ("metrics", "summary", "artifacts", "run", "logs"):
                if f"{part}_sha256" not in recorded:
                    continue  # sealed before runs' own fields, or their logs, were
                if now[f"{part}_sha256"] != recorded[f"{part}_sha256"]:
                    what = audit.SEALED_PARTS[part]
                    yield audit.Problem(
                        seq, f"run {run_id}: {what} changed after event {seq} sealed them"
                    )

    def _verify_blobs(self, conn: Connection) -> Iterator[audit.Problem]:
        if self.blobs is None:
            return
        from kiln._hashing import sha256_file

        # Saved outputs are stored as blobs; inputs (datasets) are the user's files, hashed only.
        saved = sa.select(artifacts.c.sha256).where(artifacts.c.direction == "out").distinct()
        referenced = {r[0] for r in conn.execute(saved)}
        for code, env in conn.execute(sa.select(runs.c.code, runs.c.environment)):
            code, env = code or {}, env or {}
            for blob in (code.get("patch_sha256"), code.get("source_blob"),
                         env.get("packages_sha256"), env.get("lock_sha256")):  # fmt: skip
                if blob:
                    referenced.add(blob)
        left_out = self._blobs_left_out_of_imports(conn)
        for sha in sorted(referenced):
            path = self.blobs.path(sha)
            if not path.is_file() and sha in left_out:
                continue  # exported with --no-blobs (or lacking there): never stored here
            if not path.is_file():
                yield audit.Problem(None, f"blob {sha} is referenced but missing")
            elif sha256_file(path)[0] != sha:
                yield audit.Problem(None, f"blob {sha} does not hash to its name: it was changed")

    def _blobs_left_out_of_imports(self, conn: Connection) -> set[str]:
        payloads = conn.execute(
            sa.select(audit_log.c.payload).where(audit_log.c.action == "run.import")
        ).scalars()
        left_out: set[str] = set()
        for payload in payloads:
            omitted = json.loads(payload).get("omitted") or []
            left_out.update(s for s in omitted if isinstance(s, str))
        return left_out

    def _update(
        self, conn: Connection, groups: dict[tuple[str, ...], list[dict[str, Any]]]
    ) -> None:
        for cols, rows in groups.items():
            if rows and cols:
                stmt = (
                    runs.update()
                    .where(runs.c.id == sa.bindparam("_id"))
                    .values({c: sa.bindparam(c) for c in cols})
                )
                conn.execute(stmt, rows)

    def _upsert(
        self,
        conn: Connection,
        table: sa.Table,
        rows: list[dict[str, Any]],
        *,
        keys: Sequence[str],
        update: Sequence[str],
    ) -> None:
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
        stmt = insert(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=list(keys), set_={c: stmt.excluded[c] for c in update}
        )
        conn.execute(stmt, rows)

    def _span_insert_sql(self) -> str:
        mark = "?" if self._engine.dialect.paramstyle == "qmark" else "%s"
        names = [c.name for c in spans.columns]
        marks = [
            f"{mark}::jsonb" if n == "attributes" and self.dialect == "postgresql" else mark
            for n in names
        ]
        return f"INSERT INTO spans ({', '.join(names)}) VALUES ({', '.join(marks)})"  # noqa: S608

    def _metric_insert_sql(self) -> str:
        mark = "?" if self._engine.dialect.paramstyle == "qmark" else "%s"
        cols = ", ".join(c.name for c in metrics.columns)
        return f"INSERT INTO metrics ({cols}) VALUES ({', '.join([mark] * len(metrics.columns))})"  # noqa: S608

    # -- reads ---------------------------------------------------------------------

    def get_run(self, run_id: str) -> RunRecord:
        return self._guard(lambda: self._get_run(run_id))

    def _get_run(self, run_id: str) -> RunRecord:
        prefix = run_id.strip().lower()
        if not prefix or not set(prefix) <= _HEX:
            raise RunNotFoundError(run_id)
        with self._engine.connect() as conn:
            if len(prefix) >= 32:
                stmt = sa.select(runs).where(runs.c.id == prefix, self._mine)
                rows = conn.execute(stmt).mappings().all()
            else:  # ids are lowercase hex, so every id starting with prefix sorts below prefix+"g"
                rows = (
                    conn.execute(
                        sa.select(runs)
                        .where(runs.c.id >= prefix, runs.c.id < prefix + "g", self._mine)
                        .limit(5)
                    )
                    .mappings()
                    .all()
                )
            if not rows:
                raise RunNotFoundError(run_id)
            if len(rows) > 1:
                raise AmbiguousIdError(run_id, [r["id"] for r in rows])
            return self._records(conn, rows)[0]

    def query_runs(self, query: RunQuery) -> list[RunRecord]:
        return self._guard(lambda: self._query_runs(query))

    def _query_runs(self, query: RunQuery) -> list[RunRecord]:
        if query.limit is not None and query.limit < 0:
            raise ValidationError("limit", f"must be >= 0, got {query.limit}")
        if query.offset < 0:
            raise ValidationError("offset", f"must be >= 0, got {query.offset}")
        descending = query.order_by.startswith("-")
        key = query.order_by.lstrip("-+")
        where = self._filters(query)
        with self._engine.connect() as conn:
            if key in _RUN_FIELDS:
                col = _RUN_FIELDS[key]
                stmt = sa.select(runs).where(*where)
                stmt = stmt.order_by(col.desc() if descending else col.asc(), runs.c.id)
                stmt = stmt.limit(query.limit).offset(query.offset or None)
                return self._records(conn, conn.execute(stmt).mappings().all())
            metric = key.removeprefix("metrics.")
            if not metric:
                raise ValidationError("order_by", "is empty", allowed=["a run field", "a metric"])
            return self._query_by_metric(conn, query, metric, descending, where)

    def _query_by_metric(
        self,
        conn: Connection,
        query: RunQuery,
        metric: str,
        descending: bool,
        where: list[sa.ColumnElement[bool]],
    ) -> list[RunRecord]:
        # First the runs that hold a number for the metric, straight off the
        # (app, key, value) index; then, if the page is not full, those that do not.
        has_value = sa.and_(summary.c.key == metric, summary.c.value.is_not(None))
        if query.app is not None:
            has_value = sa.and_(has_value, summary.c.app == query.app)
        order = summary.c.value.desc() if descending else summary.c.value.asc()
        stmt = (
            sa.select(runs)
            .select_from(summary.join(runs, runs.c.id == summary.c.run_id))
            .where(has_value, *where)
            .order_by(order, runs.c.created_at, summary.c.run_id)  # ties: the first created
            .limit(query.limit)
            .offset(query.offset or None)
        )
        rows = list(conn.execute(stmt).mappings().all())
        if query.limit is None or len(rows) < query.limit:
            skip = 0  # of the runs without the metric: the offset past those with it
            if query.offset and not rows:
                held = sa.select(sa.func.count()).select_from(stmt.limit(None).offset(None)
                                                              .subquery())  # fmt: skip
                skip = max(0, query.offset - int(conn.execute(held).scalar_one()))
            rest = (
                sa.select(runs)
                .where(
                    *where,
                    ~sa.exists().where(
                        summary.c.run_id == runs.c.id,
                        summary.c.key == metric,
                        summary.c.value.is_not(None),
                    ),
                )
                .order_by(runs.c.created_at.desc(), runs.c.id)
                .offset(skip or None)
            )
            if query.limit is not None:
                rest = rest.limit(query.limit - len(rows))
            rows.extend(conn.execute(rest).mappings().all())
        return self._records(conn, rows)

    def _filters(self, query: RunQuery) -> list[sa.ColumnElement[bool]]:
        where: list[sa.ColumnElement[bool]] = [self._mine]
        if query.app is not None:
            where.append(runs.c.app == query.app)
        if query.status:
            where.append(runs.c.status.in_([str(s) for s in query.status]))
        if query.parent_id is not None:
            where.append(runs.c.parent_id == query.parent_id)
        if query.env_id is not None:
            where.append(_json_equals(runs.c.environment, "env_id", query.env_id, field="env_id"))
        for name, value in query.params.items():
            check_key(name, f"params.{name}")
            where.append(_json_equals(runs.c.params, name, value, field=f"params.{name}"))
        for name, value in query.tags.items():
            check_key(name, f"tags.{name}")
            where.append(_json_equals(runs.c.tags, name, value, field=f"tags.{name}"))
        if not query.reproductions:
            where.append(_json_equals(runs.c.tags, "reproduced_from", None, field="tags"))
        for i, (name, op, value) in enumerate(query.metrics):
            held = summary.alias(f"filter_{i}")  # not the summary a metric order reads
            compared = _compare(held.c.value, op, value, field=f"metrics[{i}]")
            where.append(sa.exists().where(held.c.run_id == runs.c.id, held.c.key == name,
                                           compared))  # fmt: skip
        if query.text:
            like = query.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append(sa.or_(runs.c.id.like(f"{like}%", escape="\\"),
                                runs.c.name.like(f"%{like}%", escape="\\"),
                                runs.c.app.like(f"%{like}%", escape="\\")))  # fmt: skip
        return where

    def metric_history(self, run_id: str, key: str) -> list[MetricPoint]:
        def read() -> list[MetricPoint]:
            stmt = (
                sa.select(metrics.c.step, metrics.c.time, metrics.c.value)
                .where(
                    metrics.c.run_id == run_id,
                    metrics.c.key == key,
                    sa.exists().where(runs.c.id == run_id, self._mine),
                )
                .order_by(metrics.c.step, metrics.c.time)
            )
            with self._engine.connect() as conn:
                return [
                    MetricPoint(step, t, math.nan if value is None else value)
                    for step, t, value in conn.execute(stmt)
                ]

        return self._guard(read)

    def run_logs(self, run_id: str, *, after: int = 0, limit: int = 1000) -> list[LogChunk]:
        stmt = (
            sa.select(run_logs.c.id, run_logs.c.time, run_logs.c.stream, run_logs.c.text)
            .where(run_logs.c.run_id == run_id, run_logs.c.id > after,
                   sa.exists().where(runs.c.id == run_id, self._mine))
            .order_by(run_logs.c.id)
            .limit(limit)
        )  # fmt: skip

        def read() -> list[LogChunk]:
            with self._engine.connect() as conn:
                return [LogChunk(*row) for row in conn.execute(stmt)]

        return self._guard(read)

    def _records(self, conn: Connection, rows: Sequence[sa.RowMapping]) -> list[RunRecord]:
        if not rows:
            return []
        ids = [r["id"] for r in rows]
        summaries: dict[str, dict[str, float]] = defaultdict(dict)
        for run_id, key, value in conn.execute(
            sa.select(summary.c.run_id, summary.c.key, summary.c.value).where(
                summary.c.run_id.in_(ids)
            )
        ):
            summaries[run_id][key] = math.nan if value is None else value
        arts: dict[str, list[Artifact]] = defaultdict(list)
        for a in conn.execute(sa.select(artifacts).where(artifacts.c.run_id.in_(ids))).mappings():
            arts[a["run_id"]].append(
                Artifact(a["name"], a["direction"], a["kind"], a["sha256"], a["size"], a["uri"])
            )
        return [
            record_from_row(r, summaries[r["id"]], tuple(arts[r["id"]]), self, self.blobs)
            for r in rows
        ]

    # -- opening, schema and errors ------------------------------------------------

    def _sqlite_engine(self, parsed: sa.URL, *, create: bool) -> Engine:
        database = parsed.database or ""
        if database in ("", ":memory:"):
            raise StoreUnavailableError(self.url, "an in-memory SQLite store cannot be shared")
        path = Path(database)
        if not path.exists():
            if not create:
                looked = f" ({self._home_origin})" if self._home_origin else ""
                raise StoreUnavailableError(
                    self.url,
                    f"no store here yet: there is no {path}{looked}; record a run first, "
                    "or set KILN_HOME/KILN_STORE",
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            # Owner-only from the first byte; SQLite gives its -wal and -shm files the
            # database's mode.
            with suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._lock_path = path.with_name(path.name + ".lock")
        engine = sa.create_engine(parsed, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")
            _wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine

    def _ensure_schema(self) -> None:
        if self._schema_version() == SCHEMA_HEAD:
            return
        with self._migration_lock() as conn:
            version = _read_version(conn)
            if version == SCHEMA_HEAD:
                return
            if version is None and sa.inspect(conn).has_table("runs"):
                raise StoreCorruptError(
                    self.url, "holds a 'runs' table but no schema version; it is not a Kiln store"
                )
            if version is not None and version > SCHEMA_HEAD:
                raise StoreCorruptError(
                    self.url,
                    f"schema {version} is newer than this Kiln knows ({SCHEMA_HEAD}); upgrade kiln",
                )
            from alembic import command
            from alembic.config import Config

            cfg = Config()
            cfg.set_main_option("script_location", str(_MIGRATIONS))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def _schema_version(self) -> str | None:
        with self._engine.connect() as conn:
            return _read_version(conn)

    @contextmanager
    def _migration_lock(self) -> Iterator[Connection]:
        """Serialize schema creation between processes opening a new store at once."""
        if self.dialect == "sqlite":
            engine = _transactional_ddl(self._engine)
            with self._lock_path.open("a") as lock, engine.connect() as conn:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield conn
                    conn.commit()
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
                    engine.dispose()
        else:
            with self._engine.connect() as conn:
                # Waiting for another process's migration, or migrating a large store, may
                # take longer than a statement may.
                conn.execute(sa.text("SET statement_timeout = 0"))
                conn.execute(sa.text("SELECT pg_advisory_lock(7151)"))
                try:
                    yield conn
                    conn.commit()
                finally:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(7151)"))
                    conn.execute(sa.text("RESET statement_timeout"))
                    conn.commit()

    def _retry_locked(self, fn: Callable[[], T]) -> T:
        """Retry a whole write transaction that lost a race, after a short backoff.

        SQLite's busy timeout covers most contention; "locked" errors cover the rest.
        Two writers can also compute the same next audit sequence number: the primary
        key lets only one commit, so the chain never forks, and the other's whole
        transaction (rolled back, nothing written) is retried against the new end.
        """
        for attempt in range(_LOCK_RETRIES):
            try:
                return fn()
            except (exc.OperationalError, exc.IntegrityError) as e:
                text = str(e.orig)
                lost_race = "locked" in text or (
                    isinstance(e, exc.IntegrityError) and "audit" in text
                )
                if not lost_race or attempt == _LOCK_RETRIES - 1:
                    raise
                time.sleep(0.01 * 2**attempt)
        raise AssertionError("unreachable")

    def _guard(self, fn: Callable[[], T]) -> T:
        """Turn driver errors about the store itself into one clear Kiln error."""
        try:
            return fn()
        except exc.DatabaseError as e:
            text = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
            if "file is not a database" in text or "malformed" in text:
                raise StoreCorruptError(
                    self.url, f"{text}; move the file aside or point KILN_STORE elsewhere"
                ) from None
            if isinstance(e, exc.OperationalError) and "locked" not in text:
                raise StoreUnavailableError(
                    self.url, f"cannot be reached ({text}); check KILN_STORE and the server"
                ) from None
            raise

    def count_runs(self, statuses: Sequence[RunStatus]) -> list[tuple[str, str, int]]:
        """(project, status, runs) for runs in ``statuses``, across every project, in one
        query (the server's ``/metrics``; the status index keeps it to those runs)."""
        stmt = (
            sa.select(runs.c.project, runs.c.status, sa.func.count())
            .where(runs.c.status.in_([str(s) for s in statuses]))
            .group_by(runs.c.project, runs.c.status)
        )

        def read() -> list[tuple[str, str, int]]:
            with self._engine.connect() as conn:
                return [(p, s, int(n)) for p, s, n in conn.execute(stmt)]

        return self._guard(read)


def _transactional_ddl(engine: Engine) -> Engine:
    """An engine on the same SQLite file whose transactions include DDL.

    Python's sqlite3 driver begins a transaction only before INSERT, UPDATE and DELETE,
    so each CREATE or ALTER of a migration would commit on its own, and a crash
    between two of them left a store no later open could upgrade. Here the driver
    begins nothing and every transaction starts with ``BEGIN IMMEDIATE``: a whole
    upgrade, table copies included, commits or leaves no trace.
    """
    ddl = sa.create_engine(
        engine.url,
        poolclass=sa.pool.NullPool,
        connect_args={"timeout": 30, "isolation_level": None},
    )

    @event.listens_for(ddl, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return ddl


def _with_timeouts(url: sa.URL) -> sa.URL:
    """``url`` with a connect and a statement timeout (libpq's ``connect_timeout`` and
    ``options=-c statement_timeout=...``) unless it sets its own: a server that accepts
    connections but never answers must fail a command, not hang it."""
    query = dict(url.query)
    query.setdefault("connect_timeout", str(PG_TIMEOUT_S))
    options = query.get("options", "")
    options = " ".join(options) if isinstance(options, tuple) else options
    if "statement_timeout" not in options:
        query["options"] = f"{options} -c statement_timeout={PG_TIMEOUT_S}s".strip()
    return url.set(query=query)


def _first_line(e: Exception) -> str:
    cause = getattr(e, "orig", None) or e.__cause__ or e
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]


def _read_version(conn: Connection) -> str | None:
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    value = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    return None if value is None else str(value)


def _compare(
    column: sa.ColumnElement[Any], op: str, value: float, *, field: str
) -> sa.ColumnElement[bool]:
    """``column op value``; NULL (NaN) matches no comparison."""
    if op not in METRIC_OPS:
        raise ValidationError(field, f"{op!r} is not a comparison", allowed=list(METRIC_OPS))
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        raise ValidationError(field, f"compares with {value!r}", allowed="a number")
    found: sa.ColumnElement[bool] = {
        "<": column < value, "<=": column <= value, ">": column > value,
        ">=": column >= value, "=": column == value, "!=": column != value,
    }[op]  # fmt: skip
    return found


def _json_equals(
    column: sa.Column[Any], name: str, value: object, *, field: str
) -> sa.ColumnElement[bool]:
    element: Any = column[name]
    condition: sa.ColumnElement[bool]
    if isinstance(value, bool):
        condition = element.as_boolean() == value
    elif isinstance(value, int | float):
        condition = element.as_float() == float(value)
    elif isinstance(value, str):
        condition = element.as_string() == value
    elif value is None:
        condition = element.as_string().is_(None)
    else:
        raise ValidationError(
            field,
            f"cannot filter on a {type(value).__name__}",
            allowed=["str", "int", "float", "bool"],
        )
    return condition


def _nan_none(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _link(graph: Lineage, row: sa.RowMapping) -> None:
    """Add an artifacts row to the graph: its artifact, and the edge its direction means."""
    sha, run_id = row["sha256"], row["run_id"]
    graph.artifacts.setdefault(sha, {"name": row["name"], "kind": row["kind"], "size": row["size"]})
    if row["direction"] == "in":
        graph.edges.append((sha, run_id, "consumed"))
    else:
        graph.edges.append((run_id, sha, "produced"))


def _wal(cur: Any) -> None:
    """Put a SQLite database in WAL mode (kept in the file: a no-op once done). Two
    processes opening a new store at once can find it locked while the other switches
    it, without SQLite waiting (it answers busy at once there): try again, for 30 s."""
    import sqlite3

    deadline = time.monotonic() + 30
    pause = 0.01
    while True:
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
