"""The SQL side of :class:`~kiln.record.store.base.IdentityStore`: principals and their
tokens, each change with its audit event in the same transaction."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kiln.errors import NotFoundError, ValidationError
from kiln.record import audit
from kiln.record.store._schema import principals, tokens
from kiln.record.store.base import PrincipalRow, TokenRow


class Identities:
    """Mixed into :class:`~kiln.record.store.sql.SqlStore`."""

    if TYPE_CHECKING:  # what SqlStore provides
        actor: str

        def transaction(self) -> AbstractContextManager[Connection]: ...

        def connect(self) -> Connection: ...

        def append_events(self, conn: Connection, events: list[audit.Event]) -> None: ...

    def note(self, event: audit.Event) -> None:
        """Append one event on its own (a refused request, which writes nothing else)."""
        with self.transaction() as conn:
            self.append_events(conn, [event])

    def principal(self, name: str) -> PrincipalRow | None:
        with self.connect() as conn:
            row = conn.execute(sa.select(principals).where(principals.c.name == name))
            found = row.mappings().first()
        return None if found is None else PrincipalRow(**found)

    def principals(self) -> list[PrincipalRow]:
        with self.connect() as conn:
            rows = conn.execute(sa.select(principals).order_by(principals.c.name)).mappings()
            return [PrincipalRow(**r) for r in rows]

    def add_principal(self, row: PrincipalRow) -> None:
        with self.transaction() as conn:
            self._add_principal(conn, row)

    def _add_principal(self, conn: Connection, row: PrincipalRow) -> None:
        taken = conn.execute(sa.select(principals.c.name).where(principals.c.name == row.name))
        if taken.first() is not None:
            raise ValidationError("name", f"a principal {row.name!r} exists already")
        conn.execute(principals.insert().values(**asdict(row)))
        payload = {k: v for k, v in asdict(row).items() if k not in ("name", "created_at")}
        self.append_events(conn, [audit.Event("principal.add", row.name, payload, time.time(),
                                              self.actor)])  # fmt: skip

    def disable_principal(self, name: str) -> None:
        with self.transaction() as conn:
            changed = conn.execute(
                principals.update().where(principals.c.name == name).values(disabled=True)
            ).rowcount
            if not changed:
                raise NotFoundError(f"no principal {name!r}; `kiln users ls` lists them")
            self.append_events(conn, [audit.Event("principal.disable", name, {}, time.time(),
                                                  self.actor)])  # fmt: skip

    def add_token(self, row: TokenRow) -> None:
        with self.transaction() as conn:
            self._add_token(conn, row)

    def _add_token(self, conn: Connection, row: TokenRow) -> None:
        conn.execute(tokens.insert().values(**asdict(row)))
        payload: dict[str, Any] = {"principal": row.principal, "role": row.role,
                                   "kind": row.kind, "name": row.name,
                                   "expires_at": row.expires_at}  # fmt: skip
        self.append_events(conn, [audit.Event("token.create", row.id, payload, time.time(),
                                              self.actor)])  # fmt: skip

    def token(self, token_id: str) -> TokenRow | None:
        with self.connect() as conn:
            found = conn.execute(sa.select(tokens).where(tokens.c.id == token_id)).mappings()
            row = found.first()
        return None if row is None else TokenRow(**row)

    def tokens(self, principal: str | None = None) -> list[TokenRow]:
        stmt = sa.select(tokens).order_by(tokens.c.created_at)
        if principal is not None:
            stmt = stmt.where(tokens.c.principal == principal)
        with self.connect() as conn:
            return [TokenRow(**r) for r in conn.execute(stmt).mappings()]

    def revoke_token(self, token_id: str) -> None:
        with self.transaction() as conn:
            changed = conn.execute(
                tokens.update()
                .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            ).rowcount
            if not changed:
                raise NotFoundError(f"no live token {token_id!r}; `kiln tokens ls` lists them")
            self.append_events(conn, [audit.Event("token.revoke", token_id, {}, time.time(),
                                                  self.actor)])  # fmt: skip

    def token_used(self, token_id: str, when: float) -> None:
        with self.transaction() as conn:
            conn.execute(tokens.update().where(tokens.c.id == token_id)
                         .values(last_used_at=when))  # fmt: skip

    def consume_enrolment(self, token_id: str, admin: PrincipalRow, token: TokenRow) -> bool:
        with self.transaction() as conn:
            used = conn.execute(
                tokens.update()
                .where(tokens.c.id == token_id, tokens.c.kind == "enrol",
                       tokens.c.revoked_at.is_(None))
                .values(revoked_at=time.time(), last_used_at=time.time())
            ).rowcount  # fmt: skip
            if not used:
                return False
            self._add_principal(conn, admin)
            self._add_token(conn, token)
            return True
