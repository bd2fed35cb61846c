"""``kiln models ls|show|history|promote|rollback``: the model registry."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from kiln.cli._render import console, fmt_time, fmt_value, plain, reader
from kiln.config import Settings
from kiln.errors import ValidationError

if TYPE_CHECKING:
    from kiln.registry.models import AliasMove, RegistryStore

app = typer.Typer(help="Registered models, their versions and aliases.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts and agents.")]


def _models(app_name: str = "cli") -> RegistryStore:
    from kiln.record.recorder import recorder_for
    from kiln.registry.models import models_for

    settings = Settings.from_env()
    return models_for(
        recorder_for(settings, create=False).store, app=app_name, actor=settings.actor
    )


@app.command("register")
def register(
    name: Annotated[str, typer.Argument(help="Model name.")],
    run_id: Annotated[str, typer.Argument(help="The run: its id or a unique prefix of it.")],
    artifact: Annotated[
        str, typer.Option("--artifact", "-a", help="The run's artifact to register: model.pkl.")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Register a succeeded run's artifact as the next version of model NAME."""
    record = reader().store.get_run(run_id)
    # The model belongs to the run's app, as app.models.register in that app would make it.
    version = _models(record.app).register(name, record.id, artifact=artifact)
    if as_json:
        typer.echo(json.dumps(asdict(version), indent=2))
        return
    made_from = f"run {record.id[:8]} ({version.artifact}, sha256 {version.artifact_sha256[:16]})"
    console().print(plain(f"registered {version.ref} from {made_from}"))


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
        table.add_row(plain(r["name"]), str(r["versions"]), str(r["latest"]), plain(aliases))
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
    table = Table(header_style="bold", show_edge=False, title=plain(name))
    for col in ("version", "aliases", "run", "artifact", "metrics", "made from", "registered"):
        table.add_column(col)
    store = reader().store
    for v in versions:
        held = " ".join(a for a, n in aliases.items() if n == v.version)
        metrics = " ".join(f"{k}={fmt_value(x)}" for k, x in v.metrics.items())
        graph = store.lineage(v.run_id)  # what the version's run read, and who made that
        inputs = [graph.label(sha) for sha in graph.upstream(v.run_id)]
        table.add_row(str(v.version), plain(held), v.run_id[:8],
                      plain(f"{v.artifact} {v.artifact_sha256[:12]}"),
                      plain(metrics), plain("\n".join(inputs) or "-"),
                      f"{fmt_time(v.created_at)} by {v.created_by}")  # fmt: skip
    console().print(table)
    console().print(
        plain(f"the whole lineage of a version: kiln lineage {versions[-1].run_id[:8]}")
    )


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
        cells = (m.alias, before, str(m.to_version), m.actor, m.reason or "")
        table.add_row(fmt_time(m.at), *map(plain, cells))
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
        console().print(plain(f"{name}@{alias}: {done.from_version or '-'} -> {done.to_version}"))
    else:
        waits = f"waits for {done.needed} approval(s): kiln models approve {done.id[:8]}"
        console().print(plain(f"request {done.id}: {name}:{version} -> {name}@{alias} {waits}"))


@app.command("rollback")
def rollback(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Option(help="The alias to move back.")] = "production",
    reason: Annotated[str | None, typer.Option(help="Why, for the history.")] = None,
) -> None:
    """Move NAME@ALIAS back to the version it held before its current one."""
    move = _models().rollback(name, alias, reason=reason)
    console().print(
        plain(f"{name}@{alias}: {move.from_version} -> {move.to_version} (rolled back)")
    )


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
        table.add_row(r.id, plain(f"{r.name}:{r.version} -> @{r.alias}"), r.status,
                      plain(f"{len(r.approvals)}/{r.needed} {' '.join(r.approvals)}"),
                      plain(f"{fmt_time(r.requested_at)} by {r.requested_by}"))  # fmt: skip
    console().print(table)


@app.command("approve")
def approve(
    request_id: Annotated[str, typer.Argument(help="The request's id or a unique prefix of it.")],
) -> None:
    """Approve a request as KILN_ACTOR; the last approval needed moves the alias."""
    done = _models().approve(request_id)
    console().print(
        plain(f"request {done.id}: {done.status} ({len(done.approvals)}/{done.needed})")
    )


@app.command("reject")
def reject(
    request_id: Annotated[str, typer.Argument(help="The request's id or a unique prefix of it.")],
    reason: Annotated[str | None, typer.Option(help="Why, for the audit log.")] = None,
) -> None:
    """Turn a pending request down."""
    done = _models().reject(request_id, reason=reason)
    console().print(plain(f"request {done.id}: {done.status}"))


policy_app = typer.Typer(help="Show or set the promotion policy of an alias.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")


@policy_app.command("show")
def policy_show(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Argument(help="The alias, e.g. production.")],
    as_json: JsonOpt = False,
) -> None:
    """The gates every promotion to NAME@ALIAS must pass (JSON null: none)."""
    policy = _models().policy(name, alias)
    if as_json:
        typer.echo(json.dumps(policy, indent=2))
    elif policy is None:
        console().print(plain(f"{name}@{alias} has no policy: any version may be promoted"))
    else:
        console().print(plain(f"{name}@{alias} promotion policy:"))
        console().print(plain(json.dumps(policy, indent=2)))


@policy_app.command("set")
def policy_set(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Argument(help="The alias, e.g. production.")],
    policy: Annotated[
        str | None, typer.Argument(help='The policy as JSON: \'{"metrics": {"acc": ">= 0.9"}}\'.')
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read the policy from this JSON file.")
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the alias's policy.")] = False,
    weaken: Annotated[
        bool, typer.Option("--weaken", help="Allow a policy that asks less than the stored one.")
    ] = False,
    reason: Annotated[str | None, typer.Option("--reason", help="Why (audited).")] = None,
) -> None:
    """Set the policy of NAME@ALIAS (checked, then audited as policy.set), or --clear it.
    Removing or loosening a policy needs --weaken, and is audited as such."""
    given = [label for label, value in (("POLICY", policy), ("--file", file), ("--clear", clear))
             if value]  # fmt: skip
    if len(given) != 1:
        raise ValidationError("POLICY", "give exactly one of POLICY (inline JSON), --file or "
                              f"--clear; got {' and '.join(given) or 'none'}")  # fmt: skip
    spec = None if clear else _read_policy(policy, file)
    _models().set_policy(name, alias, spec, weaken=weaken, reason=reason)
    done = "removed" if spec is None else "set"
    console().print(
        plain(f"{name}@{alias}: policy {done} (kiln models policy show {name} {alias})")
    )


def _read_policy(inline: str | None, file: Path | None) -> dict[str, Any]:
    field, text = ("POLICY", inline) if file is None else ("--file", _read_text(file))
    try:
        spec = json.loads(text or "")
    except json.JSONDecodeError as exc:
        raise ValidationError(field, f"is not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ValidationError(field, 'must be a JSON object: {"metrics": {"acc": ">= 0.9"}}')
    return spec


def _read_text(file: Path) -> str:
    try:
        return file.read_text()
    except OSError as exc:
        raise ValidationError("--file", f"cannot read {str(file)!r}: {exc.strerror}") from None
