"""Models: versions registered from runs, aliases moved with a history, one-step rollback.

A model name is global to the store. Versions count up from 1 per name. A reference
is ``name:3`` (a version) or ``name@production`` (whatever the alias holds now).
Every move of an alias is kept (who, when, from, to, why); ``rollback`` moves the
alias back to the version it held before its current one. Register, promote and
rollback are audit events.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from kiln.config import os_user
from kiln.errors import AmbiguousIdError, NotFoundError, ValidationError
from kiln.record import audit
from kiln.record.model import RunRecord, RunStatus
from kiln.record.resolve import RunLike, resolve_run
from kiln.record.store._schema import (
    alias_moves,
    aliases,
    model_versions,
    models,
    policies,
    promotion_requests,
)
from kiln.record.store.base import RunQuery
from kiln.record.values import check_name
from kiln.registry.policy import Policy, PolicyError, combine, weakenings
from kiln.registry.refs import check_alias as _check_alias
from kiln.registry.refs import parse_ref

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from kiln.record.store.sql import SqlStore


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One registered version: the run that made it and the artifact that is the model."""

    name: str
    version: int
    run_id: str
    artifact: str
    artifact_sha256: str
    metrics: dict[str, Any]
    signature: Any
    created_at: float
    created_by: str

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True, slots=True)
class AliasMove:
    """An alias moved from one version (None: it was new) to another."""

    name: str
    alias: str
    from_version: int | None
    to_version: int
    reason: str | None
    actor: str
    at: float


@dataclass(frozen=True, slots=True)
class PromotionRequest:
    """A promotion waiting for approvals (``pending``), or how it ended: ``applied``,
    ``rejected``, or ``failed`` (its gates no longer held when it was approved)."""

    id: str
    name: str
    alias: str
    version: int
    reason: str | None
    status: str
    approvals: tuple[str, ...]
    needed: int
    requested_by: str
    requested_at: float
    decided_at: float | None


