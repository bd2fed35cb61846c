"""Endpoints served for real: uvicorn, replica processes, HTTP through httpx."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving_app import BatchEcho, Devices, Echo, Scorer, Talker, app, register
from typer.testing import CliRunner

import kiln
from conftest import ServerProcess
from kiln.cli import app as cli
from kiln.config import Settings
from kiln.errors import NotFoundError
from kiln.observe.why import explain, list_spans
from kiln.record.recorder import recorder_for
from kiln.serve import state
from kiln.serve.server import ServerHandle

HERE = Path(__file__).parent


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def serve() -> Iterator[Callable[..., ServerHandle]]:
    handles: list[ServerHandle] = []

    def start(**spec: Any) -> ServerHandle:
        endpoint = app.endpoint(**{"model": "scorer@production", "cpu": 0.5, **spec})(Scorer)
        handle = endpoint.serve(port=0, block=False)
        assert handle is not None
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


def promoted(weight: float = 1.0) -> int:
    version = register(weight)
    app.models.promote("scorer", version, alias="production", reason="test")
    return version


def store() -> Any:
    return recorder_for(Settings.from_env()).store


@pytest.mark.parametrize("record", ["embedded", "server"])
def test_predict_health_metrics_and_the_trace_behind_an_answer(
    start_server: Callable[..., ServerProcess], serve: Callable[..., ServerHandle], record: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Once on the embedded store, once through ``kiln server``: the replica fetches its
    model from the server and its spans go there, where ``kiln why`` finds them."""
    if record == "server":
        monkeypatch.setenv("KILN_SERVER", start_server().url)
    version = promoted(2.0)
    handle = serve()
    with httpx.Client(base_url=handle.url) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
        response = client.post("/predict", json={"x": [1, 2]})
        assert response.status_code == 200
        assert response.json()["score"] == 6.0 and response.json()["version"] == version
        assert response.headers["x-kiln-model"] == f"scorer:{version}"
        trace_id = response.headers["x-kiln-trace-id"]
        bad = client.post("/predict", json={"x": [1, "two"]})
        assert bad.status_code == 422 and bad.json()["error"].startswith("x.1: ")
        missing = client.post("/predict", json={"y": 1})
        assert missing.status_code == 422 and "x: Field required" in missing.json()["error"]
        assert client.get("/predict").status_code == 405
        assert client.get("/predict").headers["allow"] == "POST"
        for method in ("DELETE", "TRACE", "POST"):
            refused = client.request(method, "/healthz")
            assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"
        assert client.get("/nowhere").status_code == 404
        metrics = client.get("/metrics").text
    assert f'kiln_requests_total{{code="200",endpoint="scorer",version="{version}"}} 1.0' in metrics
    assert 'kiln_request_errors_total{code="422",endpoint="scorer"' in metrics
    assert "kiln_request_duration_seconds_bucket" in metrics
    assert f'kiln_replicas{{endpoint="scorer",version="{version}"}} 1.0' in metrics
    assert 'kiln_model_version_weight{endpoint="scorer",model="scorer"' in metrics
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    (weight,) = families["kiln_model_version_weight"].samples
    assert weight.value == 1.0  # a 0-1 ratio, as Prometheus wants
    counts = [s for s in families["kiln_request_duration_seconds"].samples
              if s.name.endswith("_count")]  # fmt: skip
    assert [(s.labels["version"], s.value) for s in counts] == [(str(version), 3.0)]
    unrouted = {s.labels["code"]: s.value for s in families["kiln_requests"].samples
                if s.labels["version"] == "none" and s.name == "kiln_requests_total"}  # fmt: skip
    assert unrouted == {"405": 5.0, "404": 1.0}
    assert "kiln_inflight_requests" in metrics
    # The span reaches the store, and `kiln why` walks from it to the run behind it.
    info = wait_for(lambda: _explained(trace_id), what="the span")
    production = app.models.get("scorer@production")
    assert info["model"]["ref"] == f"scorer:{version}"
    assert info["run"]["id"] == production.run_id and info["run"]["params"] == {"weight": 2.0}
    assert json.loads(info["input"]) == {"x": [1, 2]}
    assert info["promotions"][0]["by"] == "tester" and info["promotions"][0]["reason"] == "test"
    result = CliRunner().invoke(cli, ["why", trace_id[:12]])
    assert result.exit_code == 0, result.output
    assert production.run_id in result.output and "promoted to @production" in result.output
    traces = CliRunner().invoke(cli, ["traces", "ls", "--endpoint", "scorer", "--json"])
    assert trace_id in {row["trace_id"] for row in json.loads(traces.output)}


