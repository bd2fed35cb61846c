"""Principals and tokens: the first admin's enrolment, who am I, users, service accounts
and agents, and tokens. Nobody mints a token or grants a role wider than their own."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Request
from pydantic import BaseModel, Field, StringConstraints
from starlette.exceptions import HTTPException

from kiln.errors import NotFoundError
from kiln.govern import rbac, tokens
from kiln.record.store.base import PrincipalRow, TokenRow
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
    role: rbac.Role | None = None  # None: the caller's own
    principal: PrincipalName | None = None  # None: the caller
    expires_in_s: Seconds = 30 * 86400.0


class Issued(BaseModel):
    """A new token: shown once, never again."""

    token: str
    id: str
    principal: str
    role: str
    expires_at: float | None


class Me(BaseModel):
    name: str
    role: str
    kind: str
    token_id: str | None
    sponsor: str | None


class Principals(BaseModel):
    principals: list[dict[str, Any]]


class Tokens(BaseModel):
    tokens: list[dict[str, Any]]


def _issue(
    principal: str, role: str, name: str | None, expires_in_s: float
) -> tuple[TokenRow, str]:
    token_id, digest, token = tokens.new_token()
    now, lifetime = time.time(), min(expires_in_s, MAX_TOKEN_S)
    row = TokenRow(id=token_id, digest=digest, principal=principal, kind="access", role=role,
                   created_at=now, name=name, expires_at=now + lifetime)  # fmt: skip
    return row, token


def _shown(row: TokenRow, token: str) -> dict[str, Any]:
    return {"token": token, "id": row.id, "principal": row.principal, "role": row.role,
            "expires_at": row.expires_at}  # fmt: skip


def _listed(row: TokenRow) -> dict[str, Any]:
    return {k: v for k, v in asdict(row).items() if k != "digest"}


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
    row, token = _issue(body.name, "admin", "enrolment", MAX_TOKEN_S)
    admin = PrincipalRow(name=body.name, kind="user", role="admin", created_at=time.time(),
                         created_by="enrolment")  # fmt: skip
    if not store.as_actor(body.name).consume_enrolment(found.id, admin, row):
        refuse(request, "the enrolment token was used already")
    return _shown(row, token)


@router.get("/whoami", response_model=Me, dependencies=[need("account", "self")])
def whoami(who: Authenticated) -> Any:
    """The principal and role this request acts as."""
    return {"name": who.name, "role": who.role, "kind": who.kind, "token_id": who.token_id,
            "sponsor": who.sponsor}  # fmt: skip


@router.get("/principals", response_model=Principals,
            dependencies=[need("principals", "admin")])  # fmt: skip
def principals(store: Store) -> Any:
    """Every principal."""
    return {"principals": [asdict(p) for p in store.principals()]}


@router.post("/principals", status_code=201, response_model=Principals,
             dependencies=[need("principals", "admin")])  # fmt: skip
def add_principal(body: NewPrincipal, store: Store, who: Authenticated) -> Any:
    """Add a user, service account or agent, with a role no wider than the caller's. An
    agent needs a sponsor: a user."""
    if not rbac.at_most(body.role, who.role):
        raise HTTPException(403, f"the role {who.role} may not grant {body.role}")
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
    """Disable a principal: its tokens stop working on their next request."""
    if name == who.name:
        raise HTTPException(422, "disable yourself from another admin's account")
    store.disable_principal(name)


@router.get("/tokens", response_model=Tokens, dependencies=[need("account", "self")])
def list_tokens(store: Store, who: Authenticated, all: bool = False) -> Any:
    """The caller's tokens (an admin's ``all=true``: everyone's); never their secrets."""
    if all and not rbac.allows(who.role, "tokens", "admin"):
        raise HTTPException(403, f"the role {who.role} may not list others' tokens")
    found = store.tokens(None if all else who.name)
    return {"tokens": [_listed(t) for t in found if t.kind == "access"]}


@router.post("/tokens", response_model=Issued, status_code=201,
             dependencies=[need("account", "self")])  # fmt: skip
def create_token(body: NewToken, store: Store, who: Authenticated) -> Any:
    """A token for the caller (or, for an admin, for another principal), with a role no
    wider than the caller's nor the principal's."""
    principal = body.principal or who.name
    role = body.role or who.role
    if principal != who.name:
        if not rbac.allows(who.role, "tokens", "admin"):
            raise HTTPException(403, f"the role {who.role} may not mint tokens for others")
        target = store.principal(principal)
        if target is None or target.disabled:
            raise NotFoundError(f"no principal {principal!r}; `kiln users ls` lists them")
        role = body.role or rbac.check_role(target.role)
        if not rbac.at_most(role, rbac.check_role(target.role)):
            raise HTTPException(403, f"{principal} may act as {target.role} at most")
    if not rbac.at_most(role, who.role):
        raise HTTPException(403, f"the role {who.role} may not mint a {role} token")
    row, token = _issue(principal, role, body.name, body.expires_in_s)
    store.add_token(row)
    return _shown(row, token)


@router.delete("/tokens/{token_id}", status_code=204, dependencies=[need("account", "self")])
def revoke(token_id: TokenId, store: Store, who: Authenticated) -> None:
    """Revoke a token of the caller's (an admin: anyone's): refused from its next request."""
    found = store.token(token_id)
    if found is None or found.kind != "access" or (
        found.principal != who.name and not rbac.allows(who.role, "tokens", "admin")
    ):  # fmt: skip
        raise NotFoundError(f"no token {token_id!r} of yours; `kiln tokens ls` lists them")
    store.revoke_token(token_id)
