"""What inference and runs cost: resource-seconds and, with a price table, dollars.

The price table comes from ``KILN_PRICES``: inline JSON, or the path of a JSON or
TOML file, with any of::

    {"cpu_hour": 0.04, "memory_gb_hour": 0.005, "gpu_hour": {"H100": 2.9, "default": 1.2}}

``gpu_hour`` may also be one number for every GPU type. Cost counts what requests
used: the CPU time their replicas spent on them, the GPU share a replica holds for
the time it spent on them, and the memory it reserved for that time.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import ConfigError

if TYPE_CHECKING:
    from kiln.record.model import RunRecord


@dataclass(frozen=True, slots=True)
class Usage:
    """Resources spent on ``requests`` requests."""

    requests: int = 0
    cpu_seconds: float = 0.0
    gpu_seconds: float = 0.0  # busy seconds times the GPU share held
    memory_gb_seconds: float = 0.0  # busy seconds times the memory reserved

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.requests + other.requests,
            self.cpu_seconds + other.cpu_seconds,
            self.gpu_seconds + other.gpu_seconds,
            self.memory_gb_seconds + other.memory_gb_seconds,
        )

    def per_request(self) -> dict[str, float]:
        n = max(self.requests, 1)
        return {
            "cpu_seconds": self.cpu_seconds / n,
            "gpu_seconds": self.gpu_seconds / n,
            "memory_gb_seconds": self.memory_gb_seconds / n,
        }


@dataclass(frozen=True, slots=True)
class Prices:
    """Dollars per CPU-hour, per GB-hour of memory, and per GPU-hour by GPU type."""

    cpu_hour: float = 0.0
    memory_gb_hour: float = 0.0
    gpu_hour: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Prices | None:
        """The table named by ``KILN_PRICES``, or None when it is unset."""
        raw = (os.environ if environ is None else environ).get("KILN_PRICES", "").strip()
        if not raw:
            return None
        if raw.startswith("{"):
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError("KILN_PRICES", f"not valid JSON: {exc}") from None
        else:
            data = _read_file(Path(raw).expanduser())
        return cls.parse(data)

    @classmethod
    def parse(cls, data: Any) -> Prices:
        if not isinstance(data, Mapping):
            raise ConfigError(
                "KILN_PRICES", "must be a table of cpu_hour, memory_gb_hour, gpu_hour"
            )
        unknown = set(data) - {"cpu_hour", "memory_gb_hour", "gpu_hour"}
        if unknown:
            raise ConfigError(
                "KILN_PRICES",
                f"unknown {sorted(unknown)}; allowed: cpu_hour, memory_gb_hour, gpu_hour",
            )
        gpu = data.get("gpu_hour", {})
        gpu_table = dict(gpu) if isinstance(gpu, Mapping) else {"default": gpu}
        for key, value in [
            ("cpu_hour", data.get("cpu_hour", 0.0)),
            ("memory_gb_hour", data.get("memory_gb_hour", 0.0)),
            *((f"gpu_hour.{k}", v) for k, v in gpu_table.items()),
        ]:
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ConfigError("KILN_PRICES", f"{key} is {value!r}; a price is a number >= 0")
        return cls(
            float(data.get("cpu_hour", 0.0)),
            float(data.get("memory_gb_hour", 0.0)),
            {str(k): float(v) for k, v in gpu_table.items()},
        )

    def gpu_price(self, gpu_type: str | None) -> float:
        if gpu_type and gpu_type in self.gpu_hour:
            return self.gpu_hour[gpu_type]
        return self.gpu_hour.get("default", 0.0)

    def cost(self, usage: Usage, gpu_type: str | None = None) -> float:
        """Dollars for ``usage``."""
        dollars = (
            usage.cpu_seconds * self.cpu_hour
            + usage.memory_gb_seconds * self.memory_gb_hour
            + usage.gpu_seconds * self.gpu_price(gpu_type)
        ) / 3600.0
        return dollars if math.isfinite(dollars) else 0.0

    def per_1k_requests(self, usage: Usage, gpu_type: str | None = None) -> float:
        return 0.0 if usage.requests == 0 else self.cost(usage, gpu_type) * 1000 / usage.requests


def _read_file(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            "KILN_PRICES",
            f"{str(path)!r} cannot be read ({exc.strerror}); give inline JSON or the path "
            "of a JSON or TOML file",
        ) from None
    try:
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("KILN_PRICES", f"{path}: {exc}") from None


def held(record: RunRecord) -> Usage:
    """What a run held while it ran: the CPUs, memory and GPU share it asked for, for
    its wall time (a run that asked for nothing, recorded by hand: the CPU time it
    used and its peak memory). A sweep's own run holds nothing (its runs do)."""
    if record.tags.get("kind") == "sweep":
        return Usage()
    wall = record.usage.wall_s or record.duration_s or 0.0
    asked = (record.resources or {}).get("requested") or {}
    if asked:
        cpu = float(asked.get("cpu") or 0.0) * wall
        memory_gb = float(asked.get("memory_bytes") or 0) / 1e9
        gpu = float(asked.get("gpu") or 0.0) * wall
    else:
        cpu = record.usage.cpu_s or 0.0
        memory_gb = (record.usage.peak_rss_bytes or 0) / 1e9
        gpu = 0.0
    return Usage(1, cpu, gpu, memory_gb * wall)


def gpu_type(record: RunRecord) -> str | None:
    """The type of GPU a run was given, where it says (``gpu_names`` of its placement)."""
    names = ((record.resources or {}).get("assigned") or {}).get("gpu_names")
    return str(names[0]) if isinstance(names, list) and names else None
