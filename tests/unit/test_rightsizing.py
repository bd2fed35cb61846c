"""Right-sizing from a run's record alone, and which GPUs the sampler reads."""

from __future__ import annotations

from typing import Any

from kiln.observe.rightsizing import fit, summarize
from kiln.observe.sysmetrics import _visible, interval_s
from kiln.record.model import RunRecord, RunStatus, Usage
from kiln.record.store.rows import RunRow

GIB = 2**30


def record(usage: dict[str, Any], requested: dict[str, Any] | None = None) -> RunRecord:
    from kiln.record.model import record_from_row

    row = RunRow(
        id="a" * 32,
        app="fit",
        status=RunStatus.SUCCEEDED,
        created_at=1.0,
        usage=usage,
        resources={"requested": requested} if requested else None,
    )
    columns = {**row.columns(), "status": "succeeded"}
    return record_from_row(columns, {}, (), None, None)  # fmt: skip


def test_a_run_that_asked_four_cpus_and_used_one_is_told_so() -> None:
    found = fit(record({"wall_s": 100.0, "cpu_s": 90.0, "cpu_cores_mean": 0.9,
                        "peak_rss_bytes": int(1.2 * GIB)},
                       {"cpu": 4, "memory_bytes": 8 * GIB, "gpu": 0}))  # fmt: skip
    assert found.cpu_used == 0.9 and found.cpu_efficiency == 0.225
    assert "asked 4 CPUs, used 0.9 on average: cpu=2 would do" in found.advice
    assert "peak 1.2Gi of 8.0Gi asked: memory='1.5Gi' would do" in found.advice


def test_more_than_asked_swap_and_an_idle_gpu_are_said() -> None:
    found = fit(record({"wall_s": 60.0, "cpu_s": 180.0, "peak_rss_bytes": 3 * GIB,
                        "swap_in_bytes": 2 * GIB, "swap_out_bytes": 0,
                        "gpu_utilization_mean": 12.0, "gpu_memory_peak_bytes": GIB},
                       {"cpu": 2, "memory_bytes": 2 * GIB, "gpu": 0.5}))  # fmt: skip
    said = " | ".join(found.advice)
    assert "used 3 on average: its threads compete" in said and "cpu=3" in said
    assert "peak 3.0Gi of 2.0Gi asked: it used more than it asked" in said
    assert "the machine swapped 2.0Gi while it ran" in said
    assert "asked 0.5 GPU, the device was busy 12% of the time" in said


def test_a_gpu_run_without_figures_says_why_and_a_short_run_says_nothing() -> None:
    blind = fit(record({"wall_s": 30.0, "cpu_s": 30.0}, {"cpu": 1, "gpu": 1}))
    assert any("no GPU figures were sampled" in a for a in blind.advice)
    short = fit(record({"wall_s": 0.2, "cpu_s": 0.01}, {"cpu": 8, "memory_bytes": 64 * GIB}))
    assert short.advice == [] and short.cpu_requested == 8  # too short to judge


def test_usage_sums_cpu_seconds_asked_and_used() -> None:
    runs = [fit(record({"wall_s": 10.0, "cpu_s": 10.0}, {"cpu": 2})),
            fit(record({"wall_s": 30.0, "cpu_s": 15.0}, {"cpu": 1}))]  # fmt: skip
    total = summarize(runs)
    assert total["cpu_seconds_asked"] == 50.0 and total["cpu_seconds_used"] == 25.0
    assert total["cpu_efficiency"] == 0.5 and total["runs"] == 2


def test_a_usage_of_a_newer_kiln_reads_back() -> None:
    found = record({"wall_s": 1.0, "some_future_figure": 3})
    assert found.usage == Usage(wall_s=1.0)


def test_the_sampler_reads_the_gpus_cuda_names() -> None:
    assert _visible(None, 2) == [0, 1]
    assert _visible("1", 2) == [1]
    assert _visible("GPU-0a1b,0", 2) == ["GPU-0a1b", 0]
    assert _visible("0,7,1", 2) == [0]  # CUDA stops at the first it cannot use
    assert _visible("", 4) == []


def test_the_sampling_interval_widens_with_age_up_to_half_a_minute() -> None:
    assert interval_s(0) == interval_s(50) == 1.0
    assert interval_s(300) == 6.0
    assert interval_s(3600) == 30.0
