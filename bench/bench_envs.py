"""Environments: warm reuse and cold build, against uv itself and a call without env.

- warm reuse: ``f.remote()`` whose env is already built (warm worker), against the same
  no-op call without env, median of 300. Goal: under 20 ms extra.
- cold build of requests + pydantic: Kiln's whole path for a declaration it has never
  seen (resolve to a hashed lock, venv, sync from the lock) in an existing KILN_HOME
  (the env, its declaration and its lock blob are deleted before each build), against
  ``uv venv && uv pip install`` of the same set, alternating, both on the same warm uv
  cache, both compiling bytecode (Kiln does, so workers and replicas start fast).
  Goal: at most 1.2x uv.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uv

import kiln
from kiln.envs.manager import EnvManager
from kiln.record.blobs import FileBlobStore

from _common import Row, emit

app = kiln.App("bench-envs")
SIX = kiln.Env(packages=["six==1.16.0"])
PACKAGES = ["requests", "pydantic"]


@app.function(env=SIX)
def in_env() -> int:
    return 1


@app.function()
def no_env() -> int:
    return 1


def median_ms(fn: object, n: int = 300) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples)


def kiln_build(manager: EnvManager) -> float:
    t = time.perf_counter()
    built = manager.ensure(kiln.Env(packages=PACKAGES))
    elapsed = time.perf_counter() - t
    assert built.resolved and built.built
    # forget it entirely, so that the next build starts from nothing again
    shutil.rmtree(built.path)
    shutil.rmtree(manager.root / "declarations")
    manager.blobs.path(built.lock_sha256).unlink()
    return elapsed


def uv_build(base: Path) -> float:
    target = Path(tempfile.mkdtemp(dir=base)) / "venv"
    exe = uv.find_uv_bin()
    t = time.perf_counter()
    subprocess.run([exe, "venv", "--quiet", "--python", sys.executable, str(target)], check=True)
    python = str(target / "bin" / "python")
    subprocess.run(
        [exe, "pip", "install", "--quiet", "--compile-bytecode", "--python", python, *PACKAGES],
        check=True,
    )
    return time.perf_counter() - t


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        os.environ["KILN_HOME"] = str(base / "home")
        in_env.remote()
        no_env.remote()
        warm_env, warm_plain = median_ms(in_env.remote), median_ms(no_env.remote)
        uv_build(base)  # warm uv's cache for both sides
        home = base / "home"
        manager = EnvManager(home, FileBlobStore(home / "blobs"))
        kiln_times, uv_times = [], []
        for _ in range(5):
            kiln_times.append(kiln_build(manager))
            uv_times.append(uv_build(base))
        shutil.rmtree(base, ignore_errors=True)
    cold_kiln, cold_uv = statistics.median(kiln_times), statistics.median(uv_times)
    emit(
        [
            Row(
                "envs",
                "warm f.remote() in a built env (ms)",
                warm_env,
                warm_plain,
                "the same call without env",
                "ms",
                "< 20 ms extra",
                warm_env - warm_plain < 20,
            ),
            Row(
                "envs",
                "cold build requests + pydantic (s)",
                cold_kiln,
                cold_uv,
                "uv venv && uv pip install, same cache",
                "s",
                "<= 1.2x uv",
                cold_kiln <= 1.2 * cold_uv,
            ),
        ]
    )


if __name__ == "__main__":
    main()
