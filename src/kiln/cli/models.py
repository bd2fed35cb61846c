"""``kiln models ls|show|history|promote|rollback``: the model registry."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from kiln.cli._render import console, fmt_time, fmt_value
from kiln.config import Settings

if TYPE_CHECKING:
    from kiln.registry.models import Models

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
    for col in ("version", "aliases", "run", "artifact", "metrics", "registered"):
        table.add_column(col)
    for v in versions:
        held = " ".join(a for a, n in aliases.items() if n == v.version)
        metrics = " ".join(f"{k}={fmt_value(x)}" for k, x in v.metrics.items())
        table.add_row(str(v.version), held, v.run_id[:8], f"{v.artifact} {v.artifact_sha256[:12]}",
                      metrics, f"{fmt_time(v.created_at)} by {v.created_by}")  # fmt: skip
    console().print(table)
    console().print(f"lineage of a version: kiln lineage {versions[-1].run_id[:8]}")


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
    table = Table(header_style="bold", show_edge=False)
    for col in ("when", "alias", "from", "to", "who", "reason"):
        table.add_column(col)
    for m in moves:
        before = "-" if m.from_version is None else str(m.from_version)
        table.add_row(fmt_time(m.at), m.alias, before, str(m.to_version), m.actor, m.reason or "")
    console().print(table)


@app.command("promote")
def promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="The version to promote.")],
    alias: Annotated[str, typer.Option(help="The alias to move.")] = "production",
    reason: Annotated[str | None, typer.Option(help="Why, for the history.")] = None,
) -> None:
    """Point NAME@ALIAS at VERSION (checked against the alias's policy, if it has one)."""
    move = _models().promote(name, version, alias=alias, reason=reason)
    console().print(f"{name}@{alias}: {move.from_version or '-'} -> {move.to_version}")


@app.command("rollback")
def rollback(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Option(help="The alias to move back.")] = "production",
    reason: Annotated[str | None, typer.Option(help="Why, for the history.")] = None,
) -> None:
    """Move NAME@ALIAS back to the version it held before its current one."""
    move = _models().rollback(name, alias, reason=reason)
    console().print(f"{name}@{alias}: {move.from_version} -> {move.to_version} (rolled back)")