def _explained(trace_id: str) -> dict[str, Any] | None:
    try:
        return explain(store(), trace_id)
    except NotFoundError:
        return None


def test_autoscales_up_under_load_and_down_to_zero_then_cold_starts(
    serve: Callable[..., ServerHandle],
) -> None:
    promoted()
    handle = serve(min_replicas=0, max_replicas=2, target_concurrency=1, idle_timeout=1.0)
    server = handle.app
    assert server.stats()["replicas"] == 0  # nothing loaded until a request comes
    with httpx.Client(base_url=handle.url, timeout=60) as client:
        first = client.post("/predict", json={"x": [1]})
        assert first.status_code == 200  # waited for a cold start instead of failing
        pids: set[int] = set()

        def load() -> None:
            with httpx.Client(base_url=handle.url, timeout=60) as c:
                for _ in range(6):
                    pids.add(c.post("/predict", json={"x": [1], "delay": 0.2}).json()["pid"])

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: server.stats()["replicas"] == 2, what="a second replica")
        for t in threads:
            t.join()
        assert len(pids) == 2  # both replicas answered
        wait_for(lambda: server.stats()["replicas"] == 0, what="scale to zero")
        again = client.post("/predict", json={"x": [3]})
        assert again.status_code == 200 and again.json()["score"] == 3.0
    assert len(server.stats()["versions"]["1"]["cold_starts_s"]) == 2


def test_replicas_are_admitted_by_the_scheduler_with_their_gpu_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KILN_GPUS", "1")
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    promoted()
    whole = app.endpoint(model="scorer@production", name="whole", cpu=0, gpu=1,
                         max_replicas=3, target_concurrency=1)(Devices)  # fmt: skip
    handle = whole.serve(port=0, block=False)
    assert handle is not None
    try:
        pids: set[int] = set()

        def load() -> None:
            with httpx.Client(base_url=handle.url, timeout=60) as c:
                for _ in range(5):
                    answer = c.post("/predict", json={"delay": 0.1}).json()
                    assert answer["devices"] == "0"
                    assert answer["threads"] == ["1", "1"]  # cpu=0: one thread, as for a task
                    pids.add(answer["pid"])

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(pids) == 1  # the autoscaler asked for 3; one GPU admits one replica
    finally:
        handle.stop()
    halves = app.endpoint(model="scorer@production", name="halves", cpu=0, gpu=0.5,
                          min_replicas=2, max_replicas=2)(Devices)  # fmt: skip
    handle = halves.serve(port=0, block=False)
    assert handle is not None
    try:
        wait_for(lambda: handle.app.stats()["replicas"] == 2, what="min_replicas up")
        with httpx.Client(base_url=handle.url, timeout=60) as c:
            answers = [c.post("/predict", json={}).json() for _ in range(10)]
        assert len({a["pid"] for a in answers}) == 2  # two replicas share GPU 0
        assert {a["devices"] for a in answers} == {"0"}
    finally:
        handle.stop()


def test_spans_are_also_exported_over_otlp(
    serve: Callable[..., ServerHandle], monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    collector = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT",
                           f"http://127.0.0.1:{collector.server_address[1]}")  # fmt: skip
        version = promoted()
        handle = serve()
        response = httpx.post(f"{handle.url}/predict", json={"x": [1]})
        trace_id = bytes.fromhex(response.headers["x-kiln-trace-id"])
        wait_for(lambda: any(trace_id in body for _, body in received), what="an OTLP export")
    finally:
        collector.shutdown()
        collector.server_close()
    path, body = next((p, b) for p, b in received if trace_id in b)
    assert path == "/v1/traces"
    assert b"kiln.model.version" in body and b"openinference.span.kind" in body
    assert b"kiln.run.id" in body and app.models.get(f"scorer:{version}").run_id.encode() in body


def test_alias_moves_under_load_drop_no_request(serve: Callable[..., ServerHandle]) -> None:
    first = promoted(1.0)
    second = register(10.0)
    handle = serve(min_replicas=1, max_replicas=1)
    seen: Counter[int] = Counter()
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=handle.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/predict", json={"x": [1], "delay": 0.01})
                if r.status_code == 200:
                    seen[r.json()["version"]] += 1
                else:
                    failures.append(f"{r.status_code} {r.text}")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: seen[first] > 20, what="traffic on the first version")
        app.models.promote("scorer", second, alias="production")
        wait_for(lambda: seen[second] > 20, what="traffic moved to the promoted version")
        moved_at = seen[first]
        app.models.rollback("scorer", "production")
        wait_for(lambda: seen[first] > moved_at + 20, what="traffic back after rollback")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    stats = wait_for(lambda: _drained(handle.app.stats(), second), what="the version drained")
    assert stats["versions"][str(second)]["weight"] == 0.0  # rolled back, and still counted
    assert stats["versions"][str(second)]["requests"] == seen[second]


