"""The SQL side of the model registry: its rows, read and written inside one
transaction of the store that owns them.

:class:`kiln.registry.models.Models` holds the rules (gates, approvals, rollback);
it reaches its rows only through :class:`RegistryRows`, which a store hands out
bound to a transaction (``registry_transaction``: the gates, the writes and the
audit events commit together, or none does) or to a plain connection for reading
(``registry_reader``). Rows are plain dicts of the columns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kiln.record import audit
from kiln.record.store._schema import (
    alias_moves,
    aliases,
    model_versions,
    models,
    policies,
    promotion_requests,
)


class RegistryRows:
    """The registry's rows through one connection (see the module docstring)."""

    def __init__(
        self, conn: Connection, append: Callable[[list[audit.Event]], None], project: str
    ) -> None:
        self._conn = conn
        self._append = append
        self._project = project  # every row read or written is this project's

    # -- models and versions ----------------------------------------------------------

    def has_model(self, name: str) -> bool:
        found = self._conn.execute(
            sa.select(models.c.name).where(models.c.name == name, self._mine(models))
        )
        return found.first() is not None

    def add_model(self, name: str, *, app: str, at: float, by: str) -> None:
        self._conn.execute(models.insert().values(name=name, app=app, created_at=at, created_by=by,
                                                  project=self._project))  # fmt: skip

    def model_names(self) -> list[str]:
        stmt = sa.select(models.c.name).where(self._mine(models)).order_by(models.c.name)
        return list(self._conn.execute(stmt).scalars())

    def _mine(self, table: sa.Table) -> sa.ColumnElement[bool]:
        return table.c.project == self._project

    def latest_version(self, name: str) -> int | None:
        value = self._conn.execute(
            sa.select(sa.func.max(model_versions.c.version)).where(
                model_versions.c.name == name, self._mine(model_versions)
            )
        ).scalar()
        return None if value is None else int(value)

    def add_version(self, row: dict[str, Any]) -> None:
        self._conn.execute(model_versions.insert().values(**row, project=self._project))

    def version(self, name: str, version: int) -> dict[str, Any] | None:
        row = self._conn.execute(
            sa.select(model_versions).where(model_versions.c.name == name,
                                            model_versions.c.version == version,
                                            self._mine(model_versions))
        ).mappings().first()  # fmt: skip
        return None if row is None else _row(row)

    def versions(self, name: str) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            sa.select(model_versions)
            .where(model_versions.c.name == name, self._mine(model_versions))
            .order_by(model_versions.c.version)
        ).mappings()  # fmt: skip
        return [_row(r) for r in rows]

    # -- aliases and their moves -------------------------------------------------------

    def holder(self, name: str, alias: str) -> int | None:
        value = self._conn.execute(
            sa.select(aliases.c.version).where(
                aliases.c.name == name, aliases.c.alias == alias, self._mine(aliases)
            )
        ).scalar()
        return None if value is None else int(value)

    def aliases(self, name: str) -> dict[str, int]:
        rows = self._conn.execute(
            sa.select(aliases.c.alias, aliases.c.version).where(
                aliases.c.name == name, self._mine(aliases)
            )
        )
        return dict(sorted((a, int(v)) for a, v in rows))

    def move_alias(self, name: str, alias: str, *, from_version: int | None, to_version: int,
                   reason: str | None, actor: str, at: float) -> None:  # fmt: skip
        """Point ``name@alias`` at ``to_version`` and keep the move in its history."""
        if from_version is None:
            self._conn.execute(
                aliases.insert().values(
                    name=name, alias=alias, version=to_version, updated_at=at, project=self._project
                )
            )
        else:
            self._conn.execute(
                aliases.update()
                .where(aliases.c.name == name, aliases.c.alias == alias, self._mine(aliases))
                .values(version=to_version, updated_at=at)
            )  # fmt: skip
        self._conn.execute(alias_moves.insert().values(
            name=name, alias=alias, from_version=from_version, to_version=to_version,
            reason=reason, actor=actor, at=at, project=self._project,
        ))  # fmt: skip

    def installed_from(self, name: str, alias: str, version: int) -> int | None:
        """The version ``name@alias`` held before it last moved to ``version``."""
        value = self._conn.execute(
            sa.select(alias_moves.c.from_version)
            .where(alias_moves.c.name == name, alias_moves.c.alias == alias,
                   alias_moves.c.to_version == version, self._mine(alias_moves))
            .order_by(alias_moves.c.id.desc()).limit(1)
        ).scalar()  # fmt: skip
        return None if value is None else int(value)

    def moves(self, name: str, alias: str | None = None) -> list[dict[str, Any]]:
        """Every move of the model's aliases (or of one), oldest first."""
        stmt = (
            sa.select(alias_moves)
            .where(alias_moves.c.name == name, self._mine(alias_moves))
            .order_by(alias_moves.c.id)
        )
        if alias is not None:
            stmt = stmt.where(alias_moves.c.alias == alias)
        return [_row(r) for r in self._conn.execute(stmt).mappings()]

    # -- policies and promotion requests ----------------------------------------------

    def policy(self, name: str, alias: str) -> dict[str, Any] | None:
        spec = self._conn.execute(
            sa.select(policies.c.policy).where(
                policies.c.name == name, policies.c.alias == alias, self._mine(policies)
            )
        ).scalar()
        return None if spec is None else dict(spec)

    def replace_policy(self, name: str, alias: str, row: dict[str, Any] | None) -> None:
        """Remove the policy of ``name@alias``, then store ``row`` (if any) as its new one."""
        self._conn.execute(
            policies.delete().where(
                policies.c.name == name, policies.c.alias == alias, self._mine(policies)
            )
        )
        if row is not None:
            self._conn.execute(policies.insert().values(**row, project=self._project))

    def add_request(self, row: dict[str, Any]) -> None:
        self._conn.execute(promotion_requests.insert().values(**row, project=self._project))

    def requests_starting(self, prefix: str, limit: int) -> list[dict[str, Any]]:
        """Promotion requests whose id starts with ``prefix`` (at most ``limit``)."""
        rows = self._conn.execute(
            sa.select(promotion_requests)
            .where(promotion_requests.c.id.startswith(prefix, autoescape=True),
                   self._mine(promotion_requests))
            .limit(limit)
        ).mappings()  # fmt: skip
        return [_row(r) for r in rows]

    def update_request(self, request_id: str, **values: Any) -> None:
        self._conn.execute(
            promotion_requests.update()
            .where(promotion_requests.c.id == request_id, self._mine(promotion_requests))
            .values(**values)
        )  # fmt: skip

    def requests(self, status: str | None) -> list[dict[str, Any]]:
        """Promotion requests, oldest first (``status=None``: all of them)."""
        stmt = (
            sa.select(promotion_requests)
            .where(self._mine(promotion_requests))
            .order_by(promotion_requests.c.requested_at)
        )
        if status is not None:
            stmt = stmt.where(promotion_requests.c.status == status)
        return [_row(r) for r in self._conn.execute(stmt).mappings()]

    def applied(self, name: str, alias: str, version: int) -> bool:
        """Whether a promotion request of ``name:version`` to ``@alias`` was applied."""
        return self._conn.execute(
            sa.select(promotion_requests.c.id).where(
                promotion_requests.c.name == name, promotion_requests.c.alias == alias,
                promotion_requests.c.version == version,
                promotion_requests.c.status == "applied", self._mine(promotion_requests),
            )
        ).first() is not None  # fmt: skip

    # -- the audit log ----------------------------------------------------------------

    def event(self, event: audit.Event) -> None:
        """Append ``event`` to the audit log, in this transaction."""
        self._append([event])


class RegistryAccess:
    """Mixed into :class:`~kiln.record.store.sql.SqlStore`."""

    if TYPE_CHECKING:  # what SqlStore provides
        project: str

        def transaction(self) -> AbstractContextManager[Connection]: ...

        def connect(self) -> Connection: ...

        def append_events(self, conn: Connection, events: list[audit.Event]) -> None: ...

    @contextmanager
    def registry_transaction(self) -> Iterator[RegistryRows]:
        """The registry's rows in one transaction: committed together with the audit
        events appended through it, or not at all if the block raises."""
        with self.transaction() as conn:
            yield RegistryRows(conn, lambda events: self.append_events(conn, events), self.project)

    @contextmanager
    def registry_reader(self) -> Iterator[RegistryRows]:
        """The registry's rows, for reading."""
        with self.connect() as conn:
            yield RegistryRows(conn, _read_only, self.project)


def _read_only(events: list[audit.Event]) -> None:
    raise RuntimeError("registry_reader() is for reading; use registry_transaction() to write")


def _row(row: Any) -> dict[str, Any]:
    """A row's columns, less its project (the reader's, by construction)."""
    return {k: v for k, v in row.items() if k != "project"}
