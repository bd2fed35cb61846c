"""``kiln mcp``: Kiln's MCP server over stdio, for an agent's MCP client to launch.

With ``KILN_SERVER`` set it relays every message to the server's ``/mcp`` with the
token from the environment (``KILN_TOKEN``, else ``kiln login``'s): the server lists
the tools that token may use and decides every call, so nothing here can widen it.
Without a server it serves this machine's store as its user (an admin of their own
record: approvals need a second person, which only a server has).
"""

from __future__ import annotations

import sys
from contextlib import AsyncExitStack
from typing import Annotated, Any

import anyio
import typer

from kiln.config import DEFAULT_PROJECT, Settings, server_token
from kiln.errors import ConfigError, ValidationError


def mcp(
    function: Annotated[
        list[str] | None,
        typer.Option(
            "--function",
            help="FILE.py::FUNCTION the tools may run (without a "
            "server; a server's are given to `kiln server --function`). Repeat.",
        ),
    ] = None,
) -> None:
    """Serve Kiln's tools to an MCP client over stdio (with KILN_SERVER: the server's).

    Configure the client to launch `kiln mcp`; with KILN_SERVER it relays to the
    server's /mcp with KILN_TOKEN's rights."""
    from kiln._optional import require

    require("mcp", extra="server")
    settings = Settings.from_env()
    if settings.server_url and function:
        raise ValidationError("--function", "is for a store of this machine's; with "
                              "KILN_SERVER the server's functions are run (`kiln server "
                              "--function`)")  # fmt: skip
    from kiln.cli.run import registered

    if settings.server_url:
        anyio.run(_relayed, settings)
    else:
        anyio.run(_serve, _embedded(settings, registered(function)))


async def _serve(server: Any) -> None:
    from mcp.server.stdio import stdio_server

    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


async def _relayed(settings: Settings) -> None:
    server, upstream = _relay(settings)
    await _check_token(upstream)
    async with upstream:  # connected first: a server that cannot be reached is said at once
        await _serve(server)


def _embedded(settings: Settings, functions: dict[str, Any] | None = None) -> Any:
    from kiln.record.blobs import FileBlobStore
    from kiln.record.store import open_sql_store
    from kiln.record.store.sql import SqlStore
    from kiln.server.auth import Caller
    from kiln.server.mcp import build
    from kiln.server.operations import Context

    store = open_sql_store(settings.store_url, blobs=FileBlobStore(settings.home / "blobs"),
                           actor=settings.actor)  # fmt: skip
    assert isinstance(store, SqlStore)  # noqa: S101  a local store URL is SQL
    caller = Caller(name=settings.actor, role="admin", project=DEFAULT_PROJECT)
    context = Context(store, caller, {"functions": functions or {}, "settings": settings})
    return build(lambda request: context)


def _relay(settings: Settings) -> tuple[Any, _Upstream]:
    """A stdio server answering from the server's ``/mcp``: its tools, its answers."""
    import mcp_types as types
    from mcp.server.lowlevel import Server

    from kiln import __version__

    url = settings.server_url
    assert url is not None  # noqa: S101  only called with a server
    token = settings.token or server_token(url)
    if not token:
        raise ConfigError("KILN_TOKEN", f"no token for {url}: set KILN_TOKEN to the agent's "
                          f"token, or run `kiln login {url}`")  # fmt: skip
    upstream = _Upstream(f"{url}/mcp", token)

    async def list_tools(ctx: Any, params: types.PaginatedRequestParams | None) -> Any:
        return await upstream.call(lambda c: c.list_tools())

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> Any:
        return await upstream.call(lambda c: c.call_tool(params.name, params.arguments or {}))

    from kiln.server.mcp import INSTRUCTIONS

    server = Server("kiln", version=__version__, instructions=INSTRUCTIONS,
                    on_list_tools=list_tools, on_call_tool=call_tool)  # fmt: skip
    return server, upstream


class _Upstream:
    """The MCP client of the server's ``/mcp``, connected while ``kiln mcp`` runs (in the
    lifespan's task, where it must also close). The server answers each call on its
    own, so a failed call leaves the next one free to succeed."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self._stack = AsyncExitStack()
        self._client: Any = None

    async def __aenter__(self) -> _Upstream:
        import httpx2
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client

        headers = {"Authorization": f"Bearer {self.token}"}
        http = await self._stack.enter_async_context(
            httpx2.AsyncClient(headers=headers, timeout=60)
        )
        transport = streamable_http_client(self.url, http_client=http)
        try:
            self._client = await self._stack.enter_async_context(Client(transport))
        except Exception as e:
            await self._stack.aclose()
            raise ConfigError("KILN_SERVER", f"cannot reach {self.url}: {_leaf(e)}") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def call(self, what: Any) -> Any:
        try:
            return await what(self._client)
        except Exception as e:  # said on stderr too; the process stays up
            print(f"kiln mcp: {self.url}: {e}", file=sys.stderr)
            raise


async def _check_token(upstream: _Upstream) -> None:
    """Say at once, and plainly, that the server refuses the token (MCP would only say
    that it answered with an error)."""
    import httpx2

    whoami = upstream.url.removesuffix("/mcp") + "/api/v1/whoami"
    headers = {"Authorization": f"Bearer {upstream.token}"}
    try:
        async with httpx2.AsyncClient(timeout=30) as http:
            answer = await http.get(whoami, headers=headers)
    except Exception as e:
        raise ConfigError("KILN_SERVER", f"cannot reach {upstream.url}: {_leaf(e)}") from None
    if answer.status_code in (401, 403, 429):
        try:
            detail = str(answer.json().get("detail", ""))[:300]
        except ValueError:
            detail = f"HTTP {answer.status_code}"
        raise ConfigError("KILN_TOKEN", f"{upstream.url} refuses the token: {detail}")


def _leaf(error: BaseException) -> BaseException:
    """The first error inside task groups' groups of errors: the one that says why."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error
