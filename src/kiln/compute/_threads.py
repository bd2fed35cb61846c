"""How many threads a task's numeric libraries use: as many as the CPUs it asked for.

OpenMP, MKL, OpenBLAS, BLIS, Accelerate and numexpr each start one thread per core
of the machine unless told otherwise, so a sweep of ``cpu=1`` tasks on an 8-core
machine would run 8 tasks of 8 threads each, fighting over the cores (Ray sets
``OMP_NUM_THREADS`` from ``num_cpus`` for the same reason). Every engine gives a
task the variables below, set to its CPU request rounded up (at least 1), except
those the user set in the driver's environment: those are passed on as they are,
and a user's ``OMP_NUM_THREADS`` is the count for the others too, as MKL, OpenBLAS
and torch themselves take it when their own variable is unset.

Most libraries read their variable once, when they load, so an engine runs a task
in a worker process started with that task's values (warm workers are kept per
thread count), and :func:`apply` sets torch's own count again before each task, in
case an earlier task on the same worker changed it.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping

THREAD_VARS = (
    "OMP_NUM_THREADS",  # OpenMP: torch's intra-op pool, scikit-learn, LightGBM, XGBoost
    "MKL_NUM_THREADS",  # Intel MKL (numpy/scipy/torch builds linked with it)
    "OPENBLAS_NUM_THREADS",  # OpenBLAS (numpy/scipy wheels)
    "BLIS_NUM_THREADS",  # BLIS (AMD's BLAS)
    "VECLIB_MAXIMUM_THREADS",  # Apple Accelerate
    "NUMEXPR_NUM_THREADS",  # numexpr (pandas' eval)
)


def thread_count(cpu: float) -> int:
    """The threads a task of ``cpu`` cores gets: the request rounded up, at least 1."""
    return max(1, math.ceil(cpu))


def thread_env(cpu: float, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The thread variables for a task of ``cpu`` cores: ``environ``'s own (the
    driver's environment by default) where set, elsewhere its ``OMP_NUM_THREADS`` if
    set, else the task's thread count."""
    environ = os.environ if environ is None else environ
    count = environ.get("OMP_NUM_THREADS") or str(thread_count(cpu))
    return {name: environ.get(name) or count for name in THREAD_VARS}


def apply(threads: Mapping[str, str]) -> None:
    """Make ``threads`` this process's settings, before a task runs in it.

    The variables reach libraries loaded from now on; torch, if already loaded, is
    told directly (its pool was sized when it loaded, or by an earlier task)."""
    os.environ.update(threads)
    torch = sys.modules.get("torch")
    # torch's own rule when it loads: MKL_NUM_THREADS, else OMP_NUM_THREADS.
    count = _positive_int(threads.get("MKL_NUM_THREADS")) or _positive_int(
        threads.get("OMP_NUM_THREADS")
    )
    if torch is not None and count is not None and torch.get_num_threads() != count:
        torch.set_num_threads(count)


def in_effect() -> dict[str, str]:
    """The thread variables set in this process, as the run records them."""
    return {name: os.environ[name] for name in THREAD_VARS if name in os.environ}


def _positive_int(value: str | None) -> int | None:
    try:
        count = int(value or "")
    except ValueError:  # the user's own value, in a form torch would not take
        return None
    return count if count > 0 else None
