"""Real-GPU check: NVML inventory, two gpu=0.5 runs sharing one GPU at once (both seen
by NVML), a whole-GPU run waiting for them, and sys/gpu metrics recorded."""

import dataclasses
import json
import os
import tempfile
import time

os.environ.setdefault("KILN_HOME", tempfile.mkdtemp(prefix="kiln-gpu-"))
import kiln
from kiln.compute.resources import detect_inventory

app = kiln.App("gpucheck")


def _nvml_pids() -> list[int]:
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
    return sorted(p.pid for p in procs)


@app.function(cpu=2, gpu=0.5, timeout=300)
def half(seconds: float) -> dict:
    import torch

    x = torch.randn(16384, 16384, device="cuda")  # 1 GiB held
    seen: list[list[int]] = []
    t = time.time()
    while time.time() - t < seconds:
        for _ in range(20):
            x = (x @ x) / 16384
        torch.cuda.synchronize()
        seen.append(_nvml_pids())
        kiln.log({"step_s": time.time() - t})
    return {
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
        "name": torch.cuda.get_device_name(0),
        "count": torch.cuda.device_count(),
        "nvml_pids_seen": sorted({p for s in seen for p in s}),
        "started": t,
    }


@app.function(cpu=2, gpu=1, timeout=300)
def whole() -> dict:
    import torch

    return {
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "count": torch.cuda.device_count(),
        "started": time.time(),
    }


def main() -> None:
    out: dict = {"inventory": repr(detect_inventory())}
    a, b = half.spawn(12.0), half.spawn(12.0)
    time.sleep(1.0)
    w = whole.spawn()
    ra, rb, rw = a.result(), b.result(), w.result()
    out.update(a=ra, b=rb, whole=rw)
    for name, run in (("a", a), ("b", b), ("whole", w)):
        rec = kiln.get_run(run.id)
        out[f"{name}_record"] = {
            "status": str(rec.status),
            "started": rec.started_at,
            "ended": rec.ended_at,
            "resources": rec.resources,
            "gpu_keys": sorted(k for k in rec.summary if "gpu" in k),
            "usage": {k: v for k, v in dataclasses.asdict(rec.usage).items() if "gpu" in k},
        }
    both_seen = {ra["pid"], rb["pid"]} <= set(ra["nvml_pids_seen"]) | set(rb["nvml_pids_seen"])
    overlap = (
        out["a_record"]["started"] < out["b_record"]["ended"]
        and out["b_record"]["started"] < out["a_record"]["ended"]
    )
    waited = (
        out["whole_record"]["started"]
        >= max(out["a_record"]["ended"], out["b_record"]["ended"]) - 0.5
    )
    out["checks"] = {
        "halves_overlap": overlap,
        "nvml_saw_both": both_seen,
        "whole_waited_for_halves": waited,
        "halves_on_gpu0": ra["visible"] == rb["visible"] == "0",
    }
    print(json.dumps(out, indent=1, default=str))
    with open(os.path.join(os.environ.get("OUT", "."), "gpu.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
