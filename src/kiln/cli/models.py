"""``kiln models ls|show|history|promote|rollback``: the model registry."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from kiln.cli._render import console, fmt_time, fmt_value, reader
from kiln.config import Settings

if TYPE_CHECKING:
    from kiln.registry.models import AliasMove, Models

app = typer.Typer(help="Registered models, their versions and aliases.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts and agents.")]


def _models() -> Models:
    from kiln.record.recorder import recorder_for
    from kiln.registry.models import Models

    settings = Settings.from_env()
    return Models(recorder_for(settings, create=False).store, app="cli", actor=settings.actor)


@app.command("ls")
def ls(as_json: JsonOpt = False) -> None:
    """Every model with its latest version and its aliases."""
    models = _models()
    rows: list[dict[str, Any]] = []
    for name in models.names():
        versions = models.versions(name)
        rows.append({"name": name, "versions": len(versions), "latest": versions[-1].version,
                     "aliases": models.aliases(name)})  # fmt: skip
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(header_style="bold", show_edge=False)
    for col in ("model", "versions", "latest", "aliases"):
        table.add_column(col)
    for r in rows:
        aliases = " ".join(f"{a}->{v}" for a, v in r["aliases"].items())
        table.add_row(str(r["name"]), str(r["versions"]), str(r["latest"]), aliases)
    console().print(table)


@app.command("show")
def show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME@ALIAS.")],
    as_json: JsonOpt = False,
) -> None:
    """A model's versions (run, artifact, metrics) and aliases; or one version."""
    models = _models()
    if ":" in ref or "@" in ref:
        versions = [models.get(ref)]
        name = versions[0].name
    else:
        name, versions = ref, models.versions(ref)
    aliases = models.aliases(name)
    if as_json:
        typer.echo(json.dumps({"name": name, "aliases": aliases,
                               "versions": [asdict(v) for v in versions]}, indent=2))  # fmt: skip
        return
    table = Table(header_style="bold", show_edge=False, title=name)
    for col in ("version", "aliases", "run", "artifact", "metrics", "made from", "registered"):
        table.add_column(col)
    store = reader().store
    for v in versions:
        held = " ".join(a for a, n in aliases.items() if n == v.version)
        metrics = " ".join(f"{k}={fmt_value(x)}" for k, x in v.metrics.items())
        graph = store.lineage(v.run_id)  # what the version's run read, and who made that
        inputs = [graph.label(sha) for sha in graph.upstream(v.run_id)]
        table.add_row(str(v.version), held, v.run_id[:8], f"{v.artifact} {v.artifact_sha256[:12]}",
                      metrics, "\n".join(inputs) or "-",
                      f"{fmt_time(v.created_at)} by {v.created_by}")  # fmt: skip
    console().print(table)
    console().print(f"the whole lineage of a version: kiln lineage {versions[-1].run_id[:8]}")


@app.command("history")
def history(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str | None, typer.Option(help="Only this alias.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every move of the model's aliases: who, when, from which version to which, why."""
    moves = _models().history(name, alias)
    if as_json:
        typer.echo(json.dumps([asdict(m) for m in moves], indent=2))
        return
    console().print(history_table(moves))


def history_table(moves: list[AliasMove]) -> Table:
    table = Table(header_style="bold", show_edge=False)
    for col in ("when", "alias", "from", "to", "who", "reason"):
        table.add_column(col)
    for m in moves:
        before = "-" if m.from_version is None else str(m.from_version)
        table.add_row(fmt_time(m.at), m.alias, before, str(m.to_version), m.actor, m.reason or "")
    return table


@app.command("promote")
def promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="The version to promote.")],
    alias: Annotated[str, typer.Option(help="The alias to move.")] = "production",
    reason: Annotated[str | None, typer.Option(help="Why, for the history.")] = None,
) -> None:
    """Point NAME@ALIAS at VERSION (checked against the alias's policy, if it has one)."""
    from kiln.registry.models import AliasMove

    done = _models().promote(name, version, alias=alias, reason=reason)
    if isinstance(done, AliasMove):
        console().print(f"{name}@{alias}: {done.from_version or '-'} -> {done.to_version}")
    else:
        console().print(f"request {done.id}: {name}:{version} -> {name}@{alias} waits for "
                        f"{done.needed} approval(s): kiln models approve {done.id}")  # fmt: skip


@app.command("rollback")
def rollback(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Option(help="The alias to move back.")] = "production",
    reason: Annotated[str | None, typer.Option(help="Why, for the history.")] = None,
) -> None:
    """Move NAME@ALIAS back to the version it held before its current one."""
    move = _models().rollback(name, alias, reason=reason)
    console().print(f"{name}@{alias}: {move.from_version} -> {move.to_version} (rolled back)")


@app.command("requests")
def requests(
    all_: Annotated[bool, typer.Option("--all", help="Decided requests too.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Promotion requests waiting for approval (or all of them)."""
    found = _models().requests(status=None if all_ else "pending")
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in found], indent=2))
        return
    table = Table(header_style="bold", show_edge=False)
    for col in ("request", "promotion", "status", "approvals", "requested"):
        table.add_column(col)
    for r in found:
        table.add_row(r.id, f"{r.name}:{r.version} -> @{r.alias}", r.status,
                      f"{len(r.approvals)}/{r.needed} {' '.join(r.approvals)}",
                      f"{fmt_time(r.requested_at)} by {r.requested_by}")  # fmt: skip
    console().print(table)


@app.command("approve")
def approve(request_id: Annotated[str, typer.Argument(help="The request's id.")]) -> None:
    """Approve a request as KILN_ACTOR; the last approval needed moves the alias."""
    done = _models().approve(request_id)
    console().print(f"request {done.id}: {done.status} ({len(done.approvals)}/{done.needed})")


@app.command("reject")
def reject(
    request_id: Annotated[str, typer.Argument(help="The request's id.")],
    reason: Annotated[str | None, typer.Option(help="Why, for the audit log.")] = None,
) -> None:
    """Turn a pending request down."""
    done = _models().reject(request_id, reason=reason)
    console().print(f"request {done.id}: {done.status}")
