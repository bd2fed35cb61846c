"""Principals and tokens: the first admin's enrolment, who am I, users, service accounts
and agents, and tokens. Nobody mints a token or grants a role wider than their own."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Request
from pydantic import BaseModel, Field, StringConstraints
from starlette.exceptions import HTTPException

from kiln.config import DEFAULT_PROJECT
from kiln.errors import NotFoundError, ValidationError
from kiln.govern import rbac, tokens
from kiln.record.store.base import MemberRow, PrincipalRow, TokenRow
from kiln.server import schemas
from kiln.server.auth import Authenticated, need, public, refuse
from kiln.server.deps import Store

router = APIRouter(prefix="/api/v1", tags=["identity"])
PrincipalName = Annotated[str, StringConstraints(pattern=schemas.NAME_PATTERN)]
TokenId = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$")]
Seconds = Annotated[float, Field(gt=0, le=10 * 365 * 86400)]
MAX_TOKEN_S = 365 * 86400.0  # a token lives a year at most


class Enrol(schemas.Strict):
    name: PrincipalName


class NewPrincipal(schemas.Strict):
    name: PrincipalName
    kind: Literal["user", "service", "agent"] = "user"
    role: rbac.Role = "member"
    sponsor: PrincipalName | None = None
    scopes: list[Annotated[str, StringConstraints(max_length=100)]] | None = None
    budget: Annotated[float, Field(ge=0)] | None = None
    expires_in_s: Seconds | None = None


class NewToken(schemas.Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    role: rbac.Role | None = None  # None: the widest it may have
    principal: PrincipalName | None = None  # None: the caller
    project: PrincipalName | None = None  # None: the caller's token's
    expires_in_s: Seconds = 30 * 86400.0


class NewProject(schemas.Strict):
    name: PrincipalName


class Membership(schemas.Strict):
    role: rbac.Role


class Projects(BaseModel):
    projects: list[str]


class NewProjectOut(BaseModel):
    name: str
    token: Issued | None  # its first admin's, the caller's (None without authentication)


class Members(BaseModel):
    members: list[dict[str, Any]]


class Issued(BaseModel):
    """A new token: shown once, never again."""

    token: str
    id: str
    principal: str
    role: str
    project: str
    expires_at: float | None


class Me(BaseModel):
    name: str
    role: str
    project: str
    kind: str
    token_id: str | None
    sponsor: str | None


class Principals(BaseModel):
    principals: list[dict[str, Any]]


class Tokens(BaseModel):
    tokens: list[dict[str, Any]]


def _issue(
    principal: str, role: str, name: str | None, expires_in_s: float,
    project: str = DEFAULT_PROJECT,
) -> tuple[TokenRow, str]:  # fmt: skip
    token_id, digest, token = tokens.new_token()
    now, lifetime = time.time(), min(expires_in_s, MAX_TOKEN_S)
    row = TokenRow(id=token_id, digest=digest, principal=principal, kind="access", role=role,
                   created_at=now, name=name, expires_at=now + lifetime,
                   project=project)  # fmt: skip
    return row, token


def _shown(row: TokenRow, token: str) -> dict[str, Any]:
    return {"token": token, "id": row.id, "principal": row.principal, "role": row.role,
            "project": row.project, "expires_at": row.expires_at}  # fmt: skip


def _listed(row: TokenRow) -> dict[str, Any]:
    return {k: v for k, v in asdict(row).items() if k != "digest"}


class Handoff(schemas.Strict):
    code: Annotated[str, StringConstraints(min_length=16, max_length=64)]


class Handed(BaseModel):
    token: str


@router.post("/handoff", response_model=Handed, dependencies=[public()])
def handoff(body: Handoff, request: Request) -> Any:
    """The token behind a one-time code (``kiln ui`` opens the dashboard with a code, so
    that no token is on a command line); a code works once."""
    token = request.app.state.handoffs.pop(body.code, None)
    if token is None:
        refuse(request, "this sign-in link was used already or is not this server's; "
               "start `kiln ui` again, or sign in with a token")  # fmt: skip
    return {"token": token}


@router.post("/enrol", response_model=Issued, status_code=201, dependencies=[public()])
def enrol(
    body: Enrol,
    request: Request,
    authorization: Annotated[str | None, Header(max_length=200)] = None,
) -> Any:
    """Exchange the one-time enrolment token a new server printed for the first admin's
    principal and token."""
    store = request.app.state.store
    scheme, _, presented = (authorization or "").partition(" ")
    parsed = tokens.parse(presented.strip()) if scheme.lower() == "bearer" else None
    found = None if parsed is None else store.token(parsed[0])
    if parsed is None or found is None or found.kind != "enrol" or not tokens.matches(
        parsed[1], found.digest
    ):  # fmt: skip
        refuse(request, "not an enrolment token of this server")
    if store.principals():  # the first admin exists (`kiln ui` made one): no other
        if found.revoked_at is None:
            store.revoke_token(found.id)
        refuse(request, "this server has its first admin already")
    row, token = _issue(body.name, "admin", "enrolment", MAX_TOKEN_S)
    admin = PrincipalRow(name=body.name, kind="user", role="admin", created_at=time.time(),
                         created_by="enrolment")  # fmt: skip
    if not store.as_actor(body.name).consume_enrolment(found.id, admin, row):
        refuse(request, "the enrolment token was used already")
    return _shown(row, token)


@router.get("/whoami", response_model=Me, dependencies=[need("account", "self")])
def whoami(who: Authenticated) -> Any:
    """The principal and role this request acts as."""
    return {"name": who.name, "role": who.role, "project": who.project, "kind": who.kind,
            "token_id": who.token_id, "sponsor": who.sponsor}  # fmt: skip


@router.get("/principals", response_model=Principals,
            dependencies=[need("principals", "admin")])  # fmt: skip
def principals(store: Store, who: Authenticated) -> Any:
    """The principals of the caller's project, each with its role there."""
    roles = {m.principal: m.role for m in store.members(who.project)}
    return {"principals": [{**asdict(p), "project_role": roles[p.name]}
                           for p in store.principals() if p.name in roles]}  # fmt: skip


