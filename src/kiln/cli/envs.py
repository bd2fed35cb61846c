"""``kiln envs ls|show|prune``: the cached environments."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from kiln.cli._render import console, fmt_time, parse_duration, plain
from kiln.config import Settings
from kiln.envs.manager import EnvManager, env_manager
from kiln.record.blobs import FileBlobStore
from kiln.record.model import LIVE_STATUSES
from kiln.record.store.base import RunQuery

app = typer.Typer(help="List, show and prune cached environments.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts and agents.")]


def _manager() -> tuple[EnvManager, Settings]:
    settings = Settings.from_env()
    return env_manager(settings.home, FileBlobStore(settings.blob_dir), settings.cache), settings


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@app.command("ls")
def ls(as_json: JsonOpt = False) -> None:
    """Cached environments (shared by every KILN_HOME here), most recently used first."""
    manager, _ = _manager()
    infos = manager.installed()
    if as_json:
        typer.echo(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    if not infos:
        console().print("no environments yet")
        return
    table = Table(header_style="bold", show_edge=False)
    for col in ("env", "python", "packages", "size", "created", "last used", "homes"):
        table.add_column(col, no_wrap=True)
    for i in infos:
        table.add_row(
            i.env_id[:12],
            i.python,
            str(i.packages),
            _size(i.size_bytes),
            fmt_time(i.created_at),
            fmt_time(i.last_used_at),
            str(len(i.homes)),
        )
    console().print(table)


@app.command("show")
def show(
    env_id: Annotated[str, typer.Argument(help="Env hash or a unique prefix of it.")],
    lock: Annotated[
        bool, typer.Option("--lock", help="Print the whole lock file, every hash included.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """An environment's packages, size, last use and the runs that used it (--lock: its lock)."""
    manager, settings = _manager()
    info = manager.get(env_id)
    lock_text = manager.lock_text(info)
    if lock:
        typer.echo(lock_text, nl=False)
        return
    from kiln.app import runs

    used_by = [r.id for r in runs(env_id=info.env_id, limit=50, settings=settings)]
    pins = pinned(lock_text)
    if as_json:
        typer.echo(json.dumps({**info.to_dict(), "packages": pins, "lock": lock_text,
                               "runs": used_by}, indent=2))  # fmt: skip
        return
    rows = [
        ("env", info.env_id),
        ("path", str(info.path)),
        ("python", info.python),
        ("size", _size(info.size_bytes)),
        ("last used", fmt_time(info.last_used_at)),
        ("packages", f"{len(pins)}: " + "  ".join(pins)),
        ("lock", f"blob {info.lock_sha256[:16]}, with hashes: kiln envs show {env_id} --lock"),
        ("runs", f"{len(used_by)}: " + (" ".join(r[:8] for r in used_by) or "none")),
    ]
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in rows:
        table.add_row(name, plain(value))
    console().print(table)


def pinned(lock_text: str) -> list[str]:
    """The ``name==version`` lines of a lock, without its hashes and comments."""
    return [
        line.split(";")[0].strip().removesuffix("\\").strip()
        for line in lock_text.splitlines()
        if line.strip() and not line[0].isspace() and not line.startswith(("#", "-"))
    ]


@app.command("prune")
def prune(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Unused for this long: 30m, 12h, 7d, 2w.")
    ] = "7d",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove environments unused for a while; never one a queued or running task uses."""
    seconds = parse_duration(older_than, "--older-than")
    manager, settings = _manager()
    in_use: set[str] = set()
    if settings.home.joinpath("kiln.db").exists() or not settings.store_url.startswith("sqlite"):
        from kiln.record.recorder import recorder_for

        store = recorder_for(settings, create=False).store
        active = store.query_runs(RunQuery(status=LIVE_STATUSES, limit=None))
        in_use = {r.environment.env_id for r in active if r.environment.env_id}
    removed = manager.prune(seconds, in_use, dry_run=dry_run)
    if as_json:
        typer.echo(json.dumps({"removed": removed, "dry_run": dry_run}))
        return
    verb = "would remove" if dry_run else "removed"
    console().print(f"{verb} {len(removed)} environment(s)" + "".join(f"\n  {r}" for r in removed))
