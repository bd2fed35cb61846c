"""The Ray engine against raw Ray on the same local Ray instance, in the same run.

- warm round trip of a no-op ``f.remote()`` on ``KILN_BACKEND=ray``, its run recorded,
  median of 200, against ``ray.get(f.remote())`` of a no-op Ray task.
- ``f.map`` over 500 no-op items, each a recorded run, against 500 raw Ray tasks.
Goal for both: at most 1.5x raw Ray's time.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from _common import Row, emit


def main() -> None:
    import ray

    with tempfile.TemporaryDirectory() as home:
        os.environ.update(KILN_HOME=home, KILN_BACKEND="ray", RAY_USAGE_STATS_ENABLED="0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        import kiln

        app = kiln.App("bench-ray")
        noop = app.function(cpu=1)(_noop)
        raw = ray.remote(num_cpus=1)(_noop)
        for _ in range(20):  # warm both: workers started, functions loaded
            ray.get(raw.remote(0))
            noop.remote(0)
        raw_rt, kiln_rt = [], []
        for i in range(200):
            t = time.perf_counter()
            ray.get(raw.remote(i))
            raw_rt.append(time.perf_counter() - t)
            t = time.perf_counter()
            noop.remote(i)
            kiln_rt.append(time.perf_counter() - t)
        n = 500
        t = time.perf_counter()
        ray.get([raw.remote(i) for i in range(n)])
        raw_map = time.perf_counter() - t
        t = time.perf_counter()
        noop.map(range(n))
        kiln_map = time.perf_counter() - t
        assert len(kiln.runs(app="bench-ray", limit=None)) == 20 + 200 + n
        from kiln._engine import close_engines
        from kiln.record.recorder import close_all

        close_engines()  # before the store's folder goes
        close_all()
    k_ms, r_ms = statistics.median(kiln_rt) * 1000, statistics.median(raw_rt) * 1000
    emit([
        Row("ray", "warm f.remote() round trip on Ray, recorded, median (ms)", k_ms, r_ms,
            "ray.get(f.remote()) of a no-op task", "ms", "<= 1.5x raw Ray", k_ms <= 1.5 * r_ms),
        Row("ray", f"f.map over {n} no-op items on Ray, recorded (runs/s)", n / kiln_map,
            n / raw_map, "raw Ray tasks, same items", "runs/s", ">= 1/1.5 of raw Ray",
            kiln_map <= 1.5 * raw_map),
    ])  # fmt: skip


def _noop(x: int = 0) -> int:
    return x


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
