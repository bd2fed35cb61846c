"""Running ``kiln server``: one uvicorn process over one store, drained on SIGTERM."""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
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
    """Refuse an address other machines can reach while the server has no authentication
    (identities and tokens come with part 2 of the team server)."""
    if not is_loopback(host) and not insecure_no_auth:
        raise ConfigError(
            "--host", f"{host} can be reached from other machines, and this server does not "
            "authenticate anyone yet: anyone who reaches it can read and write every record. "
            "Bind 127.0.0.1 (the default), or pass --insecure-no-auth on a network you trust",
        )  # fmt: skip


def serve(
    store_url: str, home: Path, *, host: str = "127.0.0.1", port: int = 8700,
    insecure_no_auth: bool = False, actor: str = "kiln-server",
) -> None:  # fmt: skip
    """Serve the store at ``store_url`` (blobs under ``home``) until SIGINT or SIGTERM;
    on either, stop taking connections and let the requests in flight finish."""
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
    app = build_app(store, blobs, home)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise ConfigError("--port", f"cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(2048)
    bound = sock.getsockname()[1]
    from kiln._deadlines import deadline_protocol

    protocol = deadline_protocol(
        header_s=HEADER_S, body_s=BODY_S, min_rate=MIN_RATE, too_slow=_TOO_SLOW,
        content_type=b"application/problem+json",
    )  # fmt: skip
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=DRAIN_S, access_log=False,
        limit_concurrency=1000, timeout_keep_alive=30, http=protocol,
    )  # fmt: skip
    server = _Draining(config, app.state)
    shown = f"[{host}]" if ":" in host else host
    print(f"kiln server: http://{shown}:{bound} (store {store.url})", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        store.close()
        sys.stdout.flush()


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
