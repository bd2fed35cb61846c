"""The thread variables a task gets from its CPU request and the driver's environment."""

from __future__ import annotations

import pytest

from kiln.compute._threads import THREAD_VARS, apply, in_effect, thread_count, thread_env


@pytest.mark.parametrize(("cpu", "count"), [(0, 1), (0.25, 1), (1, 1), (1.5, 2), (4, 4)])
def test_the_count_is_the_request_rounded_up_and_at_least_one(cpu: float, count: int) -> None:
    assert thread_count(cpu) == count
    assert thread_env(cpu, {}) == dict.fromkeys(THREAD_VARS, str(count))


def test_what_the_user_set_is_kept_and_their_omp_count_is_the_default() -> None:
    assert thread_env(1, {"MKL_NUM_THREADS": "4"}) == {
        **dict.fromkeys(THREAD_VARS, "1"),
        "MKL_NUM_THREADS": "4",
    }
    env = thread_env(1, {"OMP_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "2"})
    assert env == {**dict.fromkeys(THREAD_VARS, "3"), "OPENBLAS_NUM_THREADS": "2"}
    assert thread_env(2, {"OMP_NUM_THREADS": ""})["OMP_NUM_THREADS"] == "2"  # empty: unset


def test_apply_sets_the_variables_in_effect(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in THREAD_VARS:  # each restored (or removed again) after the test
        monkeypatch.setenv(name, "8")
        monkeypatch.delenv(name)
    apply({"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "not a number"})
    assert in_effect() == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "not a number"}
