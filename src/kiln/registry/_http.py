"""The registry on a team server. Every rule (gates, approvals, who may approve, the
audit events) runs in the server, inside its transaction; this client only asks."""

from __future__ import annotations

from typing import Any

from kiln.record.model import RunRecord
from kiln.record.resolve import RunLike, resolve_run
from kiln.record.store.http import HttpStore, _q, actor_header
from kiln.registry.models import AliasMove, ModelVersion, PromotionRequest


class HttpModels:
    """:class:`kiln.registry.models.Models`' operations, as requests to ``kiln server``."""

    def __init__(self, store: HttpStore, *, app: str, actor: str) -> None:
        self._store = store
        self._app = app
        self._headers = actor_header(actor)  # "": the store's own

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._store.client.call(method, path, headers=self._headers, **kwargs)

    def register(
        self, name: str, run: RunLike, *, artifact: str, signature: Any = None
    ) -> ModelVersion:
        record = resolve_run(run.id if isinstance(run, RunRecord) else run, self._store,
                             ended=True)  # fmt: skip
        body = {"app": self._app, "run_id": record.id, "artifact": artifact,
                "signature": signature}  # fmt: skip
        return ModelVersion(**self._call("POST", f"/models/{_q(name)}/versions", json=body))

    def promote(
        self, name: str, version: int, *, alias: str = "production", reason: str | None = None,
        policy: dict[str, Any] | None = None,
    ) -> AliasMove | PromotionRequest:  # fmt: skip
        body = {"version": version, "alias": alias, "reason": reason, "policy": policy}
        return _outcome(self._call("POST", f"/models/{_q(name)}/promote", json=body))

    def approve(self, request_id: str) -> PromotionRequest:
        return _request(self._call("POST", f"/promotion-requests/{_q(request_id)}/approve"))

    def reject(self, request_id: str, *, reason: str | None = None) -> PromotionRequest:
        found = self._call("POST", f"/promotion-requests/{_q(request_id)}/reject",
                           json={"reason": reason})  # fmt: skip
        return _request(found)

    def requests(self, *, status: str | None = "pending") -> list[PromotionRequest]:
        found = self._call("GET", "/promotion-requests", params={"status": status or "all"})
        return [_request(r) for r in found["requests"]]

    def set_policy(
        self, name: str, alias: str, policy: dict[str, Any] | None, *, weaken: bool = False,
        reason: str | None = None,
    ) -> None:  # fmt: skip
        body = {"policy": policy, "weaken": weaken, "reason": reason}
        self._call("PUT", f"/models/{_q(name)}/policies/{_q(alias)}", json=body)

    def policy(self, name: str, alias: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self._call(
            "GET", f"/models/{_q(name)}/policies/{_q(alias)}"
        )["policy"]
        return found

    def gate_failures(self, name: str, version: int, alias: str) -> list[str]:
        found = self._call("GET", f"/models/{_q(name)}/versions/{version}/gates",
                           params={"alias": alias})  # fmt: skip
        return list(found["items"])

    def rollback(
        self, name: str, alias: str = "production", *, reason: str | None = None
    ) -> AliasMove:
        found = self._call("POST", f"/models/{_q(name)}/rollback",
                           json={"alias": alias, "reason": reason})  # fmt: skip
        return AliasMove(**found["value"])

    def get(self, ref: str) -> ModelVersion:
        return ModelVersion(**self._call("GET", "/models/resolve", params={"ref": ref}))

    def names(self) -> list[str]:
        return list(self._call("GET", "/models")["items"])

    def versions(self, name: str) -> list[ModelVersion]:
        found = self._call("GET", f"/models/{_q(name)}/versions")["versions"]
        return [ModelVersion(**v) for v in found]

    def aliases(self, name: str) -> dict[str, int]:
        return dict(self._call("GET", f"/models/{_q(name)}/aliases"))

    def history(self, name: str, alias: str | None = None) -> list[AliasMove]:
        params = {"alias": alias} if alias is not None else {}
        found = self._call("GET", f"/models/{_q(name)}/history", params=params)["moves"]
        return [AliasMove(**m) for m in found]


def _request(data: dict[str, Any]) -> PromotionRequest:
    data["approvals"] = tuple(data["approvals"])
    return PromotionRequest(**data)


def _outcome(data: dict[str, Any]) -> AliasMove | PromotionRequest:
    if data["kind"] == "move":
        return AliasMove(**data["value"])
    return _request(data["value"])


def set_traffic(
    store: HttpStore, name: str, traffic: Any, *, actor: str, override_reason: str | None
) -> dict[str, float] | None:
    """Ask the server to check and set ``name``'s live split (see
    :func:`kiln.registry.traffic.set_traffic`); the split it set."""
    headers = actor_header(actor)
    body = {"traffic": traffic, "override_reason": override_reason}
    found = store.client.call("PUT", f"/endpoints/{_q(name)}/traffic", headers=headers, json=body)
    split: dict[str, float] | None = found["traffic"]
    return split