class Models:
    """The registry of one store. ``app.models`` is one of these."""

    def __init__(self, store: SqlStore, *, app: str, actor: str) -> None:
        self._store = store
        self._app = app
        self._actor = actor

    # -- writing -----------------------------------------------------------------------

    def register(
        self, name: str, run: RunLike, *, artifact: str, signature: Any = None
    ) -> ModelVersion:
        """Register ``artifact`` of a succeeded run as the next version of model ``name``.

        ``run`` is any run: its ``kiln.Run`` handle (``spawn()``, ``sweep.runs``; waited
        for until it ends), its record (read again, as stored now), or its id or a
        unique prefix of it.
        """
        check_name("name", name)
        # A record may have been read while its run was still going: the store's is the truth.
        record = resolve_run(run.id if isinstance(run, RunRecord) else run, self._store, ended=True)
        if record.tags.get("kind") == "sweep":
            raise ValidationError(
                "run", f"{record.id[:8]} is a sweep, not a model's run; register one of its "
                "runs, e.g. sweep.best('accuracy')",
            )  # fmt: skip
        if record.status is not RunStatus.SUCCEEDED:
            raise ValidationError(
                "run", f"run {record.id} {record.status}: only succeeded runs register"
            )
        art = record.artifact(artifact)  # NotFoundError names the artifacts it has
        now = time.time()
        metrics = {k: (v if math.isfinite(v) else repr(v)) for k, v in record.summary.items()}
        with self._store.transaction() as conn:
            if conn.execute(sa.select(models.c.name).where(models.c.name == name)).first() is None:
                conn.execute(models.insert().values(name=name, app=self._app, created_at=now,
                                                    created_by=self._actor))  # fmt: skip
            latest = conn.execute(
                sa.select(sa.func.max(model_versions.c.version)).where(
                    model_versions.c.name == name
                )
            ).scalar()
            row = {
                "name": name, "version": (latest or 0) + 1, "run_id": record.id,
                "artifact": art.name, "artifact_sha256": art.sha256, "metrics": metrics,
                "signature": signature, "created_at": now, "created_by": self._actor,
            }  # fmt: skip
            conn.execute(model_versions.insert().values(**row))
            payload = {"run_id": record.id, "artifact": art.name, "artifact_sha256": art.sha256,
                       "metrics": metrics}  # fmt: skip
            self._event(conn, "model.register", f"{name}:{row['version']}", payload)
        return ModelVersion(**row)

    def promote(
        self,
        name: str,
        version: int,
        *,
        alias: str = "production",
        reason: str | None = None,
        policy: dict[str, Any] | None = None,
    ) -> AliasMove | PromotionRequest:
        """Point ``name@alias`` at ``version``; the move is kept in the history.

        The alias's stored policy (:meth:`set_policy`), with the gates of ``policy`` (for
        this call: it may add gates, never loosen the stored ones), is checked first;
        :class:`kiln.registry.policy.PolicyError` names every failing gate.
        A policy that needs approvals turns the promotion into a pending
        :class:`PromotionRequest` (see :meth:`approve`).
        """
        _check_alias(alias)
        given = Policy.parse(policy) if policy is not None else None
        with self._store.transaction() as conn:
            candidate = self._version(conn, name, version)  # raises if unknown
            target = f"{name}:{version} -> {name}@{alias}"
            effective = combine(self._policy(conn, name, alias), given, target)
            if effective is not None:
                failures = self._gates(conn, effective, candidate, alias)
                if failures:
                    raise PolicyError(f"{name}:{version} -> {name}@{alias}", failures)
            spec = effective.spec if effective else None
            if effective is not None and effective.approvals:
                return self._request(conn, candidate, alias, reason, effective)
            return self._move(conn, name, alias, version, reason, "alias.promote", spec)

    # -- approvals -----------------------------------------------------------------------

    def _request(
        self,
        conn: Connection,
        candidate: ModelVersion,
        alias: str,
        reason: str | None,
        policy: Policy,
    ) -> PromotionRequest:
        row = {
            "id": secrets.token_hex(8), "name": candidate.name, "alias": alias,
            "version": candidate.version, "reason": reason, "policy": policy.spec,
            "status": "pending", "approvals": [], "requested_by": self._actor,
            "requested_at": time.time(), "decided_at": None,
        }  # fmt: skip
        conn.execute(promotion_requests.insert().values(**row))
        payload = {"request": row["id"], "version": candidate.version, "needs": policy.approvals,
                   "policy": policy.spec}  # fmt: skip
        self._event(conn, "promotion.request", f"{candidate.name}@{alias}", payload)
        return _request_of(row, policy.approvals)

    def approve(self, request_id: str) -> PromotionRequest:
        """Approve a pending request as this actor; the last approval needed moves the alias."""
        failures: list[str] = []
        with self._store.transaction() as conn:
            row, policy = self._pending(conn, request_id)
            request_id = row["id"]  # the whole id, where a prefix was given
            if self._actor == row["requested_by"]:
                raise ValidationError("approver", "the requester cannot approve its own request")
            if self._actor not in policy.approvers:
                raise ValidationError("approver", f"{self._actor} may not approve this request",
                                      allowed=policy.approvers)  # fmt: skip
            if self._actor in row["approvals"]:
                raise ValidationError("approver", f"{self._actor} has already approved it")
            row["approvals"] = [*row["approvals"], self._actor]
            target = f"{row['name']}@{row['alias']}"
            # KILN_ACTOR is claimed, not proven (until the team server's tokens): the
            # OS account that gave the approval is recorded beside it.
            self._event(conn, "promotion.approve", target,
                        {"request": request_id, "os_user": os_user()})  # fmt: skip
            if len(row["approvals"]) >= policy.approvals:
                candidate = self._version(conn, row["name"], row["version"])
                failures = self._gates(conn, policy, candidate, row["alias"])
                row["status"] = "failed" if failures else "applied"
                row["decided_at"] = time.time()
                if not failures:
                    approvers = ", ".join(row["approvals"])
                    why = f"{row['reason'] or 'approved'} (request {request_id}: {approvers})"
                    self._move(conn, row["name"], row["alias"], row["version"], why,
                               "alias.promote", policy.spec)  # fmt: skip
            conn.execute(
                promotion_requests.update()
                .where(promotion_requests.c.id == request_id)
                .values(
                    approvals=row["approvals"], status=row["status"], decided_at=row["decided_at"]
                )
            )
        if failures:
            raise PolicyError(f"request {request_id}", failures)
        return _request_of(row, policy.approvals)

    def reject(self, request_id: str, *, reason: str | None = None) -> PromotionRequest:
        """Turn a pending request down (an approver or its requester may)."""
        with self._store.transaction() as conn:
            row, policy = self._pending(conn, request_id)
            request_id = row["id"]  # the whole id, where a prefix was given
            if self._actor not in policy.approvers and self._actor != row["requested_by"]:
                raise ValidationError("approver", f"{self._actor} may not reject this request",
                                      allowed=policy.approvers)  # fmt: skip
            row.update(status="rejected", decided_at=time.time())
            conn.execute(
                promotion_requests.update().where(promotion_requests.c.id == request_id)
                .values(status="rejected", decided_at=row["decided_at"])
            )  # fmt: skip
            self._event(conn, "promotion.reject", f"{row['name']}@{row['alias']}",
                        {"request": request_id, "reason": reason})  # fmt: skip
        return _request_of(row, policy.approvals)

    def requests(self, *, status: str | None = "pending") -> list[PromotionRequest]:
        """Promotion requests, oldest first (``status=None`` for all)."""
        stmt = sa.select(promotion_requests).order_by(promotion_requests.c.requested_at)
        if status is not None:
            stmt = stmt.where(promotion_requests.c.status == status)
        with self._store._engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(stmt).mappings()]
        return [_request_of(r, Policy.parse(r["policy"]).approvals) for r in rows]

    def _pending(self, conn: Connection, request_id: str) -> tuple[dict[str, Any], Policy]:
        """The request whose id is or starts with ``request_id`` (like a run id prefix)."""
        matches = conn.execute(
            sa.select(promotion_requests)
            .where(promotion_requests.c.id.startswith(request_id, autoescape=True))
            .limit(6)
        ).mappings().all()  # fmt: skip
        if not matches or not request_id:
            raise NotFoundError(
                f"no promotion request {request_id!r}; `kiln models requests` lists them"
            )
        if len(matches) > 1:
            raise AmbiguousIdError(request_id, [m["id"] for m in matches], kind="requests")
        row = dict(matches[0])
        if row["status"] != "pending":
            raise ValidationError("request", f"request {row['id']} is already {row['status']}")
        return row, Policy.parse(row["policy"])

    def set_policy(
        self,
        name: str,
        alias: str,
        policy: dict[str, Any] | None,
        *,
        weaken: bool = False,
        reason: str | None = None,
    ) -> None:
        """The policy every promotion to ``name@alias`` must pass (None removes it).

        A policy that asks less than the stored one (fewer gates or approvals, looser
        thresholds, None) is refused unless ``weaken`` is true; it is then audited as a
        weakening, with what it weakens, who did it and ``reason``.
        """
        _check_alias(alias)
        parsed = Policy.parse(policy) if policy is not None else None
        with self._store.transaction() as conn:
            self._model(conn, name)
            weakened = weakenings(self._policy(conn, name, alias), parsed)
            if weakened and not weaken:
                raise PolicyError(
                    f"the policy of {name}@{alias}",
                    [*weakened, "weakening a policy is its own act: pass weaken=True "
                     "(kiln models policy set --weaken --reason WHY)"],
                    outcome="is not changed",
                )  # fmt: skip
            conn.execute(
                policies.delete().where(policies.c.name == name, policies.c.alias == alias)
            )
            if parsed is not None:
                row = {"name": name, "alias": alias, "policy": parsed.spec,
                       "set_by": self._actor, "set_at": time.time()}  # fmt: skip
                conn.execute(policies.insert().values(**row))
            payload: dict[str, Any] = {"policy": policy}
            if weakened:
                payload |= {"weakened": weakened, "reason": reason}
            self._event(conn, "policy.set", f"{name}@{alias}", payload)

    def policy(self, name: str, alias: str) -> dict[str, Any] | None:
        """The stored policy of ``name@alias``, if any."""
        with self._store._engine.connect() as conn:
            found = self._policy(conn, name, alias)
        return found.spec if found else None

    def gate_failures(self, name: str, version: int, alias: str) -> list[str]:
        """Every gate of ``name@alias``'s stored policy that ``version`` fails, as a
        promotion would check it, moving nothing (an endpoint's traffic split is held to
        them). The alias's holder passes; so does every version when there is no policy.
        An approvals rule is met by an approved promotion request of this version."""
        _check_alias(alias)
        with self._store._engine.connect() as conn:
            candidate = self._version(conn, name, version)  # raises if unknown
            policy = self._policy(conn, name, alias)
            if policy is None or self._holder(conn, name, alias) == version:
                return []
            failures = self._gates(conn, policy, candidate, alias)
            approved = conn.execute(
                sa.select(promotion_requests.c.id).where(
                    promotion_requests.c.name == name, promotion_requests.c.alias == alias,
                    promotion_requests.c.version == version,
                    promotion_requests.c.status == "applied",
                )
            ).first()  # fmt: skip
        if policy.approvals and approved is None:
            failures.append(
                f"needs {policy.approvals} approval(s) from {', '.join(policy.approvers)}: "
                f"no approved promotion request of {name}:{version} to @{alias}"
            )
        return failures

    def _policy(self, conn: Connection, name: str, alias: str) -> Policy | None:
        spec = conn.execute(
            sa.select(policies.c.policy).where(policies.c.name == name, policies.c.alias == alias)
        ).scalar()
        return None if spec is None else Policy.parse(spec)

    def _gates(
        self, conn: Connection, policy: Policy, candidate: ModelVersion, alias: str
    ) -> list[str]:
        holder = self._holder(conn, candidate.name, alias)
        current = self._version(conn, candidate.name, holder) if holder is not None else None
        run = self._store.get_run(candidate.run_id)
        copies = self._store.query_runs(RunQuery(tags={"reproduced_from": run.id}, limit=None))
        return policy.check(
            candidate.metrics,
            current.metrics if current else None,
            dirty=None if run.code.repo_root is None else run.code.dirty,
            reproduced_verdicts=policy.reproduction_verdicts(run, copies),
        )

    def rollback(
        self, name: str, alias: str = "production", *, reason: str | None = None
    ) -> AliasMove:
        """Move ``name@alias`` back to the version it held before its current one."""
        _check_alias(alias)
        with self._store.transaction() as conn:
            current = self._holder(conn, name, alias)
            if current is None:
                raise NotFoundError(f"{name}@{alias} does not exist: nothing to roll back")
            installed = conn.execute(
                sa.select(alias_moves.c.from_version)
                .where(alias_moves.c.name == name, alias_moves.c.alias == alias,
                       alias_moves.c.to_version == current)
                .order_by(alias_moves.c.id.desc()).limit(1)
            ).scalar()  # fmt: skip
            if installed is None:
                raise NotFoundError(
                    f"{name}@{alias} has held only version {current}: nothing to roll back to"
                )
            return self._move(conn, name, alias, installed, reason or "rollback", "alias.rollback")

    def _move(
        self,
        conn: Connection,
        name: str,
        alias: str,
        version: int,
        reason: str | None,
        action: str,
        policy: dict[str, Any] | None = None,
    ) -> AliasMove:
        now = time.time()
        current = self._holder(conn, name, alias)
        if current is None:
            conn.execute(
                aliases.insert().values(name=name, alias=alias, version=version, updated_at=now)
            )
        else:
            conn.execute(
                aliases.update().where(aliases.c.name == name, aliases.c.alias == alias)
                .values(version=version, updated_at=now)
            )  # fmt: skip
        move = AliasMove(name, alias, current, version, reason, self._actor, now)
        conn.execute(alias_moves.insert().values(
            name=name, alias=alias, from_version=current, to_version=version, reason=reason,
            actor=self._actor, at=now,
        ))  # fmt: skip
        payload = {"from": current, "to": version, "reason": reason, "policy": policy}
        self._event(conn, action, f"{name}@{alias}", payload)
        return move

    def _event(self, conn: Connection, action: str, target: str, payload: dict[str, Any]) -> None:
        self._store.append_events(
            conn, [audit.Event(action, target, payload, time.time(), self._actor)]
        )

    # -- reading -----------------------------------------------------------------------

    def get(self, ref: str) -> ModelVersion:
        """The version a reference points at now: ``name:3`` or ``name@alias``."""
        name, version, alias = parse_ref(ref)
        with self._store._engine.connect() as conn:
            if alias is not None:
                version = self._holder(conn, name, alias)
            if version is None:
                self._model(conn, name)
                raise NotFoundError(f"{name} has no alias {alias!r}")
            return self._version(conn, name, version)

    def names(self) -> list[str]:
        with self._store._engine.connect() as conn:
            return list(conn.execute(sa.select(models.c.name).order_by(models.c.name)).scalars())

    def versions(self, name: str) -> list[ModelVersion]:
        with self._store._engine.connect() as conn:
            self._model(conn, name)
            rows = conn.execute(
                sa.select(model_versions).where(model_versions.c.name == name)
                .order_by(model_versions.c.version)
            ).mappings()  # fmt: skip
            return [ModelVersion(**dict(r)) for r in rows]

    def aliases(self, name: str) -> dict[str, int]:
        with self._store._engine.connect() as conn:
            self._model(conn, name)
            rows = conn.execute(
                sa.select(aliases.c.alias, aliases.c.version).where(aliases.c.name == name)
            )
            return dict(sorted((a, v) for a, v in rows))

    def history(self, name: str, alias: str | None = None) -> list[AliasMove]:
        """Every move of the model's aliases (or of one), oldest first."""
        with self._store._engine.connect() as conn:
            self._model(conn, name)
            stmt = (
                sa.select(alias_moves).where(alias_moves.c.name == name).order_by(alias_moves.c.id)
            )
            if alias is not None:
                stmt = stmt.where(alias_moves.c.alias == alias)
            return [
                AliasMove(r["name"], r["alias"], r["from_version"], r["to_version"], r["reason"],
                          r["actor"], r["at"])
                for r in conn.execute(stmt).mappings()
            ]  # fmt: skip

    def _model(self, conn: Connection, name: str) -> None:
        if conn.execute(sa.select(models.c.name).where(models.c.name == name)).first() is None:
            raise NotFoundError(f"no model {name!r}; `kiln models ls` lists them")

    def _version(self, conn: Connection, name: str, version: int) -> ModelVersion:
        row = conn.execute(
            sa.select(model_versions).where(model_versions.c.name == name,
                                            model_versions.c.version == version)
        ).mappings().first()  # fmt: skip
        if row is None:
            self._model(conn, name)
            raise NotFoundError(f"model {name} has no version {version}")
        return ModelVersion(**dict(row))

    def _holder(self, conn: Connection, name: str, alias: str) -> int | None:
        value = conn.execute(
            sa.select(aliases.c.version).where(aliases.c.name == name, aliases.c.alias == alias)
        ).scalar()
        return None if value is None else int(value)


def _request_of(row: dict[str, Any], needed: int) -> PromotionRequest:
    return PromotionRequest(
        id=row["id"],
        name=row["name"],
        alias=row["alias"],
        version=row["version"],
        reason=row["reason"],
        status=row["status"],
        approvals=tuple(row["approvals"]),
        needed=needed,
        requested_by=row["requested_by"],
        requested_at=row["requested_at"],
        decided_at=row["decided_at"],
    )
