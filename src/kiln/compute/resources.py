"""Resource requests and the machine's inventory.

A request is ``cpu`` cores (float), ``memory`` bytes and ``gpu``: 0, a fraction of
one device below 1 (0.25, 0.5 …), or a whole number of devices.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from kiln._units import parse_memory as parse_memory  # re-exported: the CLI's quotas
from kiln.errors import ValidationError

_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Resources:
    """What one task needs while it runs."""

    cpu: float = 1.0
    memory_bytes: int = 0
    gpu: float = 0.0

    @classmethod
    def parse(cls, *, cpu: float = 1.0, memory: int | str = 0, gpu: float = 0) -> Resources:
        if isinstance(cpu, bool) or not isinstance(cpu, int | float) or not math.isfinite(cpu):
            raise ValidationError("cpu", f"{cpu!r} is not a number of cores")
        if cpu < 0:
            raise ValidationError("cpu", f"{cpu} is negative", allowed="0 or more cores")
        if isinstance(gpu, bool) or not isinstance(gpu, int | float) or not math.isfinite(gpu):
            raise ValidationError("gpu", f"{gpu!r} is not a GPU count")
        if gpu < 0 or (gpu > 1 and gpu != int(gpu)):
            raise ValidationError(
                "gpu",
                f"{gpu} cannot be scheduled",
                allowed="0, a fraction of one GPU below 1 (0.25, 0.5), or a whole number of GPUs",
            )
        return cls(cpu=float(cpu), memory_bytes=parse_memory(memory), gpu=float(gpu))

    def to_json(self) -> dict[str, float | int]:
        return {"cpu": self.cpu, "memory_bytes": self.memory_bytes, "gpu": self.gpu}


@dataclass(frozen=True, slots=True)
class Inventory:
    """What the machine has: cores, memory and GPUs (by index).

    A cluster's inventory is its totals plus its ``nodes``: a task runs on one node,
    so a request must fit one of them.
    """

    cpu: float
    memory_bytes: int
    gpus: tuple[int, ...] = field(default=())
    gpu_names: tuple[str, ...] = field(default=())
    nodes: tuple[Inventory, ...] = field(default=())

    def check(self, request: Resources) -> None:
        """Raise if ``request`` could never fit this machine (or any one node), naming the field."""
        if not self.nodes:
            self._check(request, "the machine has")
            return
        errors = []
        for node in self.nodes:
            try:
                node._check(request, "the largest node has")
            except ValidationError as exc:
                errors.append(exc)
            else:
                return
        largest = Inventory(
            cpu=max(n.cpu for n in self.nodes),
            memory_bytes=max(n.memory_bytes for n in self.nodes),
            gpus=max((n.gpus for n in self.nodes), key=len),
        )
        largest._check(request, "the largest node has")
        raise ValidationError(
            errors[0].field, f"no single node has all that is requested: {errors[0]}"
        )

    def _check(self, request: Resources, has: str) -> None:
        if request.cpu > self.cpu + _EPS:
            raise ValidationError("cpu", f"{request.cpu:g} cores requested, {has} {self.cpu:g}")
        if request.memory_bytes > self.memory_bytes:
            raise ValidationError(
                "memory",
                f"{request.memory_bytes / 2**30:.1f} GiB requested, "
                f"{has} {self.memory_bytes / 2**30:.1f} GiB",
            )
        if request.gpu > len(self.gpus) + _EPS:
            hint = (
                " (set KILN_GPUS=N to declare virtual GPUs)"
                if not self.gpus and has == "the machine has"
                else ""
            )
            raise ValidationError(
                "gpu", f"{request.gpu:g} GPUs requested, {has} {len(self.gpus)}{hint}"
            )


def detect_inventory(environ: Mapping[str, str] | None = None) -> Inventory:
    """Cores and memory from the OS; GPUs from ``KILN_GPUS`` if set, else NVML if present."""
    env = os.environ if environ is None else environ
    cpu = float(
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    declared = env.get("KILN_GPUS")
    if declared is not None:
        if not declared.isdigit():
            raise ValidationError("KILN_GPUS", f"{declared!r} is not a count of GPUs")
        n = int(declared)
        return Inventory(cpu, memory, tuple(range(n)), tuple(f"virtual-{i}" for i in range(n)))
    names = _nvml_gpus()
    return Inventory(cpu, memory, tuple(range(len(names))), tuple(names))


def _nvml_gpus() -> list[str]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver: no GPUs
        return []
    try:
        count = pynvml.nvmlDeviceGetCount()
        return [
            str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)))
            for i in range(count)
        ]
    finally:
        pynvml.nvmlShutdown()
