"""Seeing inside runs: what the system-metrics sampler and the output capture cost.

Sampler: a CPU-bound function (a pure-Python loop of fixed length, about 2 s here) run on
the local engine with ``sys_metrics`` on, against the same function with it off, in
the same script, alternating, medians of 5. Goal: under 1% slower.

Output capture: a function on the local engine writes 256 MiB of 100-byte lines to
its stdout, which the worker's capture reads and passes on (here to /dev/null, where
the driver's stdout points) and records (the first 16 MiB: the rest is counted); the
baseline writes the same lines, in the same worker, to the descriptor the capture
passes them on to, uncaptured. Goals: at least 50 MB/s, and the run no more than 5%
slower than the baseline.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

from _common import Row, emit

ROUNDS = 5
SPIN_EACH = 40_000  # loop steps between two 64 KiB writes: about 50 MB/s of output here
SCRIPT = textwrap.dedent(
    """
    import os, sys, time, kiln
    from kiln.record.output import FdTee

    app = kiln.App("bench-observe")
    LOOPS = 60_000_000
    LINE = b"x" * 99 + b"\\n"
    MIB = 256

    def spin():
        t = time.perf_counter()
        n = 0
        for i in range(LOOPS):
            n += i & 7
        return time.perf_counter() - t

    @app.function()
    def sampled():
        return spin()

    @app.function(sys_metrics=False)
    def unsampled():
        return spin()

    def write(fd, spin_each=0):
        block = LINE * ((1 << 16) // len(LINE))  # what a buffered stdout writes at once
        n = MIB * (1 << 20) // len(block)
        t = time.perf_counter()
        for _ in range(n):
            k = 0
            for i in range(spin_each):  # the run's own work between two writes
                k += i & 7
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view):]
        return time.perf_counter() - t, n * len(block)

    SPIN = int(sys.argv[4])

    @app.function(sys_metrics=False)
    def captured():
        return write(1, SPIN)

    @app.function(sys_metrics=False)
    def uncaptured():
        saved = FdTee.installed()._pipes[1][1]  # where the capture passes output on
        return write(saved, SPIN)

    which = sys.argv[1]
    fn = {"sampler": (sampled, unsampled), "capture": (captured, uncaptured)}[which]
    fn[0].remote(); fn[1].remote()  # warm workers
    on, off = [], []
    for _ in range(int(sys.argv[2])):
        on.append(fn[0].remote())
        off.append(fn[1].remote())
    with open(sys.argv[3], "w") as out:
        out.write(repr((on, off)))
    """
)


def measure(which: str, work: str, spin: int = 0) -> tuple[list, list]:  # type: ignore[type-arg]
    env = {**os.environ, "KILN_HOME": os.path.join(work, which)}
    found = os.path.join(work, f"{which}.out")
    with open(os.path.join(work, f"{which}.err"), "w+") as err:
        done = subprocess.run([sys.executable, "-c", SCRIPT, which, str(ROUNDS), found, str(spin)],
                              env=env, stdout=subprocess.DEVNULL, stderr=err, check=False,
                              cwd=work)  # fmt: skip
        if done.returncode != 0:
            err.seek(0)
            raise SystemExit(err.read()[-3000:])
    import ast

    with open(found) as f:
        return ast.literal_eval(f.read())  # type: ignore[no-any-return]


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        on, off = measure("sampler", work)
        s_on, s_off = statistics.median(on), statistics.median(off)
        on, off = measure("capture", work)  # output only: how fast the capture goes
        c_on = statistics.median(t for t, _ in on)
        c_off = statistics.median(t for t, _ in off)
        size = on[0][1]
        # a run that works between its writes, printing about 50 MB a second
        on, off = measure("capture", work, SPIN_EACH)
        m_on = statistics.median(t for t, _ in on)
        m_off = statistics.median(t for t, _ in off)
    rate = size / c_on / 1e6
    emit([
        Row("observe", "CPU-bound run, ~2 s, sys metrics on (s)", s_on, s_off,
            "the same run with sys_metrics=False", "s", "< 1.01x", s_on < 1.01 * s_off),
        Row("observe", "256 MiB of output, captured and recorded (MB/s)", rate,
            size / c_off / 1e6, "the same writes to the same place, uncaptured", "MB/s",
            ">= 50 MB/s", rate >= 50),
        Row("observe", f"a run printing {size / m_off / 1e6:.0f} MB/s as it works, captured (s)",
            m_on, m_off, "the same run, its writes to the same place, uncaptured", "s",
            "<= 1.05x", m_on <= 1.05 * m_off),
    ])  # fmt: skip


if __name__ == "__main__":
    main()
