"""uvicorn's HTTP protocol with deadlines, for Kiln's endpoints and ``kiln server``.

uvicorn times out only idle keep-alive connections, so a client that opens connections
and then sends slowly, or nothing, would hold them (and the server's connection limit)
forever. Here a request's headers must arrive within ``header_s`` of its first byte (or
of the connection), and its body within ``body_s`` of its headers, plus, with
``min_rate``, a second per ``min_rate`` bytes received (a large upload at a decent
rate may take as long as it needs; a trickle may not). One sweep a second enforces
the deadlines (a timer per request would cost every request) and answers 408.
"""

from __future__ import annotations

import asyncio
from typing import Any

SWEEP_S = 1.0  # how often connections past a deadline are closed


def deadline_protocol(
    *, header_s: float, body_s: float, too_slow: bytes, content_type: bytes,
    min_rate: float | None = None,
) -> Any:  # fmt: skip
    """The protocol class for ``uvicorn.Config(http=...)`` (``"auto"`` without
    httptools: uvicorn's pure-Python protocol, without deadlines). ``too_slow`` is the
    body of the 408 answer."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard]
        return "auto"
    answer = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: %s\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (content_type, len(too_slow), too_slow)
    )

    class Protocol(HttpToolsProtocol):
        deadline = 0.0  # loop time by which what is being read must have arrived; 0: none
        body_start = 0.0
        received = 0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.deadline = self.loop.time() + header_s
            state: Any = self.server_state
            if getattr(state, "kiln_sweep", None) is None:  # the first connection
                state.kiln_sweep = self.loop.call_later(SWEEP_S, _sweep, self.loop, state,
                                                        answer)  # fmt: skip

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self.deadline:
                self.deadline = self.loop.time() + header_s

        def on_headers_complete(self) -> None:
            self.body_start, self.received = self.loop.time(), 0
            self.deadline = self.body_start + body_s
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if min_rate is not None:
                self.received += len(body)
                self.deadline = self.body_start + body_s + self.received / min_rate
            super().on_body(body)

        def on_message_complete(self) -> None:
            self.deadline = 0.0
            super().on_message_complete()

    return Protocol


def _sweep(loop: asyncio.AbstractEventLoop, state: Any, answer: bytes) -> None:
    """Answer 408 to, and close, each connection past its deadline."""
    now = loop.time()
    for connection in list(state.connections):
        deadline = getattr(connection, "deadline", 0.0)
        transport = connection.transport
        if deadline and deadline < now and not transport.is_closing():
            cycle = connection.cycle  # the request being read, or the last one answered
            if cycle is None or not cycle.response_started or cycle.response_complete:
                transport.write(answer)
            if cycle is not None and not cycle.response_complete:
                cycle.scope["kiln.too_slow"] = True
            transport.close()
    state.kiln_sweep = loop.call_later(SWEEP_S, _sweep, loop, state, answer)
