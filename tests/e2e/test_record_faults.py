"""One bad value never costs the rest of the record: it is refused at the call, and
what still reaches the writer is isolated and dropped with a warning on its run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kiln
from kiln.cli import app as cli
from kiln.config import Settings
from kiln.errors import ValidationError
from kiln.record import recorder
from kiln.record.store.base import MetricRow


def test_unstorable_values_are_refused_at_the_call_and_the_run_goes_on(
    settings: Settings,
) -> None:
    app = kiln.App("faults")
    with app.run() as run:
        for bad in (
            lambda: kiln.log({"x": 1.0}, step=2**63),
            lambda: kiln.log({"k" * 251: 1.0}),
            lambda: kiln.log({"a\x00b": 1.0}),
            lambda: kiln.log({"x": 10**400}),
            lambda: kiln.save("m" * 501, b"x"),
        ):
            with pytest.raises(ValidationError):
                bad()
        kiln.log({"x": 1.0}, step=0)
    record = kiln.get_run(run.id)
    assert record.status is kiln.RunStatus.SUCCEEDED and record.summary == {"x": 1.0}


def slipped_through(settings: Settings) -> list[MetricRow]:
    """Rows past the call's checks (as a bug or another client could send them),
    each refused by this store."""
    if settings.store_url.startswith("sqlite"):
        return [("RUN", "x", 2**63, time.time(), 1.0)]  # SQLite's INTEGER is 64-bit
    return [("RUN", "k" * 300, 1, time.time(), 1.0), ("RUN", "a\x00b", 1, time.time(), 1.0)]


def test_rows_the_store_refuses_are_dropped_with_a_warning_and_nothing_else_is(
    settings: Settings,
) -> None:
    app = kiln.App("faults")
    rec = recorder.recorder_for(settings)
    with app.run() as bad:
        rec.add_points([(bad.id, *row[1:]) for row in slipped_through(settings)])
        kiln.log({"good": 1.0}, step=0)
    later = []
    for _ in range(3):
        with app.run() as run:
            for step in range(1000):
                kiln.log({"x": float(step)}, step=step)
        later.append(run.id)
    for run_id in later:
        record = kiln.get_run(run_id)
        assert record.status is kiln.RunStatus.SUCCEEDED
        assert len(rec.store.metric_history(run_id, "x")) == 1000
    assert kiln.get_run(bad.id).status is kiln.RunStatus.SUCCEEDED
    assert [p.value for p in rec.store.metric_history(bad.id, "good")] == [1.0]
    shown = CliRunner().invoke(cli, ["runs", "show", bad.id, "--json"])
    warnings = json.loads(shown.output)["warnings"]
    assert len(warnings) == len(slipped_through(settings))
    assert all(w.startswith("a metric point was not stored:") for w in warnings)
    assert (
        "warning: a metric point was not stored"
        in CliRunner().invoke(cli, ["runs", "show", bad.id]).output
    )


def test_a_warm_worker_is_clean_for_each_task(tmp_path: Path) -> None:
    app = kiln.App("faults")
    pid_file = tmp_path / "bad.pid"

    @app.function()
    def bad() -> None:
        pid_file.write_text(str(os.getpid()))
        os.environ["KILN_TEST_LEFTOVER"] = "1"
        os.chdir(tmp_path)
        kiln.log({"x": 1.0}, step=2**63)  # refused: the task fails, clearly

    @app.function()
    def good() -> tuple[int, str | None, str]:
        for step in range(1000):
            kiln.log({"x": float(step)}, step=step)
        return os.getpid(), os.environ.get("KILN_TEST_LEFTOVER"), os.getcwd()

    with pytest.raises(kiln.RunFailed, match="step"):
        bad.remote()
    store = recorder.recorder_for(Settings.from_env()).store
    for _ in range(2):
        run = good.spawn()
        pid, leftover, cwd = run.result()
        assert pid == int(pid_file.read_text())  # the same warm worker
        assert leftover is None and cwd == os.getcwd()
        assert len(store.metric_history(run.id, "x")) == 1000
        assert kiln.get_run(run.id).status is kiln.RunStatus.SUCCEEDED


WRITER = textwrap.dedent(
    """
    import kiln
    app = kiln.App("killed")
    with app.run():
        print("recording", flush=True)
        step = 0
        while True:
            kiln.log({"x": float(step), "y": 1.0}, step=step)
            step += 1
    """
)


def test_a_writer_killed_mid_flush_leaves_a_store_that_opens_and_verifies() -> None:
    rng = random.Random(14)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "recording\n"
        time.sleep(rng.uniform(0.2, 2.5))  # where it dies, not what is asserted
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    verified = CliRunner().invoke(cli, ["audit", "verify"])
    assert verified.exit_code == 0, verified.output
    records = kiln.runs(app="killed")
    assert len(records) == 3
    assert {r.status for r in records} == {kiln.RunStatus.LOST}
    settings = Settings.from_env()
    store = recorder.recorder_for(settings).store
    for r in records:  # what was committed is whole: x and y logged together
        xs, ys = store.metric_history(r.id, "x"), store.metric_history(r.id, "y")
        assert len(xs) == len(ys)
        assert [p.value for p in xs] == [float(i) for i in range(len(xs))]
