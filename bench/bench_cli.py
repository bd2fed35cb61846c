"""How fast the ``kiln`` command starts, against ``python -c "import typer, rich.console"``.

Goals: ``kiln --help`` within 1.3x of the baseline; ``kiln runs ls -n 10`` on a
store of 20 runs under 0.5 s. Samples of each command and the baseline are
taken in turn, so that a busy spell of the machine falls on all of them.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Row, emit

BASELINE = [sys.executable, "-c", "import typer, rich.console"]
KILN = [sys.executable, "-m", "kiln"]


def wall_s(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def small_store(home: Path) -> None:
    code = (
        "import kiln\n"
        "app = kiln.App('bench-cli')\n"
        "for i in range(20):\n"
        "    with app.run(params={'lr': 0.01 * i, 'batch': 32}):\n"
        "        kiln.log({'loss': 1 / (i + 1), 'accuracy': 0.5 + i / 50})\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "KILN_HOME": str(home)}
    )


def main(rounds: int = 15) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / ".kiln"
        small_store(home)
        env = {**os.environ, "KILN_HOME": str(home), "COLUMNS": "120"}
        commands = {
            "base": BASELINE,
            "help": [*KILN, "--help"],
            "ls": [*KILN, "runs", "ls", "-n", "10"],
        }
        for argv in commands.values():  # warm the file cache and the bytecode
            wall_s(argv, env)
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(rounds):
            for name, argv in commands.items():
                samples[name].append(wall_s(argv, env))
    base, help_s, ls_s = (statistics.median(samples[n]) for n in ("base", "help", "ls"))
    baseline = "python -c 'import typer, rich.console'"
    emit(
        [
            Row(
                "cli",
                "kiln --help (s)",
                help_s,
                base,
                baseline,
                "s",
                "<= 1.3x",
                help_s <= 1.3 * base,
            ),
            Row(
                "cli",
                "kiln runs ls -n 10, 20 runs (s)",
                ls_s,
                base,
                baseline,
                "s",
                "< 0.5 s",
                ls_s < 0.5,
            ),
        ]
    )


if __name__ == "__main__":
    main()
