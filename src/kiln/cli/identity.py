"""``kiln login``, ``kiln users``, ``kiln tokens`` and ``kiln projects``: who may use a
team server, and in which project."""

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
projects_app = typer.Typer(help="Projects of a team server (tenants) and their members.",
                           no_args_is_help=True)  # fmt: skip
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
        raise ConfigError("KILN_SERVER", "is not set: which server? `export KILN_SERVER=URL` "
                          "(and `kiln login URL` once, for a token)")  # fmt: skip
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
    console().print(plain(f"logged in to {checked} as {me['name']} ({me['role']} in project "
                          f"{me['project']}); the token is in {path}"))  # fmt: skip


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="The principal's name.")],
    kind: Annotated[str, typer.Option(help="user, service or agent.")] = "user",
    role: Annotated[str, typer.Option(help="viewer, member, approver or admin.")] = "member",
    sponsor: Annotated[str | None, typer.Option(help="An agent's sponsor (a user).")] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option(
            help="An agent's scope: a permission such as runs:read (repeat); none: all its role "
            "allows."
        ),
    ] = None,
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
    """The principals of your project, with their role in it."""
    found = _client().call("GET", "/principals")["principals"]
    if as_json:
        typer.echo(json.dumps(found))
        return
    for p in found:
        state = " (disabled)" if p["disabled"] else ""
        sponsor = f" sponsored by {p['sponsor']}" if p["sponsor"] else ""
        scopes = f" scopes {','.join(p['scopes'])}" if p.get("scopes") is not None else ""
        console().print(
            plain(f"{p['name']}  {p['kind']}  {p['project_role']}{sponsor}{scopes}{state}")
        )


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
    project: Annotated[
        str | None, typer.Option(help="The project it acts in (default: your token's).")
    ] = None,
    expires: Annotated[str, typer.Option(help="Lifetime, e.g. 30d (a year at most).")] = "30d",
    as_json: JsonOpt = False,
) -> None:
    """Mint a token, no wider than your own rights; it is shown once."""
    body = {"name": name, "role": role, "principal": principal, "project": project,
            "expires_in_s": duration(expires, "--expires")}  # fmt: skip
    done = _client().call("POST", "/tokens", json=body)
    if as_json:
        typer.echo(json.dumps(done))
    else:
        console().print(plain(f"token {done['id']} for {done['principal']} ({done['role']} in "
                              f"project {done['project']}), shown once:"))  # fmt: skip
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


@projects_app.command("ls")
def projects_ls(as_json: JsonOpt = False) -> None:
    """The projects you are a member of."""
    found = _client().call("GET", "/projects")["projects"]
    if as_json:
        typer.echo(json.dumps(found))
        return
    for name in found:
        console().print(plain(name))


@projects_app.command("create")
def projects_create(
    name: Annotated[str, typer.Argument(help="The project's name.")], as_json: JsonOpt = False
) -> None:
    """Add a project (admins of the default project); you are its first admin, and get a
    token of it, shown once."""
    done = _client().call("POST", "/projects", json={"name": name})
    if as_json:
        typer.echo(json.dumps(done))
        return
    console().print(plain(f"project {done['name']} is added, with you as its admin"))
    if done["token"]:
        console().print(plain(f"an admin token of {done['name']}, shown once (`kiln login URL "
                              "--token` keeps it):"))  # fmt: skip
        typer.echo(done["token"]["token"])


@projects_app.command("members")
def projects_members(
    name: Annotated[str, typer.Argument(help="Your token's project.")], as_json: JsonOpt = False
) -> None:
    """A project's members and their roles (its admins)."""
    found = _client().call("GET", f"/projects/{name}/members")["members"]
    if as_json:
        typer.echo(json.dumps(found))
        return
    for m in found:
        console().print(plain(f"{m['principal']}  {m['role']}"))


@projects_app.command("add-member")
def projects_add_member(
    name: Annotated[str, typer.Argument(help="Your token's project.")],
    principal: Annotated[str, typer.Argument(help="An existing principal.")],
    role: Annotated[str, typer.Option(help="viewer, member, approver or admin.")] = "member",
) -> None:
    """Give a principal a role in the project, no wider than yours (its admins)."""
    _client().call("PUT", f"/projects/{name}/members/{principal}", json={"role": role})
    console().print(plain(f"{principal} is a {role} of {name}"))


@projects_app.command("remove-member")
def projects_remove_member(
    name: Annotated[str, typer.Argument(help="Your token's project.")],
    principal: Annotated[str, typer.Argument(help="A member.")],
) -> None:
    """Remove a principal from the project: its tokens of the project stop working."""
    _client().call("DELETE", f"/projects/{name}/members/{principal}")
    console().print(plain(f"{principal} is no longer a member of {name}"))
