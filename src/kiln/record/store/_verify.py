"""The registry's state, recomputed from the audit chain and compared with its tables.

Every change to the registry is an event whose payload holds what it set: a model
version's run and artifact hash, an alias move, a policy, a promotion request and
its approvals, an endpoint's traffic split. Replaying them in order gives what the
tables must hold now; any row that differs, that no event made, or that is gone, is
a change made around Kiln (an UPDATE in the database, say), and is reported.
Events written before a field was carried are compared on what they carried.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kiln.record.audit import Problem, canonical
from kiln.record.store._schema import (
    alias_moves,
    aliases,
    endpoints,
    model_versions,
    policies,
    promotion_requests,
)
from kiln.record.store._schema import audit as audit_log

_ACTIONS = (
    "model.register", "alias.promote", "alias.rollback", "policy.set", "promotion.request",
    "promotion.approve", "promotion.reject", "endpoint.serve", "endpoint.traffic",
)  # fmt: skip


@dataclass
class _Expected:
    """The registry as the chain says it must be."""

    versions: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    moves: dict[str, list[tuple[int, tuple[Any, ...]]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    policies: dict[str, tuple[int, Any]] = field(default_factory=dict)
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)
    traffic: dict[str, tuple[int, Any]] = field(default_factory=dict)
    endpoints: dict[str, int] = field(default_factory=dict)  # name -> its first event

    def apply(self, seq: int, actor: str, action: str, target: str, p: dict[str, Any]) -> None:
        if action == "model.register":
            self.versions[target] = (seq, p)
        elif action in ("alias.promote", "alias.rollback"):
            self.moves[target].append((seq, (p.get("from"), p.get("to"), p.get("reason"), actor)))
        elif action == "policy.set":
            self.policies[target] = (seq, p.get("policy"))
        elif action == "promotion.request":
            self.requests[p["request"]] = {"seq": seq, "by": actor, "approvals": [], **p}
        elif action == "promotion.approve" and p.get("request") in self.requests:
            self.requests[p["request"]]["approvals"].append(actor)
        elif action == "promotion.reject" and p.get("request") in self.requests:
            self.requests[p["request"]]["rejected"] = True
        elif action == "endpoint.serve":
            self.endpoints.setdefault(target, seq)
        elif action == "endpoint.traffic":
            self.traffic[target] = (seq, p.get("traffic"))


def registry_problems(conn: Connection) -> Iterator[Problem]:
    """Every difference between the registry's tables and what its events set."""
    expected = _Expected()
    events = conn.execute(
        sa.select(audit_log.c.seq, audit_log.c.actor, audit_log.c.action, audit_log.c.target,
                  audit_log.c.payload, audit_log.c.project)
        .where(audit_log.c.action.in_(_ACTIONS)).order_by(audit_log.c.seq)
    )  # fmt: skip
    for seq, actor, action, target, payload, project in events:
        expected.apply(seq, actor, action, _in(project, target), json.loads(payload))
    yield from _versions(conn, expected)
    yield from _aliases(conn, expected)
    yield from _policies(conn, expected)
    yield from _requests(conn, expected)
    yield from _traffic(conn, expected)


def _in(project: str, name: str) -> str:
    """A model's or endpoint's name with its project (names are unique per project)."""
    return name if project == "default" else f"{project}/{name}"


def _same(a: Any, b: Any) -> bool:
    return canonical(a) == canonical(b)


def _versions(conn: Connection, expected: _Expected) -> Iterator[Problem]:
    seen = set()
    for row in conn.execute(sa.select(model_versions)).mappings():
        ref = _in(row["project"], f"{row['name']}:{row['version']}")
        seen.add(ref)
        if ref not in expected.versions:
            yield Problem(None, f"model version {ref} was made without an event")
            continue
        seq, p = expected.versions[ref]
        for key, column in (("run_id", "run_id"), ("artifact_sha256", "artifact_sha256"),
                            ("metrics", "metrics"), ("artifact", "artifact")):  # fmt: skip
            if key in p and not _same(p[key], row[column]):
                yield Problem(seq, f"model version {ref}: its {column} changed after event {seq}")
    for ref, (seq, _) in expected.versions.items():
        if ref not in seen:
            yield Problem(seq, f"model version {ref}, registered by event {seq}, is gone")