def test_canary_split_by_weight_and_set_live(serve: Callable[..., ServerHandle]) -> None:
    first = promoted(1.0)
    second = register(2.0)
    handle = serve(traffic={f"scorer:{first}": 90, f"scorer:{second}": 10}, target_concurrency=64)
    with httpx.Client(base_url=handle.url) as client:
        versions = Counter(client.post("/predict", json={"x": [1]}).json()["version"]
                           for _ in range(2000))  # fmt: skip
        assert abs(versions[first] / 2000 - 0.90) <= 0.05
        assert abs(versions[second] / 2000 - 0.10) <= 0.05
        result = CliRunner().invoke(
            cli, ["endpoints", "set-traffic", "scorer", f"scorer:{first}=50",
                  f"scorer:{second}=50"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        wait_for(lambda: handle.app.weights == {first: 50.0, second: 50.0}, what="live split")
        live = Counter(client.post("/predict", json={"x": [1]}).json()["version"]
                       for _ in range(200))  # fmt: skip
        assert live == {first: 100, second: 100}
    refused = CliRunner().invoke(cli, ["endpoints", "set-traffic", "scorer", "scorer:99=1"])
    assert refused.exit_code == 1 and "no version 99" in str(refused.exception)
    events = store().audit_events(action="endpoint.traffic")
    assert events[0]["actor"] == "tester"


def test_endpoint_figures_and_cost_per_request(
    serve: Callable[..., ServerHandle], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_PRICES", '{"cpu_hour": 36.0}')
    promoted()
    handle = serve()
    with httpx.Client(base_url=handle.url) as client:
        for _ in range(20):
            client.post("/predict", json={"x": [1]})
    stats = handle.app.stats()
    assert stats["requests"] == 20 and stats["per_request"]["cpu_seconds"] > 0
    # $36 per CPU-hour is $0.01 per CPU-second
    assert stats["cost_per_1k_requests"] == pytest.approx(
        stats["per_request"]["cpu_seconds"] * 0.01 * 1000
    )
    assert handle.app._server_id is not None
    state.report(store(), handle.app._server_id, stats)
    shown = CliRunner().invoke(cli, ["endpoints", "show", "scorer"])
    assert shown.exit_code == 0 and "cost per 1,000 requests: $" in shown.output
    listed = json.loads(CliRunner().invoke(cli, ["endpoints", "ls", "--json"]).output)
    assert listed[0]["name"] == "scorer" and listed[0]["status"] == "serving"
    assert listed[0]["url"] == handle.url


def test_a_model_that_fails_to_load_is_a_clear_error() -> None:
    with app.run() as run:
        kiln.save("model.pkl", b"not a pickle")
    app.models.register("broken", run.id, artifact="model.pkl")
    app.models.promote("broken", 1, alias="production")
    endpoint = app.endpoint(model="broken@production", cpu=0.5)(Scorer)
    with pytest.raises(Exception, match="could not start"):
        endpoint.serve(port=0, block=False)
    missing = app.endpoint(model="nothing@production")(Scorer)
    with pytest.raises(NotFoundError, match="no model 'nothing'"):
        missing.serve(port=0, block=False)


def test_kiln_serve_command_serves_and_stops_cleanly(tmp_path: Path) -> None:
    promoted()
    source = tmp_path / "svc.py"
    source.write_text(
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom serving_app import Scorer, app\n"
        "Svc = app.endpoint(model='scorer@production', name='svc', cpu=0.5)(Scorer)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln", "serve", f"{source}:Svc", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = wait_for(lambda: _served_url("svc"), what="the endpoint's address")
        response = httpx.post(f"{url}/predict", json={"x": [4]}, timeout=30)
        assert response.status_code == 200 and response.json()["score"] == 4.0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    # uvicorn drains, then exits re-raising the signal it caught (as Ctrl-C would)
    assert proc.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM), err
    assert "Traceback" not in err
    info = state.get(store(), "svc")
    assert info.status == "stopped" and info.stats["requests"] == 1


def _served_url(name: str) -> str | None:
    try:
        info = state.get(store(), name)
    except NotFoundError:
        return None
    url = info.url or ""
    return url if info.status == "serving" and not url.endswith(":0") else None


# -- batch ------------------------------------------------------------------------------


def _echo_model() -> None:
    with app.run() as run:
        kiln.save("model.pkl", {"version": 1, "weight": 1.0})
    app.models.register("echo", run.id, artifact="model.pkl")
    app.models.promote("echo", 1, alias="production")


BATCH_APP = """
import sys
sys.path.insert(0, {here!r})
from serving_app import Echo, app
Job = app.endpoint(model="echo@production", name="job", cpu=0.5, max_replicas=2)(Echo)
"""


def test_batch_resumes_after_sigkill_without_duplicates_or_gaps(tmp_path: Path) -> None:
    _echo_model()
    (tmp_path / "job.py").write_text(BATCH_APP.format(here=str(HERE)))
    rows = 400
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"row": i, "delay": 0.01}) + "\n" for i in range(rows)))
    out = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "kiln", "batch", f"{tmp_path / 'job.py'}:Job", "--input",
            str(data), "--output", str(out), "--shard-size", "20", "--json"]  # fmt: skip
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    parts = tmp_path / "out.jsonl.kiln-batch"
    wait_for(lambda: len(list(parts.glob("shard-*.jsonl"))) >= 4, what="checkpoints")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its replicas, mid-job
    proc.wait()
    done_before = len(list(parts.glob("shard-*.jsonl")))
    assert not out.exists() and done_before < rows // 20
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["shards_resumed"] == done_before and summary["rows"] == rows
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["row"] for a in answers] == list(range(rows))  # in order, once each
    assert not parts.exists()
    run = kiln.get_run(summary["run_id"])
    assert run.status is kiln.RunStatus.SUCCEEDED and run.tags["resumed"] == "true"
    assert run.params["model"] == "echo:1"
    lineage = run.lineage()
    names = {a["name"] for a in lineage.artifacts.values()}
    assert {str(data), "model.pkl", "output.jsonl"} <= names
    assert run.artifact("output.jsonl").sha256 == kiln.Dataset(out).sha256


