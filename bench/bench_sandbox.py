"""Sandbox start overhead: a warm sandboxed ``f.remote()`` against the same call unsandboxed.

Both are no-op functions on the local engine, recorded, with their worker warm (and,
sandboxed, its zygote started). The sandboxed call forks a child from the zygote,
which makes a pids cgroup and a network namespace, drops capabilities, applies
Landlock and seccomp, then loads and calls the function. Goal: < 50 ms extra
(median of 200 calls each).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import kiln

from _common import Row, emit

app = kiln.App("bench-sandbox")


@app.function(cpu=1)
def plain(x: int = 0) -> int:
    return x


@app.function(cpu=1, sandbox=True)
def sandboxed(x: int = 0) -> int:
    return x


def round_trips(call: object, n: int) -> list[float]:
    samples = []
    for i in range(n):
        t = time.perf_counter()
        call(i)  # type: ignore[operator]
        samples.append((time.perf_counter() - t) * 1000)
    return samples


def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        os.environ["KILN_HOME"] = home
        plain.remote()
        sandboxed.remote()  # the worker and its zygote start
        for _ in range(3):
            round_trips(plain.remote, 20)
            round_trips(sandboxed.remote, 20)
        base = statistics.median(round_trips(plain.remote, 200))
        boxed = statistics.median(round_trips(sandboxed.remote, 200))
        layers = kiln.runs(app="bench-sandbox", limit=1)[0].environment.sandbox
        assert layers is not None and "seccomp" in layers["layers"], layers
    extra = boxed - base
    emit(
        [
            Row(
                "sandbox",
                f"warm f.remote() sandboxed, median (ms; {extra:.1f} ms extra)",
                boxed,
                base,
                "the same call unsandboxed",
                "ms",
                "< 50 ms extra",
                extra < 50,
            )
        ]
    )


if __name__ == "__main__":
    main()
