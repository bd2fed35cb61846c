"""Admission to queues with quotas (kiln.govern.admission): 10,000 pending workloads
across 20 queues in 4 cohorts.

Every workload is submitted (each queue's nominal quota and what its cohort lends
admit some at once), then admitted ones finish one at a time, oldest first, until all
have run. Decisions/s = admissions and preemptions per second. Baseline: a naive loop
that admits each queue's FIFO head while its queue has nominal quota left (no cohorts,
no borrowing, no priorities, no preemption). Goal: >= 20,000 decisions/s.

And the latency admission adds to a warm ``f.remote()`` on the local engine when a
team server admits it (``KILN_POOL``, a real ``kiln server`` with tokens on SQLite):
the same calls recorded through the same server without a pool are the baseline.
Goal: under 2 ms added.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import deque
from pathlib import Path

from kiln.govern.admission import Admission, Admit, Finish, Preempt, Queue, Submit, Workload

from _common import Row, emit

N = 10_000
QUEUES = [Queue(f"q{i}", {"cpu": 16_000, "memory": 65_536, "gpu": 2_000}, f"c{i % 4}",
                borrowing_limit={"cpu": 8_000, "gpu": 1_000}, weight=1 + i % 2,
                fair_sharing=True) for i in range(20)]  # fmt: skip
SHAPES = [
    {"cpu": 1_000, "memory": 2_048},
    {"cpu": 2_000, "memory": 4_096, "gpu": 250},
    {"cpu": 4_000, "memory": 8_192, "gpu": 500},
    {"cpu": 8_000, "memory": 16_384, "gpu": 1_000},
]


def workloads() -> list[Workload]:
    rng = random.Random(0)
    return [Workload(f"w{i}", f"q{rng.randrange(20)}", rng.choice(SHAPES),
                     priority=rng.choice([0, 0, 1]), agent=rng.random() < 0.3)
            for i in range(N)]  # fmt: skip


def kiln_rate(work: list[Workload]) -> tuple[float, int]:
    a = Admission(QUEUES)
    running: deque[str] = deque()
    decisions = preempted = 0
    t = time.perf_counter()

    def apply(made: list[Admit | Preempt]) -> None:
        nonlocal decisions, preempted
        decisions += len(made)
        for d in made:
            if isinstance(d, Admit):
                running.append(d.id)
            else:
                preempted += 1

    for w in work:
        apply(a.handle(Submit(w)))
    while running:
        wid = running.popleft()
        if wid in a.admitted:  # not preempted since
            apply(a.handle(Finish(wid)))
    elapsed = time.perf_counter() - t
    assert not a.admitted and not any(a.pending.values())
    return decisions / elapsed, preempted


def naive_rate(work: list[Workload]) -> float:
    free = {q.name: dict(q.nominal) for q in QUEUES}
    queues: dict[str, deque[Workload]] = {q.name: deque() for q in QUEUES}
    running: deque[Workload] = deque()
    admitted = 0

    def admit(name: str) -> None:
        nonlocal admitted
        queue, left = queues[name], free[name]
        while queue and all(left.get(r, 0) >= n for r, n in queue[0].requests.items()):
            w = queue.popleft()
            for r, n in w.requests.items():
                left[r] -= n
            running.append(w)
            admitted += 1

    t = time.perf_counter()
    for w in work:
        queues[w.queue].append(w)
        admit(w.queue)
    while running:
        w = running.popleft()
        for r, n in w.requests.items():
            free[w.queue][r] += n
        admit(w.queue)
    elapsed = time.perf_counter() - t
    assert admitted == N
    return admitted / elapsed


CALLS = textwrap.dedent(
    """
    import json, statistics, sys, time
    import kiln

    app = kiln.App("bench-admission")

    @app.function(cpu=0.1, timeout=60, sys_metrics=False)
    def noop(i):
        return i

    for i in range(30):  # warm: the worker, the connections
        noop.remote(i)
    times = []
    for i in range(int(sys.argv[1])):
        t = time.perf_counter()
        noop.remote(i)
        times.append(time.perf_counter() - t)
    print(json.dumps(statistics.median(times)))
    """
)


def remote_latency(url: str, token: str, home: Path, pool: str | None, calls: int) -> float:
    env = {**os.environ, "KILN_SERVER": url, "KILN_TOKEN": token, "KILN_HOME": str(home)}
    env.pop("KILN_POOL", None)
    if pool:
        env["KILN_POOL"] = pool
    out = subprocess.run([sys.executable, "-c", CALLS, str(calls)], env=env, check=True,
                         capture_output=True, text=True, timeout=600).stdout  # fmt: skip
    return float(out.strip().splitlines()[-1])


def server_latency(calls: int = 300, rounds: int = 3) -> tuple[float, float]:
    """Median f.remote() seconds without and with admission by the server."""
    import httpx

    from bench_server import start_server

    with tempfile.TemporaryDirectory(prefix="kiln-bench-admission-") as tmp:
        proc, found = start_server(Path(tmp) / "server", auth=True)
        url, token = found.split()
        try:
            auth = {"Authorization": f"Bearer {token}"}
            httpx.put(f"{url}/api/v1/pools/bench", json={"cpu": 64}, headers=auth)
            httpx.put(f"{url}/api/v1/queues/bench", json={"cpu": 64}, headers=auth)
            plain, gated = [], []
            for _ in range(rounds):  # alternated: the machine's noise falls on both
                plain.append(remote_latency(url, token, Path(tmp) / "a", None, calls))
                gated.append(remote_latency(url, token, Path(tmp) / "b", "bench", calls))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return statistics.median(plain), statistics.median(gated)


def main() -> None:
    work = workloads()
    kiln, preempted = kiln_rate(work)
    naive = naive_rate(work)
    plain, gated = server_latency()
    added_ms = (gated - plain) * 1000
    emit([
        Row("admission", f"{N:,} workloads, 20 queues in 4 cohorts ({preempted} preempted) "
            "(decisions/s)", kiln, naive, "naive FIFO per queue within nominal quota",
            "decisions/s", ">= 20,000 decisions/s", kiln >= 20_000),
        Row("admission", f"warm f.remote() admitted by the server (adds {added_ms:.2f} ms)",
            gated * 1000, plain * 1000, "the same call through the same server, no pool",
            "ms", "< 2 ms added", added_ms < 2.0),
    ])  # fmt: skip


if __name__ == "__main__":
    main()
