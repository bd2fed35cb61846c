"""Functions the shared-hardware tests run in driver processes of their own (one per
project, as on a team: each driver with its project's token and KILN_POOL)."""

from __future__ import annotations

import json
import sys
import time

import kiln

app = kiln.App("quota")


def count(steps: int) -> dict[str, int]:
    """Counts to ``steps``, 0.1 s a step; preempted, it saves where it was and resumes
    from there on its next attempt."""
    start = kiln.checkpoint(default={"step": 0})["step"]
    done = start
    try:
        for step in range(start, steps):
            time.sleep(0.1)
            done = step + 1
    except kiln.Preempted:
        kiln.save("checkpoint", {"step": done})
        raise
    return {"resumed_from": start, "steps": done}


train = app.function(gpu=1, timeout=300)(count)
train_cpu = app.function(cpu=1, timeout=300)(count)


def done() -> str:
    return "done"


quick = app.function(gpu=1, timeout=60)(done)
quick_cpu = app.function(cpu=1, timeout=60)(done)


@app.function(cpu=1, timeout=3600)
def costly(i: int) -> int:
    time.sleep(2)  # the sweep's runs overlap
    return i


@app.function(cpu=1)
def untimed() -> int:
    return 1


if __name__ == "__main__":
    what = sys.argv[1]
    if what.startswith("train"):  # two runs; the ids first (a line), then the results
        fn = train if what == "train" else train_cpu
        runs = [fn.spawn(int(sys.argv[2])) for _ in range(2)]
        print(json.dumps([r.id for r in runs]), flush=True)
        print(json.dumps([r.result() for r in runs]), flush=True)
    elif what.startswith("quick"):
        print(json.dumps((quick if what == "quick" else quick_cpu).remote()), flush=True)
    elif what == "sweep":  # an agent's sweep of costly runs, all at once
        ended = []
        for run in [costly.spawn(i) for i in range(int(sys.argv[2]))]:
            try:
                run.result()
                ended.append({"id": run.id, "status": "succeeded"})
            except kiln.RunFailed as exc:
                ended.append({"id": run.id, "status": exc.status, "cause": exc.cause})
        print(json.dumps(ended), flush=True)
    elif what == "untimed":
        try:
            untimed.spawn().result()
            print(json.dumps({"status": "succeeded"}), flush=True)
        except kiln.RunFailed as exc:
            print(json.dumps({"status": exc.status, "cause": exc.cause}), flush=True)
