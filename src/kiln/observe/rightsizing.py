"""Right-sizing: what a run asked for against what it used, said plainly.

From a run's record alone (its requested resources and its usage, see
:class:`kiln.record.model.Usage`): CPU efficiency is CPU seconds over wall time times
the CPUs requested; memory is the peak against the request; GPU utilisation and GPU
memory peak against the share requested. A run asked for much more than it used
when it used under half of it, and for too little when it used more than it asked.
:func:`summarize` sums runs (a sweep, an app) so requests can be shrunk to fit more
experiments on the same hardware.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from kiln.record.model import RunRecord

TOO_SHORT_S = 1.0  # a shorter run says too little about what it needs
WASTE = 0.5  # used under half of what it asked: ask for less
MARGIN = 1.25  # what to ask for: the peak or mean used, plus a quarter
GIB = 2**30


@dataclass(frozen=True, slots=True)
class Fit:
    """One run's requests against its use; ``advice`` in sentences, empty if it fits."""

    run_id: str
    wall_s: float | None
    cpu_requested: float | None
    cpu_used: float | None  # CPUs busy on average over the run
    cpu_efficiency: float | None  # cpu_used / cpu_requested
    memory_requested_bytes: int | None
    memory_peak_bytes: int | None
    swap_bytes: float | None  # the machine's swap in + out during the run
    major_faults: int | None
    gpu_requested: float | None
    gpu_utilization: float | None  # percent, mean over samples
    gpu_memory_peak_bytes: int | None
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit(record: RunRecord) -> Fit:
    """How ``record``'s requests fit what it used."""
    u = record.usage
    requested = (record.resources or {}).get("requested") or {}
    cpu_req = _number(requested.get("cpu"))
    mem_req = _number(requested.get("memory_bytes"))
    gpu_req = _number(requested.get("gpu"))
    wall = u.wall_s
    cpu_used = None  # the kernel's count first (it holds children that ended between samples)
    if u.cpu_s is not None and wall:
        cpu_used = u.cpu_s / wall
    elif u.cpu_cores_mean is not None:
        cpu_used = u.cpu_cores_mean
    swap = None
    if u.swap_in_bytes is not None or u.swap_out_bytes is not None:
        swap = (u.swap_in_bytes or 0) + (u.swap_out_bytes or 0)
    found = Fit(
        run_id=record.id, wall_s=wall, cpu_requested=cpu_req, cpu_used=_round(cpu_used),
        cpu_efficiency=_round(cpu_used / cpu_req) if cpu_used is not None and cpu_req else None,
        memory_requested_bytes=int(mem_req) if mem_req else None,
        memory_peak_bytes=u.peak_rss_bytes, swap_bytes=swap, major_faults=u.major_faults,
        gpu_requested=gpu_req or None, gpu_utilization=u.gpu_utilization_mean,
        gpu_memory_peak_bytes=u.gpu_memory_peak_bytes,
    )  # fmt: skip
    found.advice.extend(_advice(found))
    return found


def _advice(f: Fit) -> list[str]:
    if f.wall_s is None or f.wall_s < TOO_SHORT_S:
        return []
    said = [*_cpu(f), *_memory(f)]
    if f.swap_bytes:
        said.append(f"the machine swapped {_bytes(int(f.swap_bytes))} while it ran: memory "
                    "was short, and time spent waiting on disk looks like slow code")  # fmt: skip
    return said + _gpu(f)


def _cpu(f: Fit) -> list[str]:
    if not f.cpu_requested or f.cpu_used is None:
        return []
    used = f"asked {f.cpu_requested:g} CPUs, used {f.cpu_used:.2g} on average"
    ask = max(1, math.ceil(f.cpu_used * MARGIN))
    if f.cpu_used < WASTE * f.cpu_requested and ask < f.cpu_requested:
        return [f"{used}: cpu={ask} would do"]
    if f.cpu_used > MARGIN * f.cpu_requested:
        return [f"{used}: its threads compete with other runs for cores; ask for "
                f"cpu={math.ceil(f.cpu_used)}"]  # fmt: skip
    return []


def _memory(f: Fit) -> list[str]:
    if not f.memory_peak_bytes:
        return []
    peak = _bytes(f.memory_peak_bytes)
    if f.memory_requested_bytes:
        of = f"peak {peak} of {_bytes(f.memory_requested_bytes)} asked"
        if f.memory_peak_bytes > f.memory_requested_bytes:
            return [f"{of}: it used more than it asked, and can be killed or swap where "
                    "memory is short"]  # fmt: skip
        if f.memory_peak_bytes < WASTE * f.memory_requested_bytes:
            return [f"{of}: memory={_bytes(int(f.memory_peak_bytes * MARGIN))!r} would do"]
    elif f.cpu_requested is not None and f.memory_peak_bytes > GIB:  # none declared
        return [f"no memory asked, peak {peak}: declare memory= so that runs are not "
                "packed beyond the machine"]  # fmt: skip
    return []


def _gpu(f: Fit) -> list[str]:
    if not f.gpu_requested:
        return []
    if f.gpu_utilization is None:
        return [f"asked {f.gpu_requested:g} GPU but no GPU figures were sampled (NVML not "
                "available: pip install 'kiln[gpu]', or no driver)"]  # fmt: skip
    if f.gpu_utilization < 100 * WASTE * min(1.0, f.gpu_requested):
        return [f"asked {f.gpu_requested:g} GPU, the device was busy "
                f"{f.gpu_utilization:.0f}% of the time on average"]  # fmt: skip
    return []


def summarize(fits: list[Fit]) -> dict[str, Any]:
    """Sums over runs: CPU and GPU asked against used (in CPU- and GPU-seconds), the
    largest memory peak against the largest request, and the runs given advice."""
    timed = [f for f in fits if f.wall_s]
    cpu_asked = sum((f.cpu_requested or 0) * (f.wall_s or 0) for f in timed)
    cpu_used = sum((f.cpu_used or 0) * (f.wall_s or 0) for f in timed)
    peaks = [f.memory_peak_bytes for f in fits if f.memory_peak_bytes]
    asked = [f.memory_requested_bytes for f in fits if f.memory_requested_bytes]
    gpu = [f for f in timed if f.gpu_requested and f.gpu_utilization is not None]
    return {
        "runs": len(fits),
        "cpu_seconds_asked": round(cpu_asked, 3),
        "cpu_seconds_used": round(cpu_used, 3),
        "cpu_efficiency": round(cpu_used / cpu_asked, 4) if cpu_asked else None,
        "memory_peak_max_bytes": max(peaks) if peaks else None,
        "memory_asked_max_bytes": max(asked) if asked else None,
        "gpu_utilization_mean": (
            round(sum(f.gpu_utilization or 0 for f in gpu) / len(gpu), 2) if gpu else None
        ),
        "runs_with_advice": sum(1 for f in fits if f.advice),
    }


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _bytes(n: int) -> str:
    if n >= GIB:
        return f"{n / GIB:.1f}Gi"
    return f"{n / 2**20:.0f}Mi"
