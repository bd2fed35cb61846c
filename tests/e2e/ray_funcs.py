"""Functions the Ray engine tests run on a real Ray cluster (imported there by name)."""

from __future__ import annotations

import time

import kiln

app = kiln.App("on-ray")


@app.function(cpu=1)
def where(x: int) -> dict[str, object]:
    import ray

    kiln.log({"x": x})
    time.sleep(0.5)
    return {"x": x, "node": ray.get_runtime_context().get_node_id()}


@app.function(cpu=1)
def boom() -> None:
    raise ValueError("bad input on the cluster")


@app.function(cpu=1, timeout=1.0)
def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.function(cpu=1, retries=1)
def four_seconds(i: int) -> int:
    time.sleep(4)
    return i


@app.function(cpu=1, env=kiln.Env(packages=["six==1.16.0"]))
def six_version() -> dict[str, str]:
    import sys

    import six

    return {"six": six.__version__, "prefix": sys.prefix}


@app.function(cpu=1)
def saves(data: bytes, driver_blobs: str) -> bool:
    """Saves an artifact; says whether it was already in the driver's KILN_HOME."""
    from pathlib import Path

    kiln.log({"size": len(data)})
    sha = kiln.save("weights.bin", data)
    return Path(driver_blobs, sha[:2], sha[2:]).exists()


@app.function(cpu=1)
def torch_threads() -> tuple[int, dict[str, str]]:
    import os

    import torch

    return torch.get_num_threads(), {k: v for k, v in os.environ.items() if k.endswith("_THREADS")}


def seeded(seed: int) -> bytes:
    import hashlib

    return hashlib.sha256(str(seed).encode()).digest() * 64


@app.function(cpu=1)
def saves_seeded(seed: int, driver_blobs: str) -> dict[str, bool]:
    """Saves bytes made from ``seed``; whether they landed in the driver's blobs."""
    from pathlib import Path

    sha = kiln.save("weights.bin", seeded(seed))
    return {"in_driver_home": Path(driver_blobs, sha[:2], sha[2:]).exists()}