def _aliases(conn: Connection, expected: _Expected) -> Iterator[Problem]:
    held = {
        _in(p, f"{n}@{a}"): v
        for p, n, a, v in conn.execute(
            sa.select(aliases.c.project, aliases.c.name, aliases.c.alias, aliases.c.version)
        )
    }
    rows: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for p, n, a, f, t, why, who in conn.execute(
        sa.select(alias_moves.c.project, alias_moves.c.name, alias_moves.c.alias,
                  alias_moves.c.from_version, alias_moves.c.to_version, alias_moves.c.reason,
                  alias_moves.c.actor)
        .order_by(alias_moves.c.id)
    ):  # fmt: skip
        rows[_in(p, f"{n}@{a}")].append((f, t, why, who))
    for target in sorted(set(held) | set(rows) | set(expected.moves)):
        moves = expected.moves.get(target, [])
        if [m for _, m in moves] != rows.get(target, []):
            yield Problem(moves[-1][0] if moves else None,
                          f"{target}: its history differs from its alias events")  # fmt: skip
        holder = moves[-1][1][1] if moves else None
        if held.get(target) != holder:
            yield Problem(
                moves[-1][0] if moves else None,
                f"{target} points at version {held.get(target)}, but its events moved it "
                f"to {holder}",
            )


def _policies(conn: Connection, expected: _Expected) -> Iterator[Problem]:
    stored = {
        _in(p, f"{n}@{a}"): spec
        for p, n, a, spec in conn.execute(
            sa.select(policies.c.project, policies.c.name, policies.c.alias, policies.c.policy)
        )
    }
    for target in sorted(set(stored) | set(expected.policies)):
        seq, policy = expected.policies.get(target, (None, None))
        if not _same(stored.get(target), policy):
            yield Problem(seq, f"{target}: its policy differs from the one its events set")


def _requests(conn: Connection, expected: _Expected) -> Iterator[Problem]:
    seen = set()
    for row in conn.execute(sa.select(promotion_requests)).mappings():
        seen.add(row["id"])
        want = expected.requests.get(row["id"])
        if want is None:
            yield Problem(None, f"promotion request {row['id']} was made without an event")
            continue
        seq, spec = want["seq"], row["policy"] or {}
        approvals = (spec.get("approvals") or {}).get("count", 0) if isinstance(spec, dict) else 0
        if (
            row["version"] != want.get("version", row["version"])
            or row["requested_by"] != want["by"]
            or list(row["approvals"] or []) != want["approvals"]
            or (row["status"] == "rejected") != bool(want.get("rejected"))
            or approvals != want.get("needs", approvals)
            or ("policy" in want and not _same(spec, want["policy"]))
        ):
            yield Problem(seq, f"promotion request {row['id']} differs from its events")
    for request_id, want in expected.requests.items():
        if request_id not in seen:
            yield Problem(want["seq"], f"promotion request {request_id} is gone")


def _traffic(conn: Connection, expected: _Expected) -> Iterator[Problem]:
    seen = set()
    for project, bare, traffic in conn.execute(
        sa.select(endpoints.c.project, endpoints.c.name, endpoints.c.traffic)
    ):
        name = _in(project, bare)
        seen.add(name)
        if name not in expected.endpoints:
            yield Problem(None, f"endpoint {name} was made without an event")
        seq, split = expected.traffic.get(name, (None, None))
        if not _same(traffic, split):
            yield Problem(seq, f"endpoint {name}: its traffic split differs from its events")
    for name, seq in expected.endpoints.items():
        if name not in seen:
            yield Problem(seq, f"endpoint {name}, first served at event {seq}, is gone")