@router.post("/principals", status_code=201, response_model=Principals,
             dependencies=[need("principals", "admin")])  # fmt: skip
def add_principal(body: NewPrincipal, store: Store, who: Authenticated) -> Any:
    """Add a user, service account or agent, with a role no wider than the caller's. An
    agent needs a sponsor: a user."""
    if not rbac.at_most(body.role, who.role):
        raise HTTPException(403, f"the role {who.role} may not grant {body.role}")
    for scope in body.scopes or ():
        if tuple(scope.partition(":")[::2]) not in rbac.PERMISSIONS:
            raise ValidationError("scopes", f"{scope!r} is not a permission", allowed=", ".join(
                sorted(f"{r}:{v}" for r, v in rbac.PERMISSIONS)))  # fmt: skip
    if body.kind == "agent":
        sponsor = store.principal(body.sponsor) if body.sponsor else None
        if sponsor is None or sponsor.kind != "user":
            raise HTTPException(422, "an agent needs a sponsor: an existing user")
    elif body.sponsor is not None:
        raise HTTPException(422, "only an agent has a sponsor")
    now = time.time()
    row = PrincipalRow(
        name=body.name, kind=body.kind, role=body.role, created_at=now, created_by=store.actor,
        sponsor=body.sponsor, scopes=body.scopes, budget=body.budget,
        expires_at=now + body.expires_in_s if body.expires_in_s else None,
    )  # fmt: skip
    store.add_principal(row)
    return {"principals": [asdict(row)]}


@router.post("/principals/{name}/disable", status_code=204,
             dependencies=[need("principals", "admin")])  # fmt: skip
def disable(name: Annotated[str, Path(pattern=schemas.NAME_PATTERN)], store: Store,
            who: Authenticated) -> None:  # fmt: skip
    """Disable a principal, in every project: its tokens stop working on their next
    request. Only an admin of the default project (the server's admins) may."""
    if who.project != DEFAULT_PROJECT:
        raise HTTPException(403, "only an admin of the default project disables principals; "
                            "remove them from this project instead")  # fmt: skip
    if name == who.name:
        raise HTTPException(422, "disable yourself from another admin's account")
    store.disable_principal(name)


@router.get("/tokens", response_model=Tokens, dependencies=[need("account", "self")])
def list_tokens(store: Store, who: Authenticated, all: bool = False) -> Any:
    """The caller's tokens of this project (an admin's ``all=true``: everyone's); never
    their secrets."""
    if all and not who.may(("tokens", "admin")):
        raise HTTPException(403, f"the role {who.role} may not list others' tokens")
    found = store.tokens(None if all else who.name)
    return {
        "tokens": [_listed(t) for t in found if t.kind == "access" and t.project == who.project]
    }


@router.post("/tokens", response_model=Issued, status_code=201,
             dependencies=[need("account", "self")])  # fmt: skip
