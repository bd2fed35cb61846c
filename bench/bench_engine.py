"""The local engine against ProcessPoolExecutor on the same machine, in the same run.

- warm round trip of a no-op ``f.remote()`` including its run record, median and p99
  of 1,000 calls, against ``ProcessPoolExecutor.submit().result()``. Goal: < 2 ms median.
- ``f.map`` over 2,000 no-op items, each a recorded run, against
  ``ProcessPoolExecutor`` over the same items. Goal: >= 1,000 recorded runs/s.
- cold first call (engine and worker start) against spawning ``python -c pass``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import kiln

from _common import Row, emit

app = kiln.App("bench")


@app.function(cpu=1)
def noop(x: int = 0) -> int:
    return x


def plain_noop(x: int = 0) -> int:
    return x


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def round_trips(call: object, n: int = 1000) -> list[float]:
    samples = []
    for i in range(n):
        t = time.perf_counter()
        call(i)  # type: ignore[operator]
        samples.append((time.perf_counter() - t) * 1000)
    return samples


def cold_ms(home: str) -> float:
    """A new process's first call against an existing store: engine and worker start."""
    subprocess.run(
        [sys.executable, "-c", "import kiln\nwith kiln.App('cold').run(): pass"],
        check=True,
        env={**os.environ, "KILN_HOME": home},
    )
    code = (
        "import time, kiln\n"
        "app = kiln.App('cold')\n"
        "@app.function()\n"
        "def f():\n    return 1\n"
        "t = time.perf_counter(); f.remote(); print((time.perf_counter() - t) * 1000)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KILN_HOME": home},
    )
    return float(out.stdout.strip())


def spawn_ms() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return (time.perf_counter() - t) * 1000


def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        os.environ["KILN_HOME"] = home
        cpus = len(os.sched_getaffinity(0))
        with ProcessPoolExecutor(cpus) as pool:
            pool.submit(plain_noop).result()
            pool_rtt = round_trips(lambda i: pool.submit(plain_noop, i).result())
            t = time.perf_counter()
            futures = [pool.submit(plain_noop, i) for i in range(2000)]
            [f.result() for f in futures]
            pool_rate = 2000 / (time.perf_counter() - t)
        noop.remote()  # start the engine and a worker
        kiln_rtt = round_trips(noop.remote)
        list(noop.map(range(50)))  # every worker warm
        t = time.perf_counter()
        results = list(noop.map(range(2000)))
        kiln_rate = 2000 / (time.perf_counter() - t)
        assert results == list(range(2000))
        recorded = kiln.runs(app="bench", status="succeeded", limit=None)
        assert len(recorded) == 1 + 1000 + 50 + 2000, len(recorded)
        colds = [cold_ms(tempfile.mkdtemp(dir=home)) for _ in range(3)]
        spawns = [spawn_ms() for _ in range(10)]

    median_k, median_p = statistics.median(kiln_rtt), statistics.median(pool_rtt)
    p99_k, p99_p = percentile(kiln_rtt, 0.99), percentile(pool_rtt, 0.99)
    cold, spawn = statistics.median(colds), statistics.median(spawns)
    base = "ProcessPoolExecutor submit().result()"
    emit(
        [
            Row(
                "engine",
                "warm f.remote() round trip, recorded, median (ms)",
                median_k,
                median_p,
                base,
                "ms",
                "< 2 ms",
                median_k < 2,
            ),
            Row(
                "engine",
                "warm f.remote() round trip, recorded, p99 (ms)",
                p99_k,
                p99_p,
                base,
                "ms",
                "-",
                True,
            ),
            Row(
                "engine",
                "f.map over 2,000 no-op items, recorded (runs/s)",
                kiln_rate,
                pool_rate,
                f"ProcessPoolExecutor({cpus}) submit all + result",
                "runs/s",
                ">= 1,000 runs/s",
                kiln_rate >= 1000,
            ),
            Row(
                "engine",
                "cold first f.remote(): engine + worker start (ms)",
                cold,
                spawn,
                "spawn python -c pass",
                "ms",
                "-",
                True,
            ),
        ]
    )


if __name__ == "__main__":
    main()
