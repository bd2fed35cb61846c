"""``kiln server``, ``kiln sync`` and ``kiln push``: a team's record on a server."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from kiln.cli._render import console, plain
from kiln.config import Settings, server_url
from kiln.errors import ConfigError, ValidationError
from kiln.record.values import check_name

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts and agents.")]


def server(
    home: Annotated[
        Path | None,
        typer.Option("--home", help="The store to serve: its kiln.db and blobs (KILN_HOME)."),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option("--store", help="A PostgreSQL store instead (postgresql+psycopg://...)."),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="0: any free port.")] = 8700,
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth",
            help="Ask for no token: anyone who reaches the server acts as an admin under the "
            "name they declare (KILN_ACTOR). For a single user on 127.0.0.1.",
        ),
    ] = False,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="Serve HTTPS with this certificate (PEM).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="The certificate's private key (PEM).")
    ] = None,
    function: Annotated[
        list[str] | None,
        typer.Option(
            "--function",
            help="FILE.py::FUNCTION that callers of the MCP tools may "
            "run, with their own rights (an agent's: sandboxed). Repeat.",
        ),
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option(
            "--pool",
            help="The pool whose quotas and budgets admit the runs of --function "
            "(`kiln pools set`); none: they run unadmitted.",
        ),
    ] = None,
) -> None:
    """Serve the record over HTTP (/api/v1, /openapi.json, /metrics) until Ctrl-C or SIGTERM."""
    from kiln.server.main import serve

    settings = Settings.from_env({**_env(), **({"KILN_HOME": str(home)} if home else {})})
    if settings.server_url and home is None and store is None:
        raise ConfigError("KILN_SERVER", "is set: this shell is a client of a server; unset it "
                          "or give --home to serve a store")  # fmt: skip
    url = store or settings.store_url
    if store is not None and not store.startswith(("postgresql", "sqlite")):
        allowed = "sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        raise ValidationError("--store", f"{store!r} is not a store URL", allowed=allowed)
    if (tls_cert is None) != (tls_key is None):
        raise ValidationError("--tls-key" if tls_key is None else "--tls-cert",
                              "HTTPS needs both --tls-cert and --tls-key")  # fmt: skip
    for flag, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path is not None and not path.is_file():
            raise ValidationError(flag, f"{path} is not a file")
    tls = (tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    from kiln.cli.run import registered

    serve(url, settings.home, host=host, port=port, insecure_no_auth=insecure_no_auth,
          actor=settings.actor, tls=tls, functions=registered(function),
          pool=check_name("--pool", pool) if pool else None)  # fmt: skip


UI_TOKEN_S = 12 * 3600  # the dashboard's token on this machine, revoked when `kiln ui` ends


def ui(
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="0: any free port.")] = 0,
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="Print the address; open no browser.")
    ] = False,
) -> None:
    """Open the web dashboard on this machine's record (or on the team server)."""
    import secrets
    import signal
    import webbrowser

    settings = Settings.from_env()
    if settings.server_url:
        url = settings.server_url.rstrip("/") + "/"
        console().print(f"The dashboard of {plain(url)}: sign in with a token "
                        "(`kiln tokens create --name dashboard`).")  # fmt: skip
        if not no_browser:
            webbrowser.open(url)
        return
    from kiln.server.main import serve

    minted: list[tuple[object, str]] = []

    def ready(app: Any, url: str) -> None:
        store = app.state.store
        token_id, token = _ui_token(store, settings.actor)
        minted.append((store, token_id))
        code = secrets.token_urlsafe(24)  # what the address carries: it works once
        app.state.handoffs[code] = token
        address = f"{url}/#code={code}"
        console().print(f"Kiln's dashboard: {plain(address)}\n(Ctrl-C to stop; the link "
                        "signs in once, and its session ends when this stops)")  # fmt: skip
        if not no_browser:
            webbrowser.open(address)

    def revoke() -> None:
        for store, token_id in minted:
            store.revoke_token(token_id)  # type: ignore[attr-defined]
        minted.clear()

    # closing the terminal (SIGHUP) stops it as Ctrl-C does: the token is revoked
    signal.signal(signal.SIGHUP, lambda *_: signal.raise_signal(signal.SIGTERM))
    serve(settings.store_url, settings.home, port=port, actor=settings.actor, on_ready=ready,
          on_stop=revoke)  # fmt: skip


