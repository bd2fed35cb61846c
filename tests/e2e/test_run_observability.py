"""Seeing inside runs: system metrics sampled beside them, what they print (recorded and
still shown), right-sizing from both. Real workers, real stores, real processes."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

import kiln
from kiln.cli._render import reader
from kiln.record import output
from kiln.record.store.sql import SqlStore

app = kiln.App("observe")
MIB = 2**20


@app.function(cpu=1, memory="1Gi")
def burn(cpu_s: float, mib: int) -> int:
    """Hold ``mib`` MiB (touched) and burn ``cpu_s`` seconds of CPU in one thread."""
    block = bytearray(mib * MIB)
    for i in range(0, len(block), 4096):
        block[i] = 1
    start = time.process_time()
    while time.process_time() - start < cpu_s:
        pass
    return len(block)


@app.function(sys_metrics=False)
def quiet(cpu_s: float) -> None:
    start = time.process_time()
    while time.process_time() - start < cpu_s:
        pass


@app.function()
def chatty() -> str:
    print("to stdout", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    sys.stdout.buffer.write(b"binary \x00\xff\xfe garbage\n")
    sys.stdout.flush()
    subprocess.run([sys.executable, "-c", "print('from a child process')"], check=True)
    print("no newline at the end", end="")
    return "done"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip


def test_the_sampler_measures_a_run_that_burns_known_cpu_and_memory(engine: str) -> None:
    run = burn.spawn(4.0, 200)  # long enough for counters, the change between two samples
    assert run.result() == 200 * MIB
    record = run.record()
    u = record.usage
    assert u.cpu_s is not None and u.cpu_s >= 4.0  # it burnt that much, by its own clock
    assert u.peak_rss_bytes is not None and u.peak_rss_bytes >= 200 * MIB
    # one busy thread: well above an idle process; at most a core beside what the process
    # does anyway (a Ray worker's own threads use about a tenth of one), never more than
    # the machine has
    most = 1.2 if engine == "local" else min(2.0, os.cpu_count() or 2)
    assert u.cpu_cores_mean is not None and 0.2 < u.cpu_cores_mean <= most
    assert u.sys_samples is not None and u.sys_samples >= 1
    store = reader().store
    cores = [p.value for p in store.metric_history(run.id, "sys/cpu_cores")]
    rss = [p.value for p in store.metric_history(run.id, "sys/rss_bytes")]
    assert cores and all(0 <= c <= most for c in cores)
    assert max(rss) >= 200 * MIB
    for key in (
        "sys/swap_in_bytes",
        "sys/swap_out_bytes",
        "sys/disk_read_bytes",
        "sys/disk_write_bytes",
        "sys/major_faults",
        "sys/threads",
        "sys/open_files",
    ):
        assert store.metric_history(run.id, key), key  # fmt: skip
    assert not any(k.startswith("sys/") for k in record.summary)  # not the run's own figures


def test_sys_metrics_false_samples_nothing() -> None:
    run = quiet.spawn(1.5)
    run.result()
    record = run.record()
    assert record.usage.cpu_cores_mean is None and record.usage.sys_samples is None
    assert reader().store.metric_history(run.id, "sys/cpu_cores") == []
    assert record.usage.cpu_s is not None and record.usage.cpu_s >= 1.5  # still counted


def test_a_workers_output_is_recorded_and_still_shown(engine: str) -> None:
    run = chatty.spawn()
    assert run.result() == "done"
    chunks = reader().store.run_logs(run.id)
    by_stream = {s: "".join(c.text for c in chunks if c.stream == s) for s in ("stdout", "stderr")}
    assert "to stdout\n" in by_stream["stdout"]
    assert "to stderr\n" in by_stream["stderr"]
    assert "from a child process\n" in by_stream["stdout"]  # the process tree's, not just print
    assert "binary \ufffd\ufffd\ufffd garbage\n" in by_stream["stdout"]  # NUL and bad bytes
    assert by_stream["stdout"].endswith("no newline at the end")
    assert [c.id for c in chunks] == sorted(c.id for c in chunks)
    shown = _cli("logs", run.id[:8])
    assert shown.returncode == 0, shown.stderr
    assert "to stdout" in shown.stdout and "to stderr" in shown.stderr
    as_json = [json.loads(line) for line in _cli("logs", run.id, "--json").stdout.splitlines()]
    assert {c["stream"] for c in as_json} == {"stdout", "stderr"}


def test_output_past_the_limit_is_shown_not_recorded_and_the_log_says_so() -> None:
    assert output.LOG_LIMIT_BYTES == 16 * MIB  # the script below lowers it to 1 MiB
    script = textwrap.dedent(f"""
        import sys, kiln
        from kiln.record import output
        output.LOG_LIMIT_BYTES = {MIB}
        with kiln.App("flood").run() as run:
            for _ in range(3 * 1024):
                sys.stdout.write("y" * 1023 + "\\n")
        print(run.id, file=sys.stderr)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 3 * 1024  # the caller saw all of it
    run_id = done.stderr.split()[-1]
    chunks = reader().store.run_logs(run_id, limit=10_000)
    kept = sum(len(c.text) for c in chunks if c.stream == "stdout")
    assert MIB - 64 * 1024 <= kept <= MIB
    assert chunks[-1].stream == "kiln" and "not recorded" in chunks[-1].text
    assert kiln.get_run(run_id).status == kiln.RunStatus.SUCCEEDED


