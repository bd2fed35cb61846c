"""Recording across real processes: concurrent writers, a killed writer, interpreter exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import kiln
from kiln.record.recorder import FLUSH_INTERVAL_S


def python(script: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
        **kwargs,  # type: ignore[call-overload]
    )


def test_two_processes_record_into_one_sqlite_store_at_once() -> None:
    script = """
        import sys, kiln
        app = kiln.App("conc")
        for i in range(25):
            with app.run(params={"writer": sys.argv[1], "i": i}):
                for step in range(200):
                    kiln.log({"loss": 1.0 / (step + 1), "acc": step / 200}, step=step)
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), w], stderr=subprocess.PIPE, text=True
        )
        for w in ("a", "b")
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    records = kiln.runs(app="conc", limit=None)
    assert len(records) == 50
    assert {r.params["writer"] for r in records} == {"a", "b"}
    assert all(r.status is kiln.RunStatus.SUCCEEDED for r in records)
    assert all(len(r.metric_history("loss")) == 200 for r in records[:5])


def test_sigkill_loses_nothing_logged_before_the_last_flush_interval() -> None:
    script = f"""
        import sys, time, kiln
        run = kiln.App("killed").run(params={{"x": 1}}).__enter__()
        for step in range(1000):
            kiln.log({{"loss": float(step)}}, step=step)
        print(run.id, flush=True)
        time.sleep({FLUSH_INTERVAL_S * 3})  # the background writer flushes meanwhile
        print("ready", flush=True)
        time.sleep(600)
    """
    with python(script) as proc:
        assert proc.stdout is not None
        run_id = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    record = kiln.get_run(run_id)
    assert [p.step for p in record.metric_history("loss")] == list(range(1000))
    assert record.status is kiln.RunStatus.LOST  # its process is gone: found on store open
    assert record.error is not None and f"pid {proc.pid}" in record.error
    assert record.summary == {"loss": 999.0}


def test_a_run_left_open_at_exit_is_flushed_and_marked_failed() -> None:
    script = """
        import kiln
        run = kiln.App("left-open").run().__enter__()
        for step in range(10):
            kiln.log({"loss": float(step)}, step=step)
        print(run.id)
    """
    proc = python(script)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    record = kiln.get_run(out.strip())
    assert record.status is kiln.RunStatus.FAILED
    assert record.error is not None and "exited while the run was open" in record.error
    assert len(record.metric_history("loss")) == 10


def test_a_script_records_its_own_source(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        "import kiln\nwith kiln.App('s').run() as run:\n    kiln.log({'m': 1})\nprint(run.id)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    code = kiln.get_run(out.stdout.strip()).code
    assert code.module_path == str(script)
    assert code.source_blob == code.source_sha256  # no git here: the source itself is kept