def _ui_token(store: Any, actor: str) -> tuple[str, str]:
    """A token for ``actor`` on this machine's store: the person who can open the store's
    file is its owner, so a store without principals gets them as its first admin; a
    store that has principals must already know them."""
    import time

    from kiln.govern import tokens
    from kiln.record.store.base import PrincipalRow, TokenRow

    principal = store.principal(actor)
    if principal is None:
        known = [p.name for p in store.principals() if not p.disabled]
        if known:
            raise ConfigError("KILN_ACTOR", f"{actor!r} is not a principal of this store; "
                              f"set KILN_ACTOR to one of {', '.join(known[:5])}")  # fmt: skip
        store.add_principal(PrincipalRow(name=actor, kind="user", role="admin",
                                         created_at=time.time(), created_by="kiln ui"))  # fmt: skip
        principal = store.principal(actor)
    if principal.disabled:
        raise ConfigError("KILN_ACTOR", f"the principal {actor!r} is disabled")
    token_id, digest, token = tokens.new_token()
    now = time.time()
    store.add_token(TokenRow(id=token_id, digest=digest, principal=actor, kind="access",
                             role=principal.role, created_at=now, name="kiln ui",
                             expires_at=now + UI_TOKEN_S))  # fmt: skip
    return token_id, token


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "KILN_SERVER"}


def sync(as_json: JsonOpt = False) -> None:
    """Send the batches spooled while the server could not be reached (KILN_HOME/spool)."""
    from kiln.record.store import open_store
    from kiln.record.store.http import HttpStore, Synced
    from kiln.record.store.http import sync as send

    settings = Settings.from_env()
    if not settings.server_url:
        raise ConfigError("KILN_SERVER", "is not set: there is no server to sync with")
    folder = settings.home / "spool"
    store = open_store(replace(settings, home=Path(tempfile.mkdtemp(prefix="kiln-sync-"))))
    assert isinstance(store, HttpStore)  # noqa: S101  KILN_SERVER is set
    try:
        done = send(folder, store) if folder.is_dir() else Synced()
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps({"sent": done.sent, "left": [str(p) for p in done.left],
                               "refused": [str(p) for p in done.refused]}))  # fmt: skip
    else:
        text = f"sent {done.sent} batch(es) to {settings.server_url}"
        if done.left:
            text += f"; {len(done.left)} file(s) left: the server is still down"
        if done.refused:
            text += ("; the server refused some entries, kept with the reason in "
                     + ", ".join(map(str, done.refused)))  # fmt: skip
        console().print(plain(text))
    if done.left or done.refused:
        raise typer.Exit(1)


def push(
    runs: Annotated[list[str] | None, typer.Argument(help="Run ids (or prefixes).")] = None,
    to: Annotated[str, typer.Option("--to", help="The server's URL, http://host:port.")] = "",
    all_runs: Annotated[bool, typer.Option("--all", help="Every run of this store.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Copy runs (blobs, metric points, lineage) from this store to a server. Twice: no-op."""
    from kiln.record.bundle import export_bundle, import_bundle
    from kiln.record.recorder import recorder_for
    from kiln.record.store import open_store
    from kiln.record.store.base import RunQuery

    target = server_url(to or None)
    if target is None:
        raise ValidationError("--to", "is required", allowed="the server's URL, http://host:port")
    if bool(runs) == all_runs:
        raise ValidationError("runs", "give run ids or --all (not both)")
    local = Settings.from_env(_env())
    source = recorder_for(local, create=False)
    ids = (
        [r.id for r in reversed(source.store.query_runs(RunQuery(limit=None)))]
        if all_runs
        else [source.store.get_run(r).id for r in runs or ()]
    )
    remote = open_store(replace(local, server_url=target))
    pushed: list[str] = []
    present: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="kiln-push-") as tmp:
            from rich.progress import track

            shown = console().is_terminal and not as_json
            for run_id in track(ids, "pushing", console=console(), disable=not shown):
                bundle = Path(tmp) / f"{run_id}.kiln"
                export_bundle(source.store, source.blobs, run_id, bundle)
                _, written = import_bundle(remote, remote.blob_store, bundle)
                (pushed if written else present).append(run_id)
                bundle.unlink()
    finally:
        remote.close()
    if as_json:
        typer.echo(json.dumps({"pushed": pushed, "already_there": present, "to": target}))
        return
    console().print(plain(f"pushed {len(pushed)} run(s) to {target}; "
                          f"{len(present)} were there already"))  # fmt: skip
