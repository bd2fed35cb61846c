"""Who is calling, and may they: bearer tokens checked against the store, and one
permission per route from :mod:`kiln.govern.rbac` (default deny).

Every route names its permission with ``dependencies=[need(resource, verb)]`` (or
``public()`` for health and the enrolment exchange); a test walks every route of the
app and fails on one that names neither. A failed authentication is a 401 problem
with ``WWW-Authenticate: Bearer`` and an ``auth.denied`` audit event; more than
:data:`FAILURES_PER_MINUTE` from one address within a minute are answered 429 without
being audited, while valid tokens from there still work (a flood of bad tokens cannot
lock anyone out). A forbidden call is a 403 and audited too. With
``--insecure-no-auth`` everyone acts as an admin under the name they declare.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn

from fastapi import Depends, Header, Request
from starlette.exceptions import HTTPException

from kiln.config import DEFAULT_PROJECT
from kiln.govern import rbac, tokens
from kiln.record import audit
from kiln.record.store.base import PrincipalRow, TokenRow
from kiln.record.store.sql import SqlStore

FAILURES_PER_MINUTE = 20
PROJECT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
TOUCH_EVERY_S = 60.0  # a token's last use is written at most this often


@dataclass(frozen=True, slots=True)
class Caller:
    """The principal a request acts as, with the role of the token it came with."""

    name: str
    role: rbac.Role
    project: str = DEFAULT_PROJECT
    token_id: str | None = None
    kind: str = "user"
    sponsor: str | None = None
    scopes: tuple[str, ...] | None = None  # an agent's: the permissions it is limited to

    def may(self, permission: tuple[str, str]) -> bool:
        """Whether the role, and the scopes if any, allow ``permission`` (an agent's
        never :data:`kiln.govern.rbac.AGENT_DENIED`)."""
        resource, verb = permission
        if not rbac.allows(self.role, resource, verb):
            return False
        if self.kind == "agent" and permission in rbac.AGENT_DENIED:
            return False
        if self.scopes is None or permission == ("account", "self"):  # who am I: always
            return True
        return f"{resource}:{verb}" in self.scopes

    def refusal(self, permission: tuple[str, str]) -> str:
        """Why :meth:`may` says no."""
        resource, verb = permission
        if not rbac.allows(self.role, resource, verb):
            return f"the role {self.role} may not {verb} {resource}"
        if self.kind == "agent" and permission in rbac.AGENT_DENIED:
            return f"an agent may not {verb} {resource}, whatever its role: a person does"
        return f"{resource}:{verb} is not among its scopes ({', '.join(self.scopes or ())})"


class Guard:
    """The server's memory of failed attempts (per address) and of token uses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._touched: dict[str, float] = {}

    def limited(self, address: str, now: float) -> bool:
        with self._lock:
            recent = self._failures.get(address)
            if recent is None:
                return False
            while recent and recent[0] < now - 60:
                recent.popleft()
            if not recent:
                del self._failures[address]  # many addresses must not grow this forever
                return False
            return len(recent) >= FAILURES_PER_MINUTE

    def failed(self, address: str, now: float) -> int:
        with self._lock:
            self._failures[address].append(now)
            return len(self._failures[address])

    def touch(self, token_id: str, now: float) -> bool:
        """Whether this use of the token should be written down."""
        with self._lock:
            if now - self._touched.get(token_id, 0.0) < TOUCH_EVERY_S:
                return False
            self._touched[token_id] = now
            return True


def _denied(
    request: Request, status: int, reason: str, target: str = "-", who: Caller | None = None
) -> HTTPException:
    """Audit a refused request (as its caller's, with an agent's sponsor, when a token
    said who); the exception that answers it."""
    store: SqlStore = request.app.state.store
    address = request.client.host if request.client else "-"
    payload = {"reason": reason, "address": address, "method": request.method,
               "path": request.url.path}  # fmt: skip
    if who is not None and who.sponsor:
        payload["sponsor"] = who.sponsor
    actor = who.name if who is not None and who.name else "anonymous"
    store.note(audit.Event("auth.denied", target, payload, time.time(), actor))
    headers = {"WWW-Authenticate": 'Bearer realm="kiln"'} if status == 401 else None
    return HTTPException(status, reason, headers=headers)


