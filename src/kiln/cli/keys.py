"""``kiln keys``: the Ed25519 keys that sign bundles (``kiln export --sign NAME``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from kiln.cli._render import console, plain

app = typer.Typer(
    help="Ed25519 keys that sign bundles: create, add, ls.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A name for the key.")] = "default",
) -> None:
    """Make a key pair; its private key is readable by you only. Prints the public key."""
    from kiln.record.signing import create_key, keys_dir

    key = create_key(keys_dir(), name)
    console().print(plain(
        f"key {key.name} ({key.fingerprint}) in {keys_dir()}\\npublic key: {key.public_key}\\n"
        f"others trust it with: kiln keys add {key.name} {key.public_key}"
    ), soft_wrap=True)  # fmt: skip


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="A name for the key.")],
    public_key: Annotated[str, typer.Argument(help="Its public key, base64 (kiln keys ls).")],
) -> None:
    """Know someone's public key: bundles it signed verify as "signed by NAME"."""
    from kiln.record.signing import add_key, keys_dir

    key = add_key(keys_dir(), name, public_key)
    console().print(plain(f"key {key.name} ({key.fingerprint}) added to {keys_dir()}"))


@app.command("ls")
def ls(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The keys this machine knows, and which of them it can sign with."""
    from kiln.record.signing import keys_dir, list_keys

    keys = list_keys(keys_dir())
    if as_json:
        typer.echo(json.dumps([asdict(k) for k in keys]))
        return
    if not keys:
        console().print(plain(f"no keys in {keys_dir()}: make one with `kiln keys create`"))
    for k in keys:
        mine = "private+public" if k.private else "public only"
        console().print(plain(f"{k.name}  {k.fingerprint}  {mine}  {k.public_key}"))
