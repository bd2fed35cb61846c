"""Running ``kiln server``: one uvicorn process over one store, drained on SIGTERM."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError

DRAIN_S = 30  # how long a SIGTERM waits for requests in flight (a batch being written)
HEADER_S = 10.0  # for a request's headers to arrive, from its first byte
BODY_S = 60.0  # for its body, plus a second for each MIN_RATE bytes received
MIN_RATE = 64 << 10  # bytes/s: an upload slower than this on average is cut off (408)
_TOO_SLOW = (b'{"type":"about:blank","title":"Request Timeout","status":408,'
             b'"detail":"the request did not arrive in time"}')  # fmt: skip
_log = logging.getLogger("kiln")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, *, insecure_no_auth: bool) -> None:
    """Without authentication, listen only where other machines cannot reach."""
    if insecure_no_auth and not is_loopback(host):
        raise ConfigError(
            "--host", f"{host} can be reached from other machines, and --insecure-no-auth "
            "would let anyone who reaches it read and write every record as anyone. Bind "
            "127.0.0.1, or drop --insecure-no-auth: with tokens any address is allowed",
        )  # fmt: skip


def enrolment(store: Any) -> str | None:
    """At the first start (no principal yet), a one-time token that enrols the first
    admin (earlier unused ones are revoked: each start prints a fresh one)."""
    from kiln.govern import tokens
    from kiln.record.store.base import TokenRow

    for old in store.tokens(principal=""):
        if old.kind == "enrol" and old.revoked_at is None:
            store.revoke_token(old.id)
    if store.principals():
        return None
    token_id, digest, token = tokens.new_token()
    store.add_token(TokenRow(id=token_id, digest=digest, principal="", kind="enrol",
                             role="admin", created_at=time.time(), name="enrolment"))  # fmt: skip
    return token


def lease_seconds(environ: Mapping[str, str]) -> float:
    """``KILN_LEASE_S``: how long an engine's hold on admitted work lasts unrenewed."""
    from kiln.server.quotas import LEASE_S

    raw = (environ.get("KILN_LEASE_S") or "").strip()
    if not raw:
        return LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 1.0 <= value <= 3600.0:
        raise ConfigError("KILN_LEASE_S", f"{raw[:40]!r} is not a number of seconds (1-3600)")
    return value


def serve(
    store_url: str, home: Path, *, host: str = "127.0.0.1", port: int = 8700,
    insecure_no_auth: bool = False, actor: str = "kiln-server",
    tls: tuple[Path, Path] | None = None, on_ready: Callable[[Any, str], None] | None = None,
    on_stop: Callable[[], None] | None = None, functions: Mapping[str, Any] | None = None,
    pool: str | None = None,
) -> None:  # fmt: skip
    """Serve the store at ``store_url`` (blobs under ``home``) until SIGINT or SIGTERM;
    on either, stop taking connections and let the requests in flight finish. Every
    request needs a token unless ``insecure_no_auth``; ``tls`` is (certificate, key).
    ``on_ready(app, url)`` is called once the socket listens, before serving, instead
    of printing the address; ``on_stop()`` when the server stops (on a signal too).
    ``functions`` may be run through the MCP tools, by each caller with its own rights,
    their runs admitted to ``pool`` if given (its quotas and budgets)."""
    check_bind(host, insecure_no_auth=insecure_no_auth)
    from kiln._optional import require

    for module in ("fastapi", "uvicorn"):
        require(module, extra="server")
    import uvicorn

    from kiln.config import make_home
    from kiln.record.blobs import FileBlobStore
    from kiln.record.store import open_sql_store
    from kiln.server.app import build_app

    make_home(home)
    blobs = FileBlobStore(home / "blobs")
    store = open_sql_store(store_url, blobs=blobs, actor=actor)
    from kiln.observe.cost import Prices

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise ConfigError("--port", f"cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(2048)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if tls else "http"
    public_url = os.environ.get("KILN_PUBLIC_URL") or f"{scheme}://{shown}:{bound}"
    from dataclasses import replace

    from kiln.config import Settings

    own = {k: v for k, v in os.environ.items()
           if k not in ("KILN_SERVER", "KILN_TOKEN", "KILN_POOL")}  # fmt: skip
    # The server's own home and store: what a sandbox hides (kiln.db, blobs) is theirs.
    runner = replace(Settings.from_env(own), home=home, store_url=store_url,
                     server_url=public_url, token=None, pool=pool)  # fmt: skip
    app = build_app(store, blobs, home, auth=not insecure_no_auth, prices=Prices.from_env(),
                    lease_s=lease_seconds(os.environ), public_url=public_url,
                    functions=functions, run_settings=runner)  # fmt: skip
    if on_stop is not None:
        app.router.lifespan_context = _stopping(app.router.lifespan_context, on_stop)
    from kiln._deadlines import deadline_protocol

    protocol = deadline_protocol(
        header_s=HEADER_S, body_s=BODY_S, min_rate=MIN_RATE, too_slow=_TOO_SLOW,
        content_type=b"application/problem+json",
    )  # fmt: skip
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=DRAIN_S, access_log=False,
        limit_concurrency=1000, timeout_keep_alive=30, http=protocol,
        ssl_certfile=str(tls[0]) if tls else None, ssl_keyfile=str(tls[1]) if tls else None,
    )  # fmt: skip
    server = _Draining(config, app.state)
    if on_ready is None:
        print(f"kiln server: {scheme}://{shown}:{bound} (store {store.url})", flush=True)
    else:
        on_ready(app, f"{scheme}://{shown}:{bound}")
    token = None if insecure_no_auth else enrolment(store)
    if token is not None:
        print(f"kiln server: enrol the first admin (once) with: kiln login "
              f"{scheme}://{shown}:{bound} --enrol {token} --name NAME", flush=True)  # fmt: skip
    if functions:
        admitted = f"; their runs are admitted to pool {pool}" if pool else ""
        print(f"kiln server: the MCP tools (/mcp) may run {', '.join(sorted(functions))}"
              f"{admitted}", flush=True)  # fmt: skip
    try:
        server.run(sockets=[sock])
    finally:
        store.close()
        sys.stdout.flush()


def _stopping(inner: Any, on_stop: Callable[[], None]) -> Any:
    """The app's lifespan, calling ``on_stop`` as it ends: uvicorn runs it on SIGINT and
    SIGTERM before it ends the process (code after ``run`` would not run on SIGTERM)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with inner(app) as state:
            try:
                yield state
            finally:
                on_stop()

    return lifespan


class _Draining:
    """uvicorn's server, marking the app as draining (``/readyz`` says 503) on a signal."""

    def __init__(self, config: Any, state: Any) -> None:
        import uvicorn

        state_ref = state

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                state_ref.draining = True
                super().handle_exit(sig, frame)

        self._server = Server(config)

    def run(self, sockets: list[socket.socket]) -> None:
        self._server.run(sockets=sockets)
