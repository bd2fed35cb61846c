"""``python -c "import kiln"`` against ``python -c "pass"``. Goal: under 150 ms."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from _common import Row, emit


def wall_ms(code: str, n: int = 15) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples)


def main() -> None:
    wall_ms("import kiln", 2)  # warm the file cache
    base = wall_ms("pass")
    kiln_ms = wall_ms("import kiln")
    emit(
        [
            Row(
                "import",
                "python -c 'import kiln' (ms)",
                kiln_ms,
                base,
                "python -c 'pass'",
                "ms",
                "< 150 ms",
                kiln_ms < 150,
            )
        ]
    )


if __name__ == "__main__":
    main()
