"""The SQL side of approvals: an agent's request, a human's decision and its one use,
each written with its audit event in the same transaction."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import asdict, replace
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kiln.errors import NotFoundError, ValidationError
from kiln.record import audit
from kiln.record.store._schema import approvals
from kiln.record.store.base import ApprovalRow

STATUSES = ("pending", "approved", "rejected", "used")


class Approvals:
    """Mixed into :class:`~kiln.record.store.sql.SqlStore`: the approvals of the store's
    project."""

    if TYPE_CHECKING:  # what SqlStore provides
        actor: str
        project: str

        def transaction(self) -> AbstractContextManager[Connection]: ...

        def connect(self) -> Connection: ...

        def append_events(self, conn: Connection, events: list[audit.Event]) -> None: ...

    def ask_approval(self, row: ApprovalRow) -> ApprovalRow:
        """The live approval (pending, or approved and not yet used) for the same agent,
        operation and arguments if there is one, else ``row``, stored and audited."""
        with self.transaction() as conn:
            live = conn.execute(
                sa.select(approvals).where(
                    approvals.c.project == self.project,
                    approvals.c.principal == row.principal,
                    approvals.c.operation == row.operation,
                    approvals.c.args_hash == row.args_hash,
                    approvals.c.status.in_(("pending", "approved")),
                    approvals.c.expires_at > row.created_at,
                )
            ).mappings().first()  # fmt: skip
            if live is not None:
                return ApprovalRow(**live)
            conn.execute(approvals.insert().values(**{**asdict(row), "project": self.project}))
            payload = {"operation": row.operation, "args_hash": row.args_hash,
                       "principal": row.principal}  # fmt: skip
            self.append_events(conn, [audit.Event("approval.request", row.id, payload,
                                                  row.created_at, self.actor)])  # fmt: skip
        return row

    def approvals(
        self, status: str | None = None, principal: str | None = None
    ) -> list[ApprovalRow]:
        """This project's approvals, newest first; pending ones past their time read as
        expired (status ``expired``)."""
        stmt = sa.select(approvals).where(approvals.c.project == self.project)
        if status is not None:
            stmt = stmt.where(approvals.c.status == status)
        if principal is not None:
            stmt = stmt.where(approvals.c.principal == principal)
        with self.connect() as conn:
            rows = conn.execute(stmt.order_by(approvals.c.created_at.desc())).mappings().all()
        return [_aged(ApprovalRow(**r), time.time()) for r in rows]

    def approval(self, approval_id: str) -> ApprovalRow:
        with self.connect() as conn:
            row = (
                conn.execute(
                    sa.select(approvals).where(
                        approvals.c.project == self.project, approvals.c.id == approval_id
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFoundError(f"no approval {approval_id!r}; `kiln approvals ls` lists them")
        return _aged(ApprovalRow(**row), time.time())

    def decide_approval(
        self, approval_id: str, *, approve: bool, reason: str | None, use_within_s: float
    ) -> ApprovalRow:
        """Approve (usable once within ``use_within_s``) or reject a pending approval."""
        now = time.time()
        found = self.approval(approval_id)
        if found.status != "pending":
            raise ValidationError("approval", f"{approval_id} is {found.status}; only a pending "
                                  "one can be decided")  # fmt: skip
        status = "approved" if approve else "rejected"
        values = {"status": status, "decided_by": self.actor, "decided_at": now,
                  "reason": reason}  # fmt: skip
        if approve:
            values["expires_at"] = now + use_within_s
        with self.transaction() as conn:
            changed = conn.execute(
                approvals.update()
                .where(approvals.c.id == approval_id, approvals.c.project == self.project,
                       approvals.c.status == "pending", approvals.c.expires_at > now)
                .values(**values)
            ).rowcount  # fmt: skip
            if not changed:
                raise ValidationError("approval", f"{approval_id} was decided or expired meanwhile")
            payload = {"operation": found.operation, "args_hash": found.args_hash,
                       "principal": found.principal, "reason": reason}  # fmt: skip
            action = f"approval.{'approve' if approve else 'reject'}"
            self.append_events(conn, [audit.Event(action, approval_id, payload, now,
                                                  self.actor)])  # fmt: skip
        return self.approval(approval_id)

    def use_approval(self, principal: str, operation: str, args_hash: str) -> ApprovalRow | None:
        """Spend the approval of exactly this action, if one is approved and unexpired:
        it is marked used in the same transaction, so it works once. None: there is none."""
        now = time.time()
        with self.transaction() as conn:
            found = conn.execute(
                sa.select(approvals).where(
                    approvals.c.project == self.project, approvals.c.principal == principal,
                    approvals.c.operation == operation, approvals.c.args_hash == args_hash,
                    approvals.c.status == "approved", approvals.c.expires_at > now,
                )
            ).mappings().first()  # fmt: skip
            if found is None:
                return None
            changed = conn.execute(
                approvals.update()
                .where(approvals.c.id == found["id"], approvals.c.status == "approved")
                .values(status="used", used_at=now)
            ).rowcount
            if not changed:
                return None
            payload = {"operation": operation, "args_hash": args_hash, "principal": principal}
            self.append_events(conn, [audit.Event("approval.use", found["id"], payload, now,
                                                  self.actor)])  # fmt: skip
        return ApprovalRow(**{**found, "status": "used", "used_at": now})


def _aged(row: ApprovalRow, now: float) -> ApprovalRow:
    if row.status in ("pending", "approved") and row.expires_at <= now:
        return replace(row, status="expired")
    return row