def test_batch_reads_csv_parquet_and_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _echo_model()
    job = app.endpoint(model="echo@production", name="job", cpu=0.5, max_replicas=2)(Echo)
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("row\n" + "".join(f"{i}\n" for i in range(50)))
    result = job.batch(csv_path, output=tmp_path / "a.jsonl", shard_size=7)
    assert result.rows == 50 and result.shards == 8 and result.rows_failed == 0
    assert [json.loads(x)["row"] for x in (tmp_path / "a.jsonl").read_text().splitlines()] == list(
        range(50)
    )
    pq.write_table(pa.table({"row": list(range(30))}), tmp_path / "rows.parquet")
    result = job.batch(tmp_path / "rows.parquet", output=tmp_path / "b.jsonl")
    assert result.rows == 30
    result = job.batch([{"row": 1}, {"row": "x"}, {"row": 3}], shard_size=2)
    assert result.outputs is not None and result.outputs[0]["row"] == 1
    assert result.rows_failed == 1 and result.outputs[1]["error"].startswith("row: ")
    assert kiln.get_run(result.run_id).summary["rows_failed"] == 1
    spans = list_spans(store(), endpoint="job", limit=None)  # flushed as each replica stops
    assert {s["name"] for s in spans} == {"batch"}
    mine = [s for s in spans if s["attributes"]["kiln.batch.run_id"] == result.run_id]
    assert len(mine) == 2 and {s["model_version"] for s in mine} == {1}
    with pytest.raises(kiln.KilnError, match="input"):
        job.batch(tmp_path / "rows.txt")
    with pytest.raises(kiln.KilnError, match="shard_size"):
        job.batch([{"row": 1}], shard_size=0)


def test_batch_calls_predict_batch_once_per_shard(tmp_path: Path) -> None:
    _echo_model()
    job = app.endpoint(model="echo@production", name="vjob", cpu=0.5, max_replicas=2)(BatchEcho)
    rows = [{"row": i} for i in range(25)]
    rows[3] = {"row": "three"}
    result = job.batch(rows, shard_size=10)
    assert result.outputs is not None and result.rows == 25 and result.rows_failed == 1
    assert [a.get("row") for a in result.outputs] == [*range(3), None, *range(4, 25)]
    assert result.outputs[3]["error"].startswith("row: ")
    # one call per shard, of its valid rows: 9 (one refused by validation), 10, 5
    sizes = [a.get("call_rows") for a in result.outputs]
    assert sizes == [9] * 3 + [None] + [9] * 6 + [10] * 10 + [5] * 5


# -- several servers of one endpoint; figures of every version ---------------------------

SERVER_APP = """
import sys
sys.path.insert(0, {here!r})
from serving_app import Scorer, app
Svc = app.endpoint(model="scorer@production", name="scorer", cpu=0.5)(Scorer)
"""


