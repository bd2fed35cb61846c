"""Shared by the benchmarks: timing helpers, machine description, result rows."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class Row:
    bench: str
    metric: str
    kiln: float
    baseline: float
    baseline_name: str
    unit: str
    goal: str
    met: bool

    @property
    def ratio(self) -> float:
        return self.kiln / self.baseline


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_of(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def machine() -> str:
    return (
        f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.platform()}"
    )


def emit(rows: list[Row]) -> None:
    """One JSON line per row, for run_all.py to collect."""
    for row in rows:
        print("RESULT " + json.dumps({**asdict(row), "ratio": row.ratio}), flush=True)
