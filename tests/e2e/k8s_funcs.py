"""Functions the Kubernetes engine's end-to-end test runs in (played) pods."""

from __future__ import annotations

import time

import kiln

app = kiln.App("k8s")
tries: list[int] = []


@app.function(cpu=1, memory="256Mi")
def train(lr: float) -> dict:
    for step in range(3):
        kiln.log({"loss": lr / (step + 1)}, step=step)
    return {"accuracy": 1 - lr}


@app.function(retries=1)
def flaky(marker: str) -> str:
    from pathlib import Path

    seen = Path(marker)
    if not seen.exists():  # the first attempt's pod fails; the second's succeeds
        seen.write_text("1")
        raise RuntimeError("the first attempt fails")
    return "second attempt"


@app.function(timeout=1)
def sleeps() -> None:
    time.sleep(30)


@app.function(env=kiln.Env(packages=["six==1.16.0"]))
def in_env() -> dict:
    import sys

    import six

    return {"six": six.__version__, "prefix": sys.prefix}
