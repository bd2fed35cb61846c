"""MCP tool call latency: a read tool (``runs_search``, 20 runs) through ``/mcp`` over
streamable HTTP with the SDK's client, against the same query through the HTTP API
(``POST /api/v1/runs:search``) in the same run. Both on one real ``kiln server`` with
tokens, 200 runs recorded, each client warm (one connection kept). Goal: < 20 ms per
tool call (median of 200)."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench_server import start_server, stop

from _common import Row, emit

RUNS = 200
CALLS = 200


def record(url: str, token: str) -> None:
    from kiln.record.model import RunStatus
    from kiln.record.store.base import WriteBatch
    from kiln.record.store.http import HttpStore
    from kiln.record.store.rows import RunRow

    with tempfile.TemporaryDirectory() as cache:
        store = HttpStore(url, cache=Path(cache), token=token)
        rows = [RunRow(id=f"{i:032x}", app="bench", status=RunStatus.SUCCEEDED,
                       created_at=1.7e9 + i, params={"lr": i / RUNS})
                for i in range(RUNS)]  # fmt: skip
        store.write(WriteBatch(new_runs=rows,
                               summaries=[(r.id, "bench", "acc", i / RUNS)
                                          for i, r in enumerate(rows)]))  # fmt: skip
        store.close()


def over_api(url: str, token: str) -> list[float]:
    body = {"app": "bench", "order_by": "-acc", "limit": 20}
    samples = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
        for i in range(CALLS + 20):
            t = time.perf_counter()
            found = http.post("/api/v1/runs:search", json=body)
            assert found.status_code == 200 and len(found.json()["runs"]) == 20
            if i >= 20:
                samples.append((time.perf_counter() - t) * 1000)
    return samples


def over_mcp(url: str, token: str) -> list[float]:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    args = {"app": "bench", "order_by": "-acc", "limit": 20}

    async def main() -> list[float]:
        samples = []
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=60) as http,
            Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client,
        ):
            for i in range(CALLS + 20):
                t = time.perf_counter()
                result: Any = await client.call_tool("runs_search", args)
                assert not result.is_error and len(result.structured_content["runs"]) == 20
                if i >= 20:
                    samples.append((time.perf_counter() - t) * 1000)
        return samples

    return anyio.run(main)


def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        os.environ["KILN_HOME"] = home
        proc, found = start_server(Path(home) / "server", auth=True)
        url, token = found.split()
        try:
            record(url, token)
            over_api(url, token)
            over_mcp(url, token)  # both warm, then measured in turn
            base = statistics.median(over_api(url, token))
            tool = statistics.median(over_mcp(url, token))
        finally:
            stop(proc)
    emit(
        [
            Row(
                "mcp",
                "MCP read tool call (runs_search, 20 runs) over HTTP, median (ms)",
                tool,
                base,
                "the same query through the HTTP API",
                "ms",
                "< 20 ms",
                tool < 20,
            )
        ]
    )


if __name__ == "__main__":
    main()
