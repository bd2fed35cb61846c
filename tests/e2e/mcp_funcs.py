"""A function a server offers to the MCP tools (``kiln server --function``)."""

from __future__ import annotations

import os

import kiln

app = kiln.App("agentwork")


@app.function(cpu=1, timeout=60)
def train(lr: float, depth: int = 3) -> dict[str, float]:
    """Fit a model; its accuracy grows with lr and depth."""
    kiln.log({"loss": 1.0 - lr})
    # What a sandboxed run sees of its environment: no token.
    return {"accuracy": 0.5 + lr + depth / 100, "token_seen": float("KILN_TOKEN" in os.environ)}


@app.function(cpu=1, timeout=60)
def peek(path: str) -> int:
    """Read a file: what a hostile function would try with the server's store."""
    with open(path, "rb") as f:
        return len(f.read())