def caller(
    request: Request,
    authorization: Annotated[str | None, Header(max_length=200)] = None,
    kiln_project: Annotated[str | None, Header(pattern=PROJECT_PATTERN)] = None,
) -> Caller:
    """The caller of this request (401 without a valid token), in the project its token
    acts in. ``Kiln-Project``, if sent, must name that project (without authentication
    it chooses the project)."""
    state = request.app.state
    if not state.auth:  # the declared Kiln-Actor, or the store's
        return Caller(name="", role="admin", project=kiln_project or DEFAULT_PROJECT)
    scheme, _, presented = (authorization or "").partition(" ")
    found = identify(state, presented.strip() if scheme.lower() == "bearer" else None)
    if isinstance(found, Refusal):
        refuse(request, found.reason, found.target)
    if kiln_project is not None and kiln_project != found.project:
        raise _denied(request, 403, f"this token acts in project {found.project}, not "
                      f"{kiln_project}; use a token of that project (`kiln tokens create "
                      f"--project {kiln_project}`)", found.name)  # fmt: skip
    return found


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a token was refused, and the token id (or ``-``) to audit it under."""

    reason: str
    target: str = "-"


def identify(state: Any, presented: str | None) -> Caller | Refusal:
    """The principal a bearer token (``None``: none sent) acts as, with the narrowest of
    its token's, principal's and membership's roles; or why it is refused."""
    now = time.time()
    parsed = tokens.parse(presented) if presented is not None else None
    known = None if parsed is None else state.store.credentials(parsed[0])
    found, principal, member = known or (None, None, None)
    reason = _refusal(found, principal, parsed, now)
    if reason is not None:
        return Refusal(reason, parsed[0] if parsed else "-")
    assert found is not None and principal is not None  # noqa: S101  no refusal: a live token
    if member is None:
        return Refusal(f"the token's principal is no longer a member of project "
                       f"{found.project}", found.id)  # fmt: skip
    if state.guard.touch(found.id, now):
        state.store.token_used(found.id, now)
    role = rbac.narrowest(found.role, principal.role, member.role)
    scopes = None if principal.scopes is None else tuple(principal.scopes)
    return Caller(name=principal.name, role=role, project=found.project, token_id=found.id,
                  kind=principal.kind, sponsor=principal.sponsor, scopes=scopes)  # fmt: skip


def refuse(request: Request, reason: str, target: str = "-") -> NoReturn:
    """Refuse a request that failed authentication: 401 and audited, or 429 past the
    limit (see the module)."""
    now, guard = time.time(), request.app.state.guard
    address = request.client.host if request.client else "-"
    if guard.limited(address, now):  # neither audited nor counted: a flood stays small
        raise HTTPException(429, "too many failed authentications from this address; "
                            "wait a minute", headers={"Retry-After": "60"})  # fmt: skip
    guard.failed(address, now)
    raise _denied(request, 401, reason, target)


def _refusal(
    found: TokenRow | None,
    principal: PrincipalRow | None,
    parsed: tuple[str, str] | None,
    now: float,
) -> str | None:
    if parsed is None:
        return "send a token: Authorization: Bearer kiln_... (`kiln login URL` stores one)"
    if found is None or not tokens.matches(parsed[1], found.digest):
        return "the token is not valid"
    if found.kind != "access":
        return "an enrolment token is only for POST /api/v1/enrol"
    if found.revoked_at is not None:
        return "the token was revoked"
    if found.expires_at is not None and found.expires_at <= now:
        return "the token has expired"
    if principal is None or principal.disabled:
        return "the token's principal is disabled"
    if principal.expires_at is not None and principal.expires_at <= now:
        return "the token's principal has expired"
    return None


Authenticated = Annotated[Caller, Depends(caller)]


def need(resource: str, verb: str) -> Any:
    """The dependency of a route that needs ``verb`` on ``resource`` (403 otherwise)."""
    if (resource, verb) not in rbac.PERMISSIONS:
        raise ValueError(f"{resource}:{verb} is not a permission of kiln.govern.rbac")

    def check(request: Request, who: Authenticated) -> Caller:
        if not who.may((resource, verb)):
            raise _denied(request, 403, who.refusal((resource, verb)), who.name, who)
        return who

    check.permission = (resource, verb)  # type: ignore[attr-defined]  # read by the route test
    return Depends(check)


def public() -> Any:
    """The marker of a route anyone may call (health, metrics, the document, enrolment)."""

    def anyone() -> None:
        return None

    anyone.permission = ("public", "")  # type: ignore[attr-defined]
    return Depends(anyone)
