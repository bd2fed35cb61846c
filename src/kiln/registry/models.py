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
from typing import TYPE_CHECKING, Any, Protocol

from kiln.config import os_user
from kiln.errors import AmbiguousIdError, NotFoundError, ValidationError
from kiln.record import audit
from kiln.record.model import RunRecord, RunStatus
from kiln.record.resolve import RunLike, resolve_run
from kiln.record.store.base import RunQuery
from kiln.record.values import check_name
from kiln.registry.policy import Policy, PolicyError, combine, weakenings
from kiln.registry.refs import check_alias as _check_alias
from kiln.registry.refs import parse_ref

if TYPE_CHECKING:
    from kiln.record.store._registry import RegistryRows
    from kiln.record.store.base import KilnStore
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
        with self._store.registry_transaction() as rows:
            if not rows.has_model(name):
                rows.add_model(name, app=self._app, at=now, by=self._actor)
            latest = rows.latest_version(name)
            row = {
                "name": name, "version": (latest or 0) + 1, "run_id": record.id,
                "artifact": art.name, "artifact_sha256": art.sha256, "metrics": metrics,
                "signature": signature, "created_at": now, "created_by": self._actor,
            }  # fmt: skip
            rows.add_version(row)
            payload = {"run_id": record.id, "artifact": art.name, "artifact_sha256": art.sha256,
                       "metrics": metrics}  # fmt: skip
            self._event(rows, "model.register", f"{name}:{row['version']}", payload)
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
        with self._store.registry_transaction() as rows:
            candidate = self._version(rows, name, version)  # raises if unknown
            target = f"{name}:{version} -> {name}@{alias}"
            effective = combine(self._policy(rows, name, alias), given, target)
            if effective is not None:
                failures = self._gates(rows, effective, candidate, alias)
                if failures:
                    raise PolicyError(f"{name}:{version} -> {name}@{alias}", failures)
            spec = effective.spec if effective else None
            if effective is not None and effective.approvals:
                return self._request(rows, candidate, alias, reason, effective)
            return self._move(rows, name, alias, version, reason, "alias.promote", spec)

    # -- approvals -----------------------------------------------------------------------

    def _request(
        self,
        rows: RegistryRows,
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
        rows.add_request(row)
        payload = {"request": row["id"], "version": candidate.version, "needs": policy.approvals,
                   "policy": policy.spec}  # fmt: skip
        self._event(rows, "promotion.request", f"{candidate.name}@{alias}", payload)
        return _request_of(row, policy.approvals)

    def approve(self, request_id: str) -> PromotionRequest:
        """Approve a pending request as this actor; the last approval needed moves the alias."""
        failures: list[str] = []
        with self._store.registry_transaction() as rows:
            row, policy = self._pending(rows, request_id)
            request_id = row["id"]  # the whole id, where a prefix was given
            if self._actor == row["requested_by"]:
                raise ValidationError("approver", "the requester cannot approve its own request")
            if policy.approvers and self._actor not in policy.approvers:
                raise ValidationError("approver", f"{self._actor} may not approve this request",
                                      allowed=policy.approvers)  # fmt: skip
            if self._actor in row["approvals"]:
                raise ValidationError("approver", f"{self._actor} has already approved it")
            row["approvals"] = [*row["approvals"], self._actor]
            target = f"{row['name']}@{row['alias']}"
            # KILN_ACTOR is claimed, not proven (until the team server's tokens): the
            # OS account that gave the approval is recorded beside it.
            self._event(rows, "promotion.approve", target,
                        {"request": request_id, "os_user": os_user()})  # fmt: skip
            if len(row["approvals"]) >= policy.approvals:
                candidate = self._version(rows, row["name"], row["version"])
                failures = self._gates(rows, policy, candidate, row["alias"])
                row["status"] = "failed" if failures else "applied"
                row["decided_at"] = time.time()
                if not failures:
                    approvers = ", ".join(row["approvals"])
                    why = f"{row['reason'] or 'approved'} (request {request_id}: {approvers})"
                    self._move(rows, row["name"], row["alias"], row["version"], why,
                               "alias.promote", policy.spec)  # fmt: skip
            rows.update_request(request_id, approvals=row["approvals"], status=row["status"],
                                decided_at=row["decided_at"])  # fmt: skip
        if failures:
            raise PolicyError(f"request {request_id}", failures)
        return _request_of(row, policy.approvals)

    def reject(self, request_id: str, *, reason: str | None = None) -> PromotionRequest:
        """Turn a pending request down (an approver or its requester may)."""
        with self._store.registry_transaction() as rows:
            row, policy = self._pending(rows, request_id)
            request_id = row["id"]  # the whole id, where a prefix was given
            if self._actor not in policy.approvers and self._actor != row["requested_by"]:
                raise ValidationError("approver", f"{self._actor} may not reject this request",
                                      allowed=policy.approvers)  # fmt: skip
            row.update(status="rejected", decided_at=time.time())
            rows.update_request(request_id, status="rejected", decided_at=row["decided_at"])
            self._event(rows, "promotion.reject", f"{row['name']}@{row['alias']}",
                        {"request": request_id, "reason": reason})  # fmt: skip
        return _request_of(row, policy.approvals)

    def requests(self, *, status: str | None = "pending") -> list[PromotionRequest]:
        """Promotion requests, oldest first (``status=None`` for all)."""
        with self._store.registry_reader() as rows:
            found = rows.requests(status)
        return [_request_of(r, Policy.parse(r["policy"]).approvals) for r in found]

    def _pending(self, rows: RegistryRows, request_id: str) -> tuple[dict[str, Any], Policy]:
        """The request whose id is or starts with ``request_id`` (like a run id prefix)."""
        matches = rows.requests_starting(request_id, limit=6)
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
        with self._store.registry_transaction() as rows:
            self._model(rows, name)
            weakened = weakenings(self._policy(rows, name, alias), parsed)
            if weakened and not weaken:
                raise PolicyError(
                    f"the policy of {name}@{alias}",
                    [*weakened, "weakening a policy is its own act: pass weaken=True "
                     "(kiln models policy set --weaken --reason WHY)"],
                    outcome="is not changed",
                )  # fmt: skip
            row = None if parsed is None else {
                "name": name, "alias": alias, "policy": parsed.spec, "set_by": self._actor,
                "set_at": time.time(),
            }  # fmt: skip
            rows.replace_policy(name, alias, row)
            payload: dict[str, Any] = {"policy": policy}
            if weakened:
                payload |= {"weakened": weakened, "reason": reason}
            self._event(rows, "policy.set", f"{name}@{alias}", payload)

    def policy(self, name: str, alias: str) -> dict[str, Any] | None:
        """The stored policy of ``name@alias``, if any."""
        with self._store.registry_reader() as rows:
            found = self._policy(rows, name, alias)
        return found.spec if found else None

    def gate_failures(self, name: str, version: int, alias: str) -> list[str]:
        """Every gate of ``name@alias``'s stored policy that ``version`` fails, as a
        promotion would check it, moving nothing (an endpoint's traffic split is held to
        them). The alias's holder passes; so does every version when there is no policy.
        An approvals rule is met by an approved promotion request of this version."""
        _check_alias(alias)
        with self._store.registry_reader() as rows:
            candidate = self._version(rows, name, version)  # raises if unknown
            policy = self._policy(rows, name, alias)
            if policy is None or rows.holder(name, alias) == version:
                return []
            failures = self._gates(rows, policy, candidate, alias)
            approved = rows.applied(name, alias, version)
        if policy.approvals and not approved:
            failures.append(
                f"needs {policy.approvals} approval(s) from {', '.join(policy.approvers)}: "
                f"no approved promotion request of {name}:{version} to @{alias}"
            )
        return failures

    def _policy(self, rows: RegistryRows, name: str, alias: str) -> Policy | None:
        spec = rows.policy(name, alias)
        return None if spec is None else Policy.parse(spec)

    def _gates(
        self, rows: RegistryRows, policy: Policy, candidate: ModelVersion, alias: str
    ) -> list[str]:
        holder = rows.holder(candidate.name, alias)
        current = self._version(rows, candidate.name, holder) if holder is not None else None
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
        with self._store.registry_transaction() as rows:
            current = rows.holder(name, alias)
            if current is None:
                raise NotFoundError(f"{name}@{alias} does not exist: nothing to roll back")
            installed = rows.installed_from(name, alias, current)
            if installed is None:
                raise NotFoundError(
                    f"{name}@{alias} has held only version {current}: nothing to roll back to"
                )
            return self._move(rows, name, alias, installed, reason or "rollback", "alias.rollback")

    def _move(
        self,
        rows: RegistryRows,
        name: str,
        alias: str,
        version: int,
        reason: str | None,
        action: str,
        policy: dict[str, Any] | None = None,
    ) -> AliasMove:
        now = time.time()
        current = rows.holder(name, alias)
        rows.move_alias(name, alias, from_version=current, to_version=version, reason=reason,
                        actor=self._actor, at=now)  # fmt: skip
        payload = {"from": current, "to": version, "reason": reason, "policy": policy}
        self._event(rows, action, f"{name}@{alias}", payload)
        return AliasMove(name, alias, current, version, reason, self._actor, now)

    def _event(self, rows: RegistryRows, action: str, target: str, payload: dict[str, Any]) -> None:
        rows.event(audit.Event(action, target, payload, time.time(), self._actor))

    # -- reading -----------------------------------------------------------------------

    def get(self, ref: str) -> ModelVersion:
        """The version a reference points at now: ``name:3`` or ``name@alias``."""
        name, version, alias = parse_ref(ref)
        with self._store.registry_reader() as rows:
            if alias is not None:
                version = rows.holder(name, alias)
            if version is None:
                self._model(rows, name)
                raise NotFoundError(f"{name} has no alias {alias!r}")
            return self._version(rows, name, version)

    def names(self) -> list[str]:
        with self._store.registry_reader() as rows:
            return rows.model_names()

    def versions(self, name: str) -> list[ModelVersion]:
        with self._store.registry_reader() as rows:
            self._model(rows, name)
            return [ModelVersion(**r) for r in rows.versions(name)]

    def aliases(self, name: str) -> dict[str, int]:
        with self._store.registry_reader() as rows:
            self._model(rows, name)
            return rows.aliases(name)

    def history(self, name: str, alias: str | None = None) -> list[AliasMove]:
        """Every move of the model's aliases (or of one), oldest first."""
        with self._store.registry_reader() as rows:
            self._model(rows, name)
            return [
                AliasMove(r["name"], r["alias"], r["from_version"], r["to_version"], r["reason"],
                          r["actor"], r["at"])
                for r in rows.moves(name, alias)
            ]  # fmt: skip

    def _model(self, rows: RegistryRows, name: str) -> None:
        if not rows.has_model(name):
            raise NotFoundError(f"no model {name!r}; `kiln models ls` lists them")

    def _version(self, rows: RegistryRows, name: str, version: int) -> ModelVersion:
        row = rows.version(name, version)
        if row is None:
            self._model(rows, name)
            raise NotFoundError(f"model {name} has no version {version}")
        return ModelVersion(**row)


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


class RegistryStore(Protocol):
    """The registry's operations, whoever owns the database: :class:`Models` over a SQL
    store (gates and audit in its transaction), or a client of ``kiln server``."""

    def register(
        self, name: str, run: RunLike, *, artifact: str, signature: Any = None
    ) -> ModelVersion: ...
    def promote(
        self, name: str, version: int, *, alias: str = "production", reason: str | None = None,
        policy: dict[str, Any] | None = None,
    ) -> AliasMove | PromotionRequest: ...  # fmt: skip
    def approve(self, request_id: str) -> PromotionRequest: ...
    def reject(self, request_id: str, *, reason: str | None = None) -> PromotionRequest: ...
    def requests(self, *, status: str | None = "pending") -> list[PromotionRequest]: ...
    def set_policy(
        self, name: str, alias: str, policy: dict[str, Any] | None, *, weaken: bool = False,
        reason: str | None = None,
    ) -> None: ...  # fmt: skip
    def policy(self, name: str, alias: str) -> dict[str, Any] | None: ...
    def gate_failures(self, name: str, version: int, alias: str) -> list[str]: ...
    def rollback(
        self, name: str, alias: str = "production", *, reason: str | None = None
    ) -> AliasMove: ...
    def get(self, ref: str) -> ModelVersion: ...
    def names(self) -> list[str]: ...
    def versions(self, name: str) -> list[ModelVersion]: ...
    def aliases(self, name: str) -> dict[str, int]: ...
    def history(self, name: str, alias: str | None = None) -> list[AliasMove]: ...


def models_for(store: KilnStore, *, app: str, actor: str) -> RegistryStore:
    """The registry of ``store``: run here over a SQL store, asked of a team server over
    its HTTP client."""
    from kiln.record.store.http import HttpStore

    if isinstance(store, HttpStore):
        from kiln.registry._http import HttpModels

        return HttpModels(store, app=app, actor=actor)
    if not hasattr(store, "registry_transaction"):
        raise TypeError(f"{type(store).__name__} holds no registry rows")
    return Models(store, app=app, actor=actor)  # type: ignore[arg-type]  # SQL, or a fake
