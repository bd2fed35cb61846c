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
from kiln.record.store._schema import blob_refs, memberships, principals, projects, tokens
from kiln.record.store.base import MemberRow, PrincipalRow, TokenRow


def _credentials() -> sa.Select[Any]:
    p, m = principals.alias("p"), memberships.alias("m")
    return (
        sa.select(tokens, *(c.label(f"p_{c.name}") for c in p.c),
                  *(c.label(f"m_{c.name}") for c in m.c))
        .select_from(
            tokens.outerjoin(p, p.c.name == tokens.c.principal).outerjoin(
                m, sa.and_(m.c.principal == tokens.c.principal, m.c.project == tokens.c.project))
        )
        .where(tokens.c.id == sa.bindparam("token_id"))
    )  # fmt: skip


_CREDENTIALS = _credentials()  # built once: every authenticated request runs it


class Identities:
    """Mixed into :class:`~kiln.record.store.sql.SqlStore`."""

    if TYPE_CHECKING:  # what SqlStore provides
        actor: str
        project: str
        dialect: str

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
        self._set_member(conn, MemberRow(self.project, row.name, row.role, time.time(),
                                         self.actor))  # fmt: skip

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
                                   "expires_at": row.expires_at,
                                   "token_project": row.project}  # fmt: skip
        self.append_events(conn, [audit.Event("token.create", row.id, payload, time.time(),
                                              self.actor)])  # fmt: skip

    def credentials(
        self, token_id: str
    ) -> tuple[TokenRow, PrincipalRow | None, MemberRow | None] | None:
        """A token, its principal and the principal's membership of the token's project,
        in one query (every authenticated request asks); None for no such token."""
        with self.connect() as conn:
            row = conn.execute(_CREDENTIALS, {"token_id": token_id}).mappings().first()
        if row is None:
            return None
        token = TokenRow(**{c.name: row[c.name] for c in tokens.c})
        principal = PrincipalRow(**{c.name: row[f"p_{c.name}"] for c in principals.c})
        member = MemberRow(**{c.name: row[f"m_{c.name}"] for c in memberships.c})
        return (token, principal if row["p_name"] is not None else None,
                member if row["m_principal"] is not None else None)  # fmt: skip

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

    # -- projects ------------------------------------------------------------------

    def projects(self, principal: str | None = None) -> list[str]:
        stmt = sa.select(projects.c.name).order_by(projects.c.name)
        if principal is not None:
            stmt = stmt.where(
                projects.c.name.in_(
                    sa.select(memberships.c.project).where(memberships.c.principal == principal)
                )
            )
        with self.connect() as conn:
            return list(conn.execute(stmt).scalars())

    def add_project(self, name: str, admin: str) -> None:
        with self.transaction() as conn:
            taken = conn.execute(sa.select(projects.c.name).where(projects.c.name == name))
            if taken.first() is not None:
                raise ValidationError("name", f"a project {name!r} exists already")
            now = time.time()
            conn.execute(projects.insert().values(name=name, created_at=now, created_by=self.actor))
            self.append_events(conn, [audit.Event("project.add", name, {}, now, self.actor)])
            self._set_member(conn, MemberRow(name, admin, "admin", now, self.actor))

    def member(self, project: str, principal: str) -> MemberRow | None:
        with self.connect() as conn:
            row = conn.execute(
                sa.select(memberships).where(
                    memberships.c.project == project, memberships.c.principal == principal
                )
            ).mappings().first()  # fmt: skip
        return None if row is None else MemberRow(**row)

    def members(self, project: str) -> list[MemberRow]:
        stmt = (
            sa.select(memberships)
            .where(memberships.c.project == project)
            .order_by(memberships.c.principal)
        )
        with self.connect() as conn:
            return [MemberRow(**r) for r in conn.execute(stmt).mappings()]

    def set_member(self, row: MemberRow) -> None:
        with self.transaction() as conn:
            found = conn.execute(sa.select(projects.c.name).where(projects.c.name == row.project))
            if found.first() is None:
                raise NotFoundError(f"no project {row.project!r}; `kiln projects ls` lists them")
            self._set_member(conn, row)

    def _set_member(self, conn: Connection, row: MemberRow) -> None:
        where = (memberships.c.project == row.project, memberships.c.principal == row.principal)
        conn.execute(memberships.delete().where(*where))
        conn.execute(memberships.insert().values(**asdict(row)))
        self.append_events(conn, [audit.Event("member.set", row.principal,
                                              {"member_of": row.project, "role": row.role},
                                              row.added_at, self.actor)])  # fmt: skip

    def remove_member(self, project: str, principal: str) -> None:
        with self.transaction() as conn:
            gone = conn.execute(
                memberships.delete().where(
                    memberships.c.project == project, memberships.c.principal == principal
                )
            ).rowcount
            if not gone:
                raise NotFoundError(f"{principal!r} is not a member of project {project!r}")
            self.append_events(conn, [audit.Event("member.remove", principal,
                                                  {"member_of": project}, time.time(),
                                                  self.actor)])  # fmt: skip

    # -- the blobs a project may read ----------------------------------------------

    def note_blob(self, sha256: str) -> None:
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
        stmt = insert(blob_refs).values(project=self.project, sha256=sha256)
        with self.transaction() as conn:
            conn.execute(stmt.on_conflict_do_nothing(index_elements=["project", "sha256"]))

    def holds_blob(self, sha256: str) -> bool:
        with self.connect() as conn:
            found = conn.execute(
                sa.select(blob_refs.c.sha256).where(
                    blob_refs.c.project == self.project, blob_refs.c.sha256 == sha256
                )
            )
            return found.first() is not None
