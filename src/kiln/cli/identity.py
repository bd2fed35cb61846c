"""``kiln login``, ``kiln users`` and ``kiln tokens``: who may use a team server."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import typer

from kiln.cli._render import console, plain
from kiln.config import Settings, save_server_token, server_token, server_url
from kiln.errors import ConfigError, ValidationError

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts and agents.")]
users_app = typer.Typer(help="Principals of a team server: users, service accounts, agents.",
                        no_args_is_help=True)  # fmt: skip
tokens_app = typer.Typer(help="Tokens for a team server.", no_args_is_help=True)
_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str, field: str) -> float:
    """``30d``, ``12h``, ``90m``... in seconds."""
    found = _DURATION.fullmatch(text.strip())
    if found is None or int(found.group(1)) == 0:
        raise ValidationError(field, f"{text!r} is not a duration", allowed="e.g. 30d, 12h, 90m")
    return int(found.group(1)) * _UNIT[found.group(2)]


def _client(url: str | None = None, token: str | None = None) -> Any:
    from kiln.record.store.http import Client

    settings = Settings.from_env()
    url = url or settings.server_url
    if not url:
        raise ConfigError("KILN_SERVER", "is not set: which server? (`kiln login URL` first)")
    token = token or server_token(url)
    if not token:
        raise ConfigError("KILN_TOKEN", f"no token for {url}: run `kiln login {url}`")
    return Client(url, actor="", token=token)


def login(
    url: Annotated[str, typer.Argument(help="The server, e.g. https://kiln.example.com")],
    enrol: Annotated[
        str | None, typer.Option("--enrol", help="The one-time token a new server printed.")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="With --enrol: the first admin's name.")
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="A token (else read from the terminal).")
    ] = None,
) -> None:
    """Store a token for a team server (or enrol its first admin).

    The token is checked first, then kept in your config folder (mode 0600)."""
    from kiln.record.store.http import Client

    checked = server_url(url)
    assert checked is not None  # noqa: S101  url is given
    if enrol is not None:
        if not name:
            raise ValidationError("--name", "enrolling needs the first admin's name")
        issued = Client(checked, actor="", token=enrol).call("POST", "/enrol", json={"name": name})
        token = str(issued["token"])
    elif token is None:
        token = typer.prompt("token", hide_input=True).strip()
    me = Client(checked, actor="", token=token).call("GET", "/whoami")
    path = save_server_token(checked, token)
    console().print(plain(f"logged in to {checked} as {me['name']} ({me['role']}); the token "
                          f"is in {path}"))  # fmt: skip


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="The principal's name.")],
    kind: Annotated[str, typer.Option(help="user, service or agent.")] = "user",
    role: Annotated[str, typer.Option(help="viewer, member, approver or admin.")] = "member",
    sponsor: Annotated[str | None, typer.Option(help="An agent's sponsor (a user).")] = None,
    scope: Annotated[list[str] | None, typer.Option(help="An agent's scope (repeat).")] = None,
    budget: Annotated[float | None, typer.Option(help="An agent's budget.")] = None,
    expires: Annotated[str | None, typer.Option(help="Expiry, e.g. 30d.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a user, a service account (CI, endpoints) or an agent."""
    body = {"name": name, "kind": kind, "role": role, "sponsor": sponsor, "scopes": scope,
            "budget": budget,
            "expires_in_s": duration(expires, "--expires") if expires else None}  # fmt: skip
    done = _client().call("POST", "/principals", json=body)["principals"][0]
    if as_json:
        typer.echo(json.dumps(done))
    else:
        hint = f"`kiln tokens create --principal {done['name']}` gives it a token"
        console().print(plain(f"added {done['kind']} {done['name']} ({done['role']}); {hint}"))


@users_app.command("ls")
def users_ls(as_json: JsonOpt = False) -> None:
    """Every principal."""
    found = _client().call("GET", "/principals")["principals"]
    if as_json:
        typer.echo(json.dumps(found))
        return
    for p in found:
        state = " (disabled)" if p["disabled"] else ""
        sponsor = f" sponsored by {p['sponsor']}" if p["sponsor"] else ""
        console().print(plain(f"{p['name']}  {p['kind']}  {p['role']}{sponsor}{state}"))


@users_app.command("disable")
def users_disable(name: Annotated[str, typer.Argument(help="The principal to disable.")]) -> None:
    """Disable a principal: its tokens stop working on their next request."""
    _client().call("POST", f"/principals/{name}/disable")
    console().print(plain(f"{name} is disabled"))


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str | None, typer.Option(help="What the token is for.")] = None,
    role: Annotated[str | None, typer.Option(help="Its role (default: yours).")] = None,
    principal: Annotated[str | None, typer.Option(help="Whose (admins; default: yours).")] = None,
    expires: Annotated[str, typer.Option(help="Lifetime, e.g. 30d (a year at most).")] = "30d",
    as_json: JsonOpt = False,
) -> None:
    """Mint a token, no wider than your own rights; it is shown once."""
    body = {"name": name, "role": role, "principal": principal,
            "expires_in_s": duration(expires, "--expires")}  # fmt: skip
    done = _client().call("POST", "/tokens", json=body)
    if as_json:
        typer.echo(json.dumps(done))
    else:
        console().print(plain(f"token {done['id']} for {done['principal']} ({done['role']}), "
                              "shown once:"))  # fmt: skip
        typer.echo(done["token"])


@tokens_app.command("ls")
def tokens_ls(
    everyone: Annotated[bool, typer.Option("--all", help="Everyone's (admins).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Your tokens (never their secrets)."""
    found = _client().call("GET", "/tokens", params={"all": everyone})["tokens"]
    if as_json:
        typer.echo(json.dumps(found))
        return
    for t in found:
        state = "revoked" if t["revoked_at"] else "live"
        console().print(plain(f"{t['id']}  {t['principal']}  {t['role']}  {t['name'] or '-'}  "
                              f"{state}"))  # fmt: skip


@tokens_app.command("revoke")
def tokens_revoke(token_id: Annotated[str, typer.Argument(help="The token's id.")]) -> None:
    """Revoke a token: refused from its next request."""
    _client().call("DELETE", f"/tokens/{token_id}")
    console().print(plain(f"token {token_id} is revoked"))