def test_a_dead_server_does_not_hide_a_live_one_and_figures_add_up(
    serve: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    promoted()
    live = serve()
    (tmp_path / "svc.py").write_text(SERVER_APP.format(here=str(HERE)))
    other = subprocess.Popen(
        [sys.executable, "-m", "kiln", "serve", f"{tmp_path / 'svc.py'}:Svc", "--port", "0"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        row = wait_for(lambda: _listed(lambda r: len(r["servers"]) == 2), what="two servers")
        urls = {s["url"] for s in row["servers"]}
        for url, n in ((live.url, 3), (next(iter(urls - {live.url})), 2)):
            for _ in range(n):
                assert httpx.post(f"{url}/predict", json={"x": [1]}).status_code == 200
        row = wait_for(lambda: _listed(lambda r: r["stats"].get("requests") == 5),
                       what="both servers' requests")  # fmt: skip
        assert row["status"] == "serving"
        shown = CliRunner().invoke(cli, ["endpoints", "ls"])
        assert "serving (2 servers)" in shown.output, shown.output
    finally:
        os.killpg(other.pid, signal.SIGKILL)  # dies without a word, as a crash would
        other.wait()
    row = _listed(lambda r: True)
    assert row is not None and row["status"] == "serving" and row["url"] == live.url
    assert row["stats"]["requests"] == 3  # the live server's
    assert sorted(s["status"] for s in row["servers"]) == ["gone", "serving"]


def _listed(check: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    listed = CliRunner().invoke(cli, ["endpoints", "ls", "--json"])
    rows = [r for r in json.loads(listed.output) if r["name"] == "scorer"]
    return rows[0] if rows and check(rows[0]) else None


def test_request_counts_include_a_canary_after_its_split_ends(
    serve: Callable[..., ServerHandle],
) -> None:
    first = promoted(1.0)
    second = register(2.0)
    handle = serve()
    set_split = ["endpoints", "set-traffic", "scorer", f"scorer:{first}=50", f"scorer:{second}=50"]
    assert CliRunner().invoke(cli, set_split).exit_code == 0
    wait_for(lambda: len(handle.app.weights) == 2, what="the split")
    with httpx.Client(base_url=handle.url) as client:
        seen = Counter(client.post("/predict", json={"x": [1]}).json()["version"]
                       for _ in range(10))  # fmt: skip
    assert seen == {first: 5, second: 5}
    follow = CliRunner().invoke(cli, ["endpoints", "set-traffic", "scorer", "--follow"])
    assert follow.exit_code == 0, follow.output
    wait_for(lambda: list(handle.app.weights) == [first], what="the canary's end")
    stats = wait_for(lambda: _drained(handle.app.stats(), second), what="the canary drained")
    assert stats["requests"] == 10
    assert stats["versions"][str(second)]["requests"] == 5
    assert stats["versions"][str(second)]["weight"] == 0.0
    row = wait_for(lambda: _listed(lambda r: r["stats"].get("requests") == 10),
                   what="the figures in the store")  # fmt: skip
    assert row["stats"]["versions"][str(second)]["requests"] == 5


def _drained(stats: dict[str, Any], version: int) -> dict[str, Any] | None:
    return stats if stats["versions"][str(version)]["replicas"] == 0 else None


def test_what_replicas_print_is_recorded_by_version_and_still_shown(tmp_path: Path) -> None:
    version = promoted(1.0)
    endpoint = app.endpoint(model="scorer@production", cpu=0.5, name="talker")(Talker)
    handle = endpoint.serve(port=0, block=False)
    assert handle is not None
    try:
        with httpx.Client(base_url=handle.url) as client:
            for i in range(3):
                assert client.post("/predict", json={"x": [i]}).status_code == 200
    finally:
        handle.stop()  # what is left is stored as it stops
    chunks = store().endpoint_logs("talker")
    said = [(c.version, c.stream, c.text) for c in chunks]
    assert (version, "stdout", f"loaded version {version}\n") in said
    assert [t for v, s, t in said if s == "stderr" and v == version] == [
        "scoring [0.0]\n",
        "scoring [1.0]\n",
        "scoring [2.0]\n",
    ]
    assert store().endpoint_logs("talker", version=version + 1) == []
    result = CliRunner().invoke(cli, ["logs", "--endpoint", "talker"])
    assert result.exit_code == 0, result.output
    assert f"[v{version}] loaded version {version}" in result.output
    assert CliRunner().invoke(cli, ["logs", "--endpoint", "nowhere"]).exit_code != 0
