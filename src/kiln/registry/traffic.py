"""Live traffic splits, checked where the database is.

A split sends an endpoint's requests to pinned versions of its model by weight. Every
version named must be registered, and when the endpoint follows an alias, every version
given traffic must pass the gates a promotion to that alias would. On a team server
these checks and the ``endpoint.traffic`` audit event run in the server: the client
sends the split and an override's reason, never the event.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kiln.errors import KilnError, NotFoundError, ValidationError
from kiln.record.store.base import KilnStore
from kiln.registry.policy import PolicyError
from kiln.registry.refs import parse_ref


def parse_traffic(traffic: Mapping[str, Any], model_name: str) -> dict[str, float]:
    """Check a split such as ``{"fraud:7": 90, "fraud:8": 10}``: pinned versions of the
    endpoint's model and positive weights (they need not add up to 100)."""
    if not isinstance(traffic, Mapping) or not traffic:
        raise ValidationError("traffic", f"{traffic!r} is not a split",
                              allowed="{'name:VERSION': weight, ...}")  # fmt: skip
    out: dict[str, float] = {}
    for ref, weight in traffic.items():
        name, version, alias = parse_ref(str(ref))
        if version is None or alias is not None:
            raise ValidationError("traffic", f"{ref!r} does not pin a version",
                                  allowed="'name:VERSION'")  # fmt: skip
        if name != model_name:
            raise ValidationError(
                "traffic", f"{ref!r} is not a version of the endpoint's model {model_name!r}"
            )
        if (
            not isinstance(weight, int | float)
            or isinstance(weight, bool)
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise ValidationError("traffic", f"weight {weight!r} of {ref!r} is not a weight",
                                  allowed="a number >= 0")  # fmt: skip
        out[f"{name}:{version}"] = float(weight)
    if sum(out.values()) <= 0:
        raise ValidationError("traffic", "every weight is 0: no version would get a request")
    return out


class TrafficRefused(PolicyError):
    """A split would send requests to versions that fail the promotion gates of the
    alias the endpoint follows; ``failures`` names each, prefixed by its version."""

    def __init__(self, endpoint: str, model: str, failures: list[str]) -> None:
        self.failures = failures
        KilnError.__init__(
            self,
            f"endpoint {endpoint}: a split through {model} may only send traffic to versions "
            f"that pass its promotion policy: {'; '.join(failures)}. Promote them first, or "
            "override with `kiln endpoints set-traffic ... --override-policy --reason TEXT` "
            "(audited)",
        )


def gate_failures(
    store: KilnStore, model: str, split: Mapping[str, float] | None, *, actor: str
) -> list[str]:
    """What each version given traffic by ``split`` fails of the promotion gates of the
    alias ``model`` follows (``name@alias``); nothing for a pinned model or no split."""
    from kiln.registry.models import models_for

    name, _, alias = parse_ref(model)
    if alias is None or not split:
        return []
    models = models_for(store, app="", actor=actor)
    failures = []
    for ref, weight in split.items():
        version = parse_ref(ref)[1]
        if weight > 0 and version is not None:
            failures += [f"{ref}: {f}" for f in models.gate_failures(name, version, alias)]
    return failures


def set_traffic(
    store: KilnStore,
    name: str,
    traffic: Mapping[str, Any] | None,
    *,
    actor: str,
    override_reason: str | None = None,
) -> dict[str, float] | None:
    """Set a live split for endpoint ``name`` (None: follow its declared model again).

    Every version named must be registered, and when the endpoint follows an alias,
    every version given traffic must pass the gates a promotion to that alias would
    (:class:`TrafficRefused` names each failure). ``override_reason`` sends it anyway;
    the override, who made it and why are kept in the ``endpoint.traffic`` audit event.
    Over a team server all of it runs in the server.
    """
    from kiln.record.store.http import HttpStore
    from kiln.registry.models import models_for

    if override_reason is not None and not override_reason.strip():
        raise ValidationError("override_reason", "an override needs a reason saying why")
    if isinstance(store, HttpStore):
        from kiln.registry._http import set_traffic as remote

        return remote(store, name, traffic, actor=actor, override_reason=override_reason)
    info = store.endpoint(name)
    if info is None:
        raise NotFoundError(f"no endpoint {name!r}; `kiln endpoints ls` lists them")
    split = None if traffic is None else parse_traffic(traffic, parse_ref(info.model)[0])
    models = models_for(store, app=info.app, actor=actor)
    for ref in split or {}:
        models.get(ref)  # NotFoundError names the missing version
    payload: dict[str, Any] = {"traffic": split}
    declared = info.spec.get("traffic")
    failures = gate_failures(store, info.model, split or declared, actor=actor)
    if failures:
        if override_reason is None:
            raise TrafficRefused(name, info.model, failures)
        payload["override_policy"] = {"reason": override_reason, "failures": failures}
    store.set_live_traffic(name, split, actor=actor, payload=payload)
    return split