def create_token(body: NewToken, store: Store, who: Authenticated) -> Any:
    """A token for the caller (or, for an admin, for another principal) in the caller's
    project (or, for an admin token, in another project the caller is a member of),
    with a role no wider than the caller's there nor the principal's."""
    principal = body.principal or who.name
    project = body.project or who.project
    ceiling = who.role
    if project != who.project:
        if not who.may(("tokens", "admin")):
            raise HTTPException(403, f"a {who.role} token mints tokens of its own project only")
        mine = store.member(project, who.name)
        if mine is None:
            raise NotFoundError(f"no project {project!r} of yours; `kiln projects ls` lists them")
        ceiling = rbac.narrowest(mine.role, who.role)
    if principal != who.name and not (
        rbac.allows(ceiling, "tokens", "admin") and who.may(("tokens", "admin"))
    ):
        raise HTTPException(403, f"the role {ceiling} may not mint tokens for others")
    target = store.principal(principal)
    member = store.member(project, principal)
    if target is None or target.disabled or member is None:
        raise NotFoundError(f"no principal {principal!r} in project {project}; `kiln users "
                            "ls` lists them")  # fmt: skip
    widest = rbac.narrowest(target.role, member.role)
    role = body.role or rbac.narrowest(widest, ceiling)
    if not rbac.at_most(role, widest):
        raise HTTPException(403, f"{principal} may act as {widest} at most in {project}")
    if not rbac.at_most(role, ceiling):
        raise HTTPException(403, f"the role {ceiling} may not mint a {role} token")
    row, token = _issue(principal, role, body.name, body.expires_in_s, project)
    store.add_token(row)
    return _shown(row, token)


@router.delete("/tokens/{token_id}", status_code=204, dependencies=[need("account", "self")])
def revoke(token_id: TokenId, store: Store, who: Authenticated) -> None:
    """Revoke a token of the caller's (an admin: anyone's): refused from its next request."""
    found = store.token(token_id)
    if found is None or found.kind != "access" or found.project != who.project or (
        found.principal != who.name and not who.may(("tokens", "admin"))
    ):  # fmt: skip
        raise NotFoundError(f"no token {token_id!r} of yours; `kiln tokens ls` lists them")
    store.revoke_token(token_id)


# -- projects and their members ------------------------------------------------------


@router.get("/projects", response_model=Projects, dependencies=[need("account", "self")])
def list_projects(store: Store, who: Authenticated) -> Any:
    """The projects the caller is a member of (without authentication: all)."""
    return {"projects": store.projects(who.name or None)}


@router.post("/projects", response_model=NewProjectOut, status_code=201,
             dependencies=[need("projects", "create")])  # fmt: skip
def create_project(body: NewProject, store: Store, who: Authenticated) -> Any:
    """Add a project, the caller its first admin, with an admin token of it for the
    caller (shown once). Only an admin of the default project (the server's) may."""
    if who.project != DEFAULT_PROJECT:
        raise HTTPException(403, "only an admin of the default project creates projects")
    store.add_project(body.name, who.name or store.actor)
    if not who.name:
        return {"name": body.name, "token": None}
    row, token = _issue(who.name, "admin", f"{body.name} admin", 30 * 86400.0, body.name)
    store.add_token(row)
    return {"name": body.name, "token": _shown(row, token)}


def _own_project(name: str, who: Authenticated) -> None:
    """404 for a project other than the caller's: to a project, others do not exist."""
    if name != who.project:
        raise NotFoundError(f"no project {name!r}; a token acts in its own project only")


@router.get("/projects/{name}/members", response_model=Members,
            dependencies=[need("principals", "admin")])  # fmt: skip
def members(name: Annotated[str, Path(pattern=schemas.NAME_PATTERN)], store: Store,
            who: Authenticated) -> Any:  # fmt: skip
    """The project's members and their roles."""
    _own_project(name, who)
    return {"members": [asdict(m) for m in store.members(name)]}


@router.put("/projects/{name}/members/{principal}", response_model=Members,
            dependencies=[need("principals", "admin")])  # fmt: skip
def set_member(
    name: Annotated[str, Path(pattern=schemas.NAME_PATTERN)],
    principal: Annotated[str, Path(pattern=schemas.NAME_PATTERN)],
    body: Membership, store: Store, who: Authenticated,
) -> Any:  # fmt: skip
    """Give an existing principal a role in the project: no wider than the caller's nor
    the principal's own ceiling."""
    _own_project(name, who)
    target = store.principal(principal)
    if target is None:
        raise NotFoundError(f"no principal {principal!r}; `kiln users add` adds one")
    if not rbac.at_most(body.role, who.role):
        raise HTTPException(403, f"the role {who.role} may not grant {body.role}")
    if not rbac.at_most(body.role, rbac.check_role(target.role)):
        raise HTTPException(403, f"{principal} may act as {target.role} at most")
    if principal == who.name:
        raise HTTPException(422, "change your own role from another admin's account")
    row = MemberRow(name, principal, body.role, time.time(), store.actor)
    store.set_member(row)
    return {"members": [asdict(row)]}


@router.delete("/projects/{name}/members/{principal}", status_code=204,
               dependencies=[need("principals", "admin")])  # fmt: skip
def remove_member(
    name: Annotated[str, Path(pattern=schemas.NAME_PATTERN)],
    principal: Annotated[str, Path(pattern=schemas.NAME_PATTERN)],
    store: Store, who: Authenticated,
) -> None:  # fmt: skip
    """Remove a principal from the project: its tokens of the project stop working."""
    _own_project(name, who)
    if principal == who.name:
        raise HTTPException(422, "leave a project from another admin's account")
    store.remove_member(name, principal)
