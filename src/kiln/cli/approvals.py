"""``kiln approvals``: agents' actions waiting for a person, and that person's decision.

Each approval is bound to the exact arguments the agent called with (their SHA-256);
``show`` prints them, so what is approved is what runs. An approval works once, within
the hour after it is given."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from kiln.cli._render import console, fmt_time, plain
from kiln.cli.quotas import _client, _listing

app = typer.Typer(help="Agents' actions waiting for a person's approval.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts and agents.")]
Id = Annotated[
    str, typer.Argument(help="The approval's id or a unique prefix of it (`kiln approvals ls`).")
]
Reason = Annotated[str | None, typer.Option("--reason", help="Why, kept in the audit log.")]
STATUSES = ("pending", "approved", "rejected", "used", "all")


def _args(row: dict[str, Any]) -> str:
    """The arguments in the operation's own order, those left unset left out."""
    given = {k: v for k, v in row["args"].items() if v is not None}
    return json.dumps(given, ensure_ascii=False)


def _resolve(client: Any, given: str) -> str:
    """The id of the one approval whose id starts with ``given`` (4 or more digits)."""
    import re

    from kiln.errors import AmbiguousIdError, NotFoundError, ValidationError

    if not re.fullmatch(r"[0-9a-f]{4,12}", given):
        raise ValidationError("ID", f"{given!r} is not an approval's id",
                              allowed="4 to 12 hex digits (`kiln approvals ls`)")  # fmt: skip
    if len(given) == 12:
        return given
    found = [a["id"] for a in client.call("GET", "/approvals", params={"status": "all"})[
        "approvals"] if a["id"].startswith(given)]  # fmt: skip
    if not found:
        raise NotFoundError(f"no approval {given!r}; `kiln approvals ls` lists them")
    if len(found) > 1:
        raise AmbiguousIdError(given, found, kind="approvals")
    return str(found[0])


@app.command("ls")
def approvals_ls(
    status: Annotated[str, typer.Option(help="pending, approved, rejected, used or all.")] = (
        "pending"
    ),
    as_json: JsonOpt = False,
) -> None:
    """Approval requests of your project, newest first."""
    if status not in STATUSES:
        from kiln.errors import ValidationError

        raise ValidationError("--status", f"{status!r} is not a status", allowed=STATUSES)
    found = _client().call("GET", "/approvals", params={"status": status})["approvals"]
    _listing(found, as_json, f"no {status} approvals" if status != "all" else "no approvals",
             ("id", "agent", "sponsor", "operation", "arguments", "status", "asked"),
             lambda a: (a["id"], plain(a["principal"]), plain(a["sponsor"] or "-"),
                        a["operation"], plain(_args(a)[:120]), a["status"],
                        fmt_time(a["created_at"])))  # fmt: skip


@app.command("show")
def approvals_show(approval_id: Id, as_json: JsonOpt = False) -> None:
    """One request: the operation, its exact arguments and their hash, and its decision."""
    client = _client()
    found = client.call("GET", f"/approvals/{_resolve(client, approval_id)}")["approvals"][0]
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    out = console()
    out.print(plain(f"{found['id']}  {found['operation']} by {found['principal']} "
                    f"(sponsor {found['sponsor'] or '-'}): {found['status']}"))  # fmt: skip
    out.print(plain(json.dumps(found["args"], indent=2, sort_keys=True, ensure_ascii=False)))
    out.print(plain(f"arguments sha256 {found['args_hash']}"))
    if found.get("preview"):
        out.print(plain("would change: " + json.dumps(found["preview"], sort_keys=True)))
    if found["decided_by"]:
        out.print(plain(f"{found['status']} by {found['decided_by']}"
                        + (f": {found['reason']}" if found["reason"] else "")))  # fmt: skip


def _decide(approval_id: str, verb: str, reason: str | None, as_json: bool) -> None:
    client = _client()
    done = client.call("POST", f"/approvals/{_resolve(client, approval_id)}/{verb}",
                       json={"reason": reason})["approvals"][0]  # fmt: skip
    if as_json:
        typer.echo(json.dumps(done, indent=2))
        return
    then = (" the agent's next call with exactly these arguments runs, once, within the hour"
            if verb == "approve" else "")  # fmt: skip
    console().print(plain(f"{done['status']} {done['id']} ({done['operation']} by "
                          f"{done['principal']}){';' if then else ''}{then}"))  # fmt: skip


@app.command("approve")
def approvals_approve(approval_id: Id, reason: Reason = None, as_json: JsonOpt = False) -> None:
    """Approve a pending request (read it first with `kiln approvals show ID`)."""
    _decide(approval_id, "approve", reason, as_json)


@app.command("reject")
def approvals_reject(approval_id: Id, reason: Reason = None, as_json: JsonOpt = False) -> None:
    """Reject a pending request."""
    _decide(approval_id, "reject", reason, as_json)