def test_logs_follow_a_live_run_to_its_end(tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import pathlib, sys, time, kiln
        with kiln.App("live").run() as run:
            print(run.id, file=sys.__stderr__, flush=True)
            print("first line", flush=True)
            while not pathlib.Path({str(go)!r}).exists():
                time.sleep(0.05)
            print("second line", flush=True)
    """)
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert runner.stderr is not None
        run_id = runner.stderr.readline().strip()
        follower = subprocess.Popen(
            [sys.executable, "-m", "kiln", "logs", run_id, "-f"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert follower.stdout is not None
        assert follower.stdout.readline() == "first line\n"  # while the run still runs
        go.touch()
        rest, err = follower.communicate(timeout=120)
        assert rest == "second line\n", err
        assert follower.returncode == 0
    finally:
        runner.wait(timeout=60)
        if runner.stderr is not None:
            runner.stderr.close()


def test_a_killed_runs_logs_are_kept_up_to_the_kill_and_its_follower_stops(
    tmp_path: Path,
) -> None:
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, pathlib, sys, time, kiln
        from kiln.config import Settings
        from kiln.record.recorder import recorder_for
        with kiln.App("doomed").run() as run:
            print("before the kill", flush=True)
            store = recorder_for(Settings.from_env()).store
            while not store.run_logs(run.id):  # durable: the writer has flushed it
                time.sleep(0.05)
            print(run.id, file=sys.__stderr__, flush=True)
            while not pathlib.Path({str(go)!r}).exists():
                time.sleep(0.05)
            os.kill(os.getpid(), 9)
    """)
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert runner.stderr is not None
    with runner.stderr:
        run_id = runner.stderr.readline().strip()
    follower = subprocess.Popen(
        [sys.executable, "-m", "kiln", "logs", run_id, "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert follower.stdout is not None and follower.stderr is not None
    first = follower.stdout.readline()
    go.touch()
    assert first == "before the kill\n", (run_id, follower.stderr.read())
    assert runner.wait(timeout=60) == -9
    rest, err = follower.communicate(timeout=120)
    assert rest == "" and follower.returncode == 1
    assert "has ended" in err and "lost" in err
    # later readers find it closed as lost, its output up to the kill kept
    again = _cli("logs", run_id, "-f")
    assert again.stdout == "before the kill\n" and "ended lost" in again.stderr


def test_an_inline_runs_output_is_recorded_and_its_caller_still_sees_it() -> None:
    script = textwrap.dedent("""
        import sys, kiln
        app = kiln.App("inline")
        with app.run() as run:
            print("inside", flush=True)
            with app.run() as inner:
                print("nested")
        print("outside")
        print(run.id, inner.id, file=sys.stderr)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "inside\nnested\noutside\n"
    outer, inner = done.stderr.split()[-2:]
    store = reader().store
    assert "".join(c.text for c in store.run_logs(outer)) == "inside\n"
    assert "".join(c.text for c in store.run_logs(inner)) == "nested\n"


def test_logs_travel_in_bundles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = chatty.spawn()
    run.result()
    mine = [(c.stream, c.text) for c in reader().store.run_logs(run.id)]
    out = tmp_path / "run.kiln"
    assert _cli("export", run.id, "-o", str(out)).returncode == 0
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "elsewhere"))
    imported = _cli("import", str(out))
    assert imported.returncode == 0, imported.stderr
    shown = _cli("logs", run.id, "--json")
    assert [(c["stream"], c["text"]) for c in map(json.loads, shown.stdout.splitlines())] == mine


def test_runs_usage_and_show_say_what_a_run_used_against_what_it_asked() -> None:
    run = burn.spawn(1.5, 50)
    run.result()
    shown = _cli("runs", "show", run.id, "--json")
    fit = json.loads(shown.stdout)["fit"]
    assert fit["cpu_requested"] == 1 and fit["memory_requested_bytes"] == 2**30
    assert fit["memory_peak_bytes"] >= 50 * MIB
    assert any("of 1.0Gi asked" in a for a in fit["advice"])  # it used far less memory
    usage = json.loads(_cli("runs", "usage", "--app", "observe", "--json").stdout)
    assert usage["summary"]["runs"] == 1 and usage["runs"][0]["run_id"] == run.id
    assert 0 < usage["summary"]["cpu_efficiency"] <= 1.2
    text = _cli("runs", "usage", "--app", "observe").stdout
    assert "right-size" in text and "CPU-seconds" in text


def test_logs_through_a_server_are_the_projects_own(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    env = {**os.environ, "KILN_SERVER": server.url, "KILN_HOME": str(tmp_path / "client")}
    script = textwrap.dedent("""
        import sys, kiln
        with kiln.App("remote").run() as run:
            print("through the server")
        print(run.id, file=sys.stderr)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    run_id = done.stderr.split()[-1]
    shown = _cli("logs", run_id[:8], env=env)
    assert shown.stdout == "through the server\n", shown.stderr
    elsewhere = {**env, "KILN_PROJECT": "blue"}
    assert _cli("logs", run_id, env=elsewhere).returncode != 0  # another project: no such run
    with SqlStore(server.store_url) as direct:
        assert [c.text for c in direct.run_logs(run_id)] == ["through the server\n"]


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: keeps every span it is sent, decoded with OTLP's own proto."""

    spans: ClassVar[list[Any]] = []

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                _Collector.spans.extend(scope.spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_sweeps_runs_are_children_of_its_span_and_each_run_names_its_span(
    tmp_path: Path,
) -> None:
    _Collector.spans = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "traced.py").write_text(
        textwrap.dedent("""
        import sys, kiln
        app = kiln.App("traced")

        @app.function()
        def square(x: int) -> int:
            with app.run(name="inside"):  # a run started inside a run: its child
                pass
            return x * x

        if __name__ == "__main__":
            sweep = square.sweep(kiln.grid(x=[1, 2]))
            sweep.wait()
            with app.run(name="outer") as outer:
                with app.run(name="inner") as inner:
                    pass
            print(sweep.id, outer.id, inner.id)
    """)
    )
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}"}
    try:
        done = subprocess.run([sys.executable, "traced.py"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=180, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        sweep_id, outer_id, inner_id = done.stdout.split()
        wanted = 2 + 2 + 1 + 2  # the sweep's runs, the runs inside them, the sweep, two more
        deadline = time.monotonic() + 60  # workers export as they exit
        while len(_Collector.spans) < wanted and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.shutdown()
        server.server_close()
    by_run = {}
    for span in _Collector.spans:
        attrs = {a.key: a.value.string_value for a in span.attributes}
        if "kiln.run.id" in attrs:
            by_run[attrs["kiln.run.id"]] = span
    store = reader().store
    sweep_span = by_run[sweep_id]
    children = [s for s in by_run.values() if s.parent_span_id == sweep_span.span_id]
    assert len(children) == 2 and {s.trace_id for s in children} == {sweep_span.trace_id}
    for child in children:
        (run_id,) = [r for r, s in by_run.items() if s is child]
        record = store.get_run(run_id)
        assert record.parent_id == sweep_id
        assert (record.trace_id, record.span_id) == (child.trace_id.hex(), child.span_id.hex())
        nested = [s for s in by_run.values() if s.parent_span_id == child.span_id]
        assert len(nested) == 1 and nested[0].trace_id == child.trace_id  # across processes
    assert store.get_run(sweep_id).span_id == sweep_span.span_id.hex()
    assert by_run[inner_id].parent_span_id == by_run[outer_id].span_id
    assert store.get_run(inner_id).trace_id == store.get_run(outer_id).trace_id
