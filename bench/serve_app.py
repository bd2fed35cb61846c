"""The served model of bench_serve.py, written twice: as a Kiln endpoint, and as the
bare FastAPI app a user would write by hand. Both answer {"sum": sum(x), "n": len(x)}."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

import kiln

app = kiln.App("bench-serve")


@app.endpoint(model="summer@production", name="summer", cpu=1, min_replicas=1, max_replicas=1,
              target_concurrency=64)  # fmt: skip
class Summer:
    def load(self, model_path: str) -> None:
        self.offset = pickle.loads(Path(model_path).read_bytes())["offset"]

    def predict(self, x: list[float]) -> dict[str, Any]:
        return {"sum": sum(x) + self.offset, "n": len(x)}


class Inp(BaseModel):
    x: list[float]


class Out(BaseModel):
    sum: float
    n: int


fastapi_app = FastAPI()


@fastapi_app.post("/predict", response_model=Out)
async def predict(inp: Inp) -> Out:
    return Out(sum=sum(inp.x), n=len(inp.x))
