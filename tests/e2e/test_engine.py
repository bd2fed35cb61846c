"""Functions on the engines: real worker processes, real store, real signals.

Tests that take the ``engine`` fixture are the backend contract: each runs on the
local engine and on a real two-node Ray cluster (one CPU per node).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import kiln
from kiln._engine import engine_for
from kiln.compute._threads import THREAD_VARS
from kiln.compute.resources import detect_inventory
from kiln.config import Settings
from kiln.errors import RunFailed, ValidationError
from kiln.reproduce import reproduce

app = kiln.App("engine")


@app.function(cpu=1, memory="64Mi")
def train(lr: float, depth: int = 3) -> dict:
    for step in range(3):
        kiln.log({"loss": lr / (step + 1)}, step=step)
    kiln.save("weights.bin", b"w" * depth)
    return {"accuracy": 1 - lr, "depth": depth}


@app.function()
def echo(x: object) -> object:
    return x


@app.function()
def pid_of_worker(_: int = 0) -> int:
    return os.getpid()


@app.function()
def boom(x: int) -> int:
    if x == 2:
        raise ValueError(f"bad item {x}")
    return x * 10


@app.function()
def die(sig: int) -> None:
    os.kill(os.getpid(), sig)


@app.function(timeout=1)
def hang_with_child(pid_file: str) -> None:
    child = subprocess.Popen(["sleep", "60"])
    Path(pid_file).write_text(str(child.pid))
    time.sleep(60)


@app.function()
def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.function(retries=2)
def flaky(marker: str) -> str:
    path = Path(marker)
    if not path.exists():
        path.write_text("failed once")
        raise RuntimeError("first attempt fails")
    return "ok"


@app.function()
def wait_for(gate: str) -> None:
    while not Path(gate).exists():
        time.sleep(0.02)


@app.function(timeout=2)
def quick_with_a_timeout(i: int) -> int:
    return i


def _torch_threads(set_to: int) -> tuple[int, int, dict[str, str]]:
    import torch

    count = torch.get_num_threads()
    if set_to:
        torch.set_num_threads(set_to)  # left so for the worker's next task
    variables = {k: v for k, v in os.environ.items() if k.endswith("_THREADS")}
    return count, os.getpid(), variables


@app.function(cpu=1)
def torch_threads(set_to: int = 0) -> tuple[int, int, dict[str, str]]:
    return _torch_threads(set_to)


@app.function(cpu=2)
def torch_threads_on_two() -> tuple[int, int, dict[str, str]]:
    return _torch_threads(0)


@app.function()
def interval(i: int) -> tuple[float, float]:
    start = time.time()
    time.sleep(0.3)
    return start, time.time()


def test_remote_returns_the_result_and_records_the_run(engine: str) -> None:
    assert train.remote(0.5) == {"accuracy": 0.5, "depth": 3}
    (record,) = kiln.runs(app="engine")
    assert record.status is kiln.RunStatus.SUCCEEDED
    assert record.params == {"lr": 0.5, "depth": 3}
    assert record.function == f"{__name__}:train"
    assert record.summary == {"accuracy": 0.5, "depth": 3.0, "loss": 0.5 / 3}
    assert [p.value for p in record.metric_history("loss")] == [0.5, 0.25, 0.5 / 3]
    assert record.load("weights.bin") == b"www"
    assert record.attempt == 1 and record.engine == engine
    assert record.resources["requested"] == {"cpu": 1.0, "memory_bytes": 64 * 2**20, "gpu": 0.0}
    assert record.resources["assigned"]["worker_pid"] != os.getpid()
    assert record.usage.cpu_s is not None and record.usage.wall_s is not None
    assert record.usage.peak_rss_bytes and record.environment.python
    assert record.code.module_path == __file__


def test_spawn_gives_a_handle_and_workers_stay_warm() -> None:
    run = pid_of_worker.spawn()
    assert run.wait(timeout=60) is kiln.RunStatus.SUCCEEDED
    first = run.result()
    assert first != os.getpid()
    assert pid_of_worker.remote() == first  # the same warm worker
    assert run.record().status is kiln.RunStatus.SUCCEEDED


def test_map_keeps_input_order_and_names_the_failed_run(engine: str) -> None:
    assert list(echo.map(range(20))) == list(range(20))
    results = list(boom.map([1, 2, 3], return_exceptions=True))
    assert results[0] == 10 and results[2] == 30
    failure = results[1]
    assert isinstance(failure, RunFailed)
    assert "bad item 2" in str(failure) and "ValueError" in (failure.traceback or "")
    assert kiln.get_run(failure.run_id).status is kiln.RunStatus.FAILED
    with pytest.raises(RunFailed, match="bad item 2"):
        list(boom.map([1, 2, 3]))


def test_an_exception_in_the_task_reaches_the_caller_with_its_run(engine: str) -> None:
    with pytest.raises(RunFailed) as info:
        boom.remote(2)
    err = info.value
    assert err.status == "failed" and "ValueError: bad item 2" in err.cause
    record = kiln.get_run(err.run_id)
    assert record.error is not None and "bad item 2" in record.error


def test_sweep_groups_runs_and_finds_the_best(engine: str) -> None:
    sweep = train.sweep(kiln.grid(lr=[0.1, 0.3, 0.2], depth=[2]))
    assert sweep.results()[0] == {"accuracy": 0.9, "depth": 2}
    best = sweep.best("accuracy")
    assert best.params == {"lr": 0.1, "depth": 2}
    assert sweep.best("accuracy", mode="min").params["lr"] == 0.3
    table = sweep.table()
    assert [row["lr"] for row in table] == [0.1, 0.3, 0.2]
    assert {row["status"] for row in table} == {"succeeded"}
    children = kiln.runs(parent=sweep.id, limit=None)
    assert len(children) == 3
    parent = kiln.get_run(sweep.id)  # wait() returns once the sweep's end is recorded
    assert parent.status is kiln.RunStatus.SUCCEEDED
    assert parent.result == {"runs": 3, "succeeded": 3, "failed": 0, "cancelled": 0}
    with pytest.raises(ValidationError, match="mode"):
        sweep.best("accuracy", mode="highest")


def test_timeout_kills_the_whole_process_tree(engine: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    with pytest.raises(RunFailed, match="timed out after 1s") as info:
        hang_with_child.remote(str(pid_file))
    child = int(pid_file.read_text())
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the task's child process survived the timeout"
    assert kiln.get_run(info.value.run_id).status is kiln.RunStatus.FAILED


def test_a_worker_killed_by_a_signal_fails_the_run_and_the_next_call_works(engine: str) -> None:
    cause = "worker died: signal 9" if engine == "local" else "Ray worker died"
    with pytest.raises(RunFailed, match=cause) as info:
        die.remote(signal.SIGKILL)
    record = kiln.get_run(info.value.run_id)
    assert record.status is kiln.RunStatus.FAILED and cause in (record.error or "")
    assert echo.remote("still alive") == "still alive"


def test_retries_rerun_with_the_attempt_recorded(engine: str, tmp_path: Path) -> None:
    assert flaky.remote(str(tmp_path / "marker")) == "ok"
    (record,) = kiln.runs(app="engine", limit=1)
    assert record.attempt == 2
    attempts = record.resources["attempts"]
    assert [a["status"] for a in attempts] == ["failed", "succeeded"]
    assert "first attempt fails" in attempts[0]["cause"]


def test_cancel_a_running_and_a_queued_run(engine: str) -> None:
    running = [sleep_for.spawn(30) for _ in range(2)]  # both cores (both nodes on Ray)
    queued = sleep_for.spawn(30)
    deadline = time.time() + 60
    while time.time() < deadline and any(
        r.status is not kiln.RunStatus.RUNNING for r in running
    ):  # fmt: skip
        time.sleep(0.05)
    assert [r.status for r in running] == [kiln.RunStatus.RUNNING] * 2
    assert queued.status is kiln.RunStatus.QUEUED
    assert kiln.get_run(queued.id).status is kiln.RunStatus.QUEUED
    queued.cancel()
    for run in running:
        run.cancel()
    for run in (queued, *running):
        with pytest.raises(RunFailed, match="cancel"):
            run.result(timeout=30)
        assert run.record().status is kiln.RunStatus.CANCELLED


def test_never_more_at_once_than_the_cpus_allow(engine: str) -> None:
    cpus = int(detect_inventory().cpu)
    spans = list(interval.map(range(2 * cpus + 2)))
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= cpus


def test_gpus_are_assigned_and_fractions_share_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_GPUS", "2")
    gpu_app = kiln.App("gpus")

    @gpu_app.function(cpu=0.5, gpu=0.5)
    def half() -> str:
        return os.environ["CUDA_VISIBLE_DEVICES"]

    @gpu_app.function(cpu=0.5, gpu=2)
    def both() -> str:
        return os.environ["CUDA_VISIBLE_DEVICES"]

    halves = [half.spawn() for _ in range(2)]
    devices = [run.result() for run in halves]
    assert devices[0] == devices[1] in ("0", "1")  # best fit packs both halves on one GPU
    assert both.remote() == "0,1"
    records = kiln.runs(app="gpus", limit=None)
    assigned = [r.resources["assigned"] for r in records]
    assert {a["cuda_visible_devices"] for a in assigned} <= {"0", "1", "0,1"}
    assert any(a.get("gpus") == {"0": 1.0, "1": 1.0} for a in assigned)


def test_waiting_in_the_queue_does_not_count_against_the_timeout(
    engine: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    cpus = int(engine_for(Settings.from_env()).inventory.cpu)
    blockers = [wait_for.spawn(str(gate)) for _ in range(cpus)]  # every core is taken
    _wait_until_running(blockers)
    queued = [quick_with_a_timeout.spawn(i) for i in range(2)]
    time.sleep(2.5)  # longer than their timeout, all of it in the queue
    assert [run.status for run in queued] == [kiln.RunStatus.QUEUED] * 2
    gate.touch()
    assert [run.result(timeout=60) for run in queued] == [0, 1]
    assert all(run.result(timeout=60) is None for run in blockers)


def test_cpu_bounds_the_threads_of_torch_and_blas(monkeypatch: pytest.MonkeyPatch) -> None:
    first = torch_threads.spawn(set_to=2)
    count, pid, variables = first.result(timeout=120)
    assert count == 1
    assert {variables[name] for name in THREAD_VARS} == {"1"}
    assert first.record().environment.threads == dict.fromkeys(THREAD_VARS, "1")
    count, other_pid, variables = torch_threads_on_two.remote()
    assert count == 2 and variables["OMP_NUM_THREADS"] == "2" and other_pid != pid
    # The same warm worker again, its torch set back to the task's count.
    assert torch_threads.remote()[:2] == (1, pid)
    # What the user set in the driver's environment wins; their OMP_NUM_THREADS is the
    # count for the others too (as MKL, OpenBLAS and torch take it).
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    run = torch_threads.spawn()
    count, _, variables = run.result(timeout=120)
    assert count == 2 and variables["OMP_NUM_THREADS"] == variables["MKL_NUM_THREADS"] == "2"
    assert variables["OPENBLAS_NUM_THREADS"] == "3"
    assert run.record().environment.threads["OMP_NUM_THREADS"] == "2"


def test_reproduce_runs_with_the_recorded_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, kiln
            app = kiln.App("threads")

            @app.function()
            def threads() -> str:
                return os.environ["OMP_NUM_THREADS"] + "," + os.environ["MKL_NUM_THREADS"]

            if __name__ == "__main__":
                run = threads.spawn()
                print(run.id, run.result())
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True,
        env={**os.environ, "OMP_NUM_THREADS": "3"},
    )  # fmt: skip
    run_id, result = out.stdout.split()
    assert result == "3,3"  # the user's OMP_NUM_THREADS is the count for MKL too
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    comparison = reproduce(run_id)
    again = kiln.get_run(comparison.reproduction)
    assert again.result == "3,3"
    assert again.environment.threads == kiln.get_run(run_id).environment.threads


def _wait_until_running(runs: list[kiln.Run]) -> None:
    deadline = time.time() + 60
    while time.time() < deadline and any(r.status is not kiln.RunStatus.RUNNING for r in runs):
        time.sleep(0.05)
    assert [r.status for r in runs] == [kiln.RunStatus.RUNNING] * len(runs)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"cpu": -1}, "cpu"),
        ({"gpu": 1.5}, "gpu"),
        ({"gpu": 1}, "gpu"),  # no GPUs on this machine unless KILN_GPUS says so
        ({"memory": "12Qi"}, "memory"),
        ({"memory": "100Ti"}, "memory"),
        ({"cpu": 10_000}, "cpu"),
        ({"timeout": 0}, "timeout"),
        ({"retries": -1}, "retries"),
    ],
)
def test_bad_declarations_fail_at_decoration(options: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        app.function(**options)(echo.fn)
    assert info.value.field == field


def test_bad_arguments_fail_before_anything_runs() -> None:
    with pytest.raises(ValidationError, match="arguments"):
        train.remote(0.1, 2, 3)  # type: ignore[call-arg]
    with pytest.raises(kiln.errors.StoreUnavailableError):
        kiln.runs()  # nothing was recorded, not even a store


def test_local_runs_in_process_and_is_recorded() -> None:
    assert pid_of_worker.local() == os.getpid()
    (record,) = kiln.runs(app="engine")
    assert record.engine == "inline" and record.function == f"{__name__}:pid_of_worker"


def test_functions_defined_in_main_are_shipped_by_value(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            """
            import kiln
            app = kiln.App("script")

            def helper(x):
                return x * 3

            @app.function()
            def triple(x: int) -> int:
                return helper(x)

            if __name__ == "__main__":
                print(list(triple.map([1, 2, 3])))
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[3, 6, 9]"
    assert len(kiln.runs(app="script")) == 3


def test_runs_of_a_driver_that_died_are_marked_lost(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time, kiln
            from pathlib import Path
            app = kiln.App("orphans")

            @app.function()
            def forever(pid_file: str) -> None:
                Path(pid_file).write_text(str(os.getpid()))
                time.sleep(600)

            if __name__ == "__main__":
                run = forever.spawn(sys.argv[1])
                while not Path(sys.argv[1]).exists():
                    time.sleep(0.05)
                print(run.id, flush=True)
                time.sleep(600)
            """
        )
    )
    pid_file = tmp_path / "worker.pid"
    with subprocess.Popen(
        [sys.executable, str(script), str(pid_file)], stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        run_id = proc.stdout.readline().strip()
        proc.kill()
        proc.wait()
    record = kiln.get_run(run_id)
    assert record.status is kiln.RunStatus.LOST
    assert record.error is not None and "ended without closing it" in record.error
    worker = int(pid_file.read_text())
    deadline = time.time() + 10
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), "the worker outlived its driver"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_settings_in_effect() -> None:
    assert Settings.from_env().backend == "local"
