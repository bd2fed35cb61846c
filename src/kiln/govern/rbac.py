"""Roles as a table of verbs x resources, declared once (Kubernetes style: no deny rules).

Every route of ``kiln server`` names the one permission it needs (``need("runs",
"read")``); a route that names none is refused by a test that walks every route. A
role grants exactly the permissions below and those of the roles before it:

==========  =====================================================================
viewer      read runs, blobs, models, endpoints, traces and the audit log; see and
            manage its own account (who am I, its own tokens)
member      also: record runs and blobs, register models, request promotions,
            serve endpoints and set their traffic, write spans
approver    also: approve or reject promotion requests (a requester still cannot
            approve its own request; a policy's ``approvers`` may narrow it), and
            agents' approval requests (a human only)
admin       also: set policies, roll back, remove runs, collect garbage, manage
            principals, members and tokens, create projects, set the project's
            queues and budgets (and, in the default project, the server's pools)
==========  =====================================================================
"""

from __future__ import annotations

import functools
from typing import Literal

from kiln.errors import ValidationError

Role = Literal["viewer", "member", "approver", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "member", "approver", "admin")  # each wider than the last

_GRANTS: dict[Role, frozenset[tuple[str, str]]] = {
    "viewer": frozenset({
        ("runs", "read"), ("blobs", "read"), ("models", "read"), ("endpoints", "read"),
        ("traces", "read"), ("audit", "read"), ("account", "self"),
    }),
    "member": frozenset({
        ("runs", "write"), ("blobs", "write"), ("models", "write"), ("promotions", "request"),
        ("endpoints", "write"), ("traces", "write"),
    }),
    "approver": frozenset({("promotions", "approve"), ("approvals", "decide")}),
    "admin": frozenset({
        ("policies", "write"), ("models", "rollback"), ("runs", "delete"), ("store", "gc"),
        ("principals", "admin"), ("tokens", "admin"), ("projects", "create"),
        ("quotas", "admin"), ("pools", "admin"),
    }),
}  # fmt: skip

PERMISSIONS: frozenset[tuple[str, str]] = frozenset().union(*_GRANTS.values())

# Whatever its role, an agent never manages principals or tokens (it would become
# someone else), creates projects, approves anything (a person does), sets promotion
# policies, collects garbage, or sets quotas, budgets or pools: governance is people's.
AGENT_DENIED: frozenset[tuple[str, str]] = frozenset({
    ("principals", "admin"), ("tokens", "admin"), ("projects", "create"),
    ("approvals", "decide"), ("promotions", "approve"), ("policies", "write"),
    ("store", "gc"), ("quotas", "admin"), ("pools", "admin"),
})  # fmt: skip


@functools.cache
def grants(role: Role) -> frozenset[tuple[str, str]]:
    """Every permission ``role`` holds: its own and those of the roles below it."""
    out: frozenset[tuple[str, str]] = frozenset()
    for r in ROLES[: ROLES.index(role) + 1]:
        out |= _GRANTS[r]
    return out


def allows(role: Role, resource: str, verb: str) -> bool:
    return (resource, verb) in grants(role)


def check_role(value: object, field: str = "role") -> Role:
    if value not in ROLES:
        raise ValidationError(field, f"{value!r} is not a role", allowed=", ".join(ROLES))
    return value


def narrowest(*roles: str) -> Role:
    """The narrowest of ``roles`` (each checked)."""
    return min((check_role(r) for r in roles), key=ROLES.index)


def at_most(role: Role, ceiling: Role) -> bool:
    """Whether ``role`` grants nothing ``ceiling`` does not (so a holder of ``ceiling``
    may hand it out)."""
    return ROLES.index(role) <= ROLES.index(ceiling)
