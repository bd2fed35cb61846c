"""Endpoints the serving tests run in real replica processes (imported there by name)."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import kiln

app = kiln.App("serving")


class Scorer:
    """Answers which model version it is, so tests can tell the versions apart."""

    def load(self, model_path: str) -> None:
        self.model = pickle.loads(Path(model_path).read_bytes())

    def predict(self, x: list[float], delay: float = 0.0) -> dict[str, Any]:
        if delay:
            time.sleep(delay)
        return {"version": self.model["version"], "score": sum(x) * self.model["weight"],
                "pid": os.getpid()}  # fmt: skip


def row_echo(row: int, delay: float = 0.0) -> dict[str, Any]:
    if delay:
        time.sleep(delay)
    return {"row": row, "pid": os.getpid()}


class Echo:
    def load(self, model_path: str) -> None:
        self.loaded = model_path

    def predict(self, row: int, delay: float = 0.0) -> dict[str, Any]:
        return row_echo(row, delay)


class BatchEcho(Echo):
    """Answers a batch job's shard in one call; each answer says how big its call was."""

    def predict_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**row_echo(r["row"]), "call_rows": len(rows)} for r in rows]


def register(version_weight: float) -> int:
    """Record a run that saves a model, register it; returns the version number."""
    with app.run(params={"weight": version_weight}) as run:
        kiln.log({"accuracy": 0.9})
        models = app.models
        version = len(models.versions("scorer")) + 1 if "scorer" in models.names() else 1
        kiln.save("model.pkl", {"version": version, "weight": version_weight})
    return app.models.register("scorer", run, artifact="model.pkl").version  # the ActiveRun


class Devices:
    """Says which GPUs and how many numeric-library threads its replica was given."""

    def load(self, model_path: str) -> None:
        self.devices = os.environ.get("CUDA_VISIBLE_DEVICES")

    def predict(self, delay: float = 0.0) -> dict[str, Any]:
        if delay:
            time.sleep(delay)
        threads = os.environ.get("OMP_NUM_THREADS"), os.environ.get("OPENBLAS_NUM_THREADS")
        return {"devices": self.devices, "pid": os.getpid(), "threads": threads}


class Score(BaseModel):
    above: int
    share: float
    label: str


class Typed:
    """Counts the features above a threshold: typed in and out, for schemathesis."""

    def load(self, model_path: str) -> None:
        self.loaded = model_path

    def predict(self, features: list[float], threshold: float = 0.5, label: str = "") -> Score:
        above = sum(1 for f in features if f > threshold)
        return Score(above=above, share=above / len(features) if features else 0.0, label=label)


class Fragile(Scorer):
    """Its replica dies on request (``crash``), or answers what JSON cannot carry."""

    def predict(  # type: ignore[override]
        self, x: list[float], crash: bool = False, scale: float = 1.0
    ) -> dict[str, Any]:
        if crash:
            os._exit(3)
        return {"score": sum(x) * scale * float("inf") if scale > 1 else sum(x)}


class Talker(Scorer):
    """Prints as it loads and answers: what its endpoint's logs hold."""

    def load(self, model_path: str) -> None:
        super().load(model_path)
        print(f"loaded version {self.model['version']}", flush=True)

    def predict(self, x: list[float], delay: float = 0.0) -> dict[str, Any]:
        import sys

        print(f"scoring {x}", file=sys.stderr, flush=True)
        return super().predict(x, delay)
