"""``kiln server`` as a real process: its HTTP contract (problems, limits, ranges, the
OpenAPI document checked by schemathesis), metrics, shutdown, and ingest that neither
loses nor duplicates a point when the server is killed."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerProcess
from kiln.config import Settings
from kiln.record.model import RunStatus
from kiln.record.store import open_store
from kiln.record.store.base import WriteBatch
from kiln.record.store.http import HttpStore
from kiln.record.store.rows import RunRow, RunUpdate

Start = Callable[..., ServerProcess]


def run_row(run_id: str) -> dict[str, object]:
    return {"id": run_id, "app": "a", "status": "running", "created_at": 1.0, "params": {},
            "tags": {}}  # fmt: skip


def test_errors_are_problems_naming_the_field(start_server: Start) -> None:
    server = start_server()
    with httpx.Client(base_url=server.url) as http:
        missing = http.get("/api/v1/runs/0123abcd")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        assert missing.json()["type"] == "urn:kiln:error:RunNotFoundError"
        unknown = http.get("/api/v1/nothing-here")
        assert unknown.status_code == 404 and unknown.json()["status"] == 404
        wrong = http.put("/api/v1/runs/0123abcd")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "DELETE, GET"
        bad = http.post("/api/v1/runs:search", json={"limit": "ten", "colour": 1})
        assert bad.status_code == 422
        assert {e["field"] for e in bad.json()["errors"]} == {"body.limit", "body.colour"}
        row = {**run_row("ab" * 16), "pid": "7"}  # a string is not a number, even "7"
        body = gzip.compress(json.dumps({"new_runs": [row]}).encode())
        refused = http.post("/api/v1/batches", content=body,
                            headers={"Content-Encoding": "gzip"})  # fmt: skip
        assert refused.status_code == 422 and refused.json()["field"] == "body.new_runs.0.pid"
        assert http.get("/api/v1/runs/" + "ab" * 16).status_code == 404  # nothing written


def test_bodies_are_bounded_even_when_compressed(start_server: Start) -> None:
    server = start_server()
    bomb = gzip.compress(b"[" + b" " * (80 << 20) + b"]")  # 80 MiB of spaces in 80 KiB
    assert len(bomb) < 200_000
    with httpx.Client(base_url=server.url, timeout=60) as http:
        answer = http.post("/api/v1/batches", content=bomb, headers={"Content-Encoding": "gzip"})
        assert answer.status_code == 413
        broken = http.post("/api/v1/batches", content=b"\x1f\x8b not gzip",
                           headers={"Content-Encoding": "gzip"})  # fmt: skip
        assert broken.status_code == 400 and "gzip" in broken.json()["detail"]
        assert http.get("/healthz").json() == {"status": "ok"}  # still serving


def test_blobs_are_checked_on_upload_and_read_in_ranges(
    start_server: Start, tmp_path: Path
) -> None:
    server = start_server()
    data = os.urandom(3 << 20)
    sha = hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=server.url) as http:
        liar = http.put(f"/api/v1/blobs/{sha}", content=data[:-1])
        assert liar.status_code == 422 and liar.json()["field"] == "sha256"
        assert http.head(f"/api/v1/blobs/{sha}").status_code == 404  # nothing kept
        assert http.put(f"/api/v1/blobs/{sha}", content=data).status_code == 201
        assert http.put(f"/api/v1/blobs/{sha}", content=data).status_code == 200  # had it
        assert http.head(f"/api/v1/blobs/{sha}").headers["content-length"] == str(len(data))
        part = http.get(f"/api/v1/blobs/{sha}", headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == data[100:200]
        assert http.get(f"/api/v1/blobs/{sha}").content == data
    leftovers = [p for p in (server.home / "blobs").rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []  # the refused upload left no temporary file


def test_a_non_loopback_address_is_served_only_with_tokens(tmp_path: Path) -> None:
    found = subprocess.run(
        [sys.executable, "-m", "kiln", "server", "--host", "0.0.0.0", "--port", "0",  # noqa: S104  refused
         "--home", str(tmp_path / "h"), "--insecure-no-auth"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert found.returncode != 0
    assert "--insecure-no-auth" in found.stderr and "--host" in found.stderr
    served = subprocess.Popen(
        [sys.executable, "-m", "kiln", "server", "--host", "0.0.0.0", "--port", "0",  # noqa: S104  with tokens
         "--home", str(tmp_path / "h")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert served.stdout is not None
        assert served.stdout.readline().startswith("kiln server: http://0.0.0.0:")
        assert "--enrol kiln_" in served.stdout.readline()
    finally:
        served.terminate()
        served.wait(timeout=60)
        assert served.stdout is not None
        served.stdout.close()


def test_metrics_count_requests_by_route_and_points_ingested(
    start_server: Start, tmp_path: Path
) -> None:
    server = start_server()
    with HttpStore(server.url, cache=tmp_path / "cache") as store:
        rid = "cd" * 16
        store.write(WriteBatch(new_runs=[RunRow.model_validate(run_row(rid))]))
        store.write(WriteBatch(metrics=[(rid, "loss", i, 1.0, 0.5) for i in range(250)]))
        store.get_run(rid)
    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    points = families["kiln_server_ingested_points"].samples
    assert [s.value for s in points if s.name.endswith("_total")] == [250.0]
    requests = {
        (s.labels["route"], s.labels["method"], s.labels["code"]): s.value
        for s in families["kiln_server_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests[("/api/v1/batches", "POST", "200")] == 2
    assert requests[("/api/v1/runs/{run_id}", "GET", "200")] == 1
    latency = families["kiln_server_request_duration_seconds"].samples
    assert any(s.labels.get("route") == "/api/v1/batches" for s in latency)


def test_schemathesis_finds_no_fault_in_the_openapi_document(
    start_server: Start, tmp_path: Path
) -> None:
    server = start_server()
    document = httpx.get(f"{server.url}/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    assert "Batch" in document["components"]["schemas"]
    report = tmp_path / "report.json"
    # Every check but positive_data_acceptance: a schema cannot say that a blob's bytes
    # must hash to its name or that a policy's gate must parse, so the server rightly
    # refuses some requests that the schema allows.
    found = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
         "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         "--max-examples", "12", "--seed", "1", "--workers", "1",
         "--generation-deterministic", "--no-color", "--request-timeout", "30",
         "--report", "json", "--report-json-path", str(report)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"},
    )  # fmt: skip
    assert found.returncode == 0, found.stdout[-6000:] + found.stderr[-2000:]
    checked = json.loads(report.read_text())
    assert checked["failures"] == [] and checked["errors"] == []
    assert checked["operations"]["tested"] == checked["operations"]["selected"] >= 40
    assert "Traceback" not in server.log.read_text()  # no request made the server fail


def test_sigterm_lets_the_request_in_flight_finish(start_server: Start, tmp_path: Path) -> None:
    server = start_server()
    assert server.proc is not None
    proc = server.proc
    data = os.urandom(4 << 20)
    sha = hashlib.sha256(data).hexdigest()

    def upload() -> Iterator[bytes]:
        yield data[: 1 << 20]
        proc.send_signal(signal.SIGTERM)  # the server stops while the upload is under way
        time.sleep(0.5)
        for start in range(1 << 20, len(data), 1 << 20):
            yield data[start : start + (1 << 20)]

    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.put(f"/api/v1/blobs/{sha}", content=upload()).status_code == 201
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn ends by the signal
    restarted = start_server(home=server.home)
    with httpx.Client(base_url=restarted.url) as http:
        assert http.get(f"/api/v1/blobs/{sha}").content == data


def test_an_idempotency_key_applies_a_batch_once(start_server: Start, tmp_path: Path) -> None:
    server = start_server()
    with HttpStore(server.url, cache=tmp_path / "cache") as store:
        rid = "ab" * 16
        store.write(WriteBatch(new_runs=[RunRow.model_validate(run_row(rid))]))
        batch = WriteBatch(metrics=[(rid, "m", i, 1.0, float(i)) for i in range(10)],
                           key="retried-batch-1")  # fmt: skip
        store.write(batch)
        store.write(batch)  # as a client that never heard back sends it again
        assert len(store.metric_history(rid, "m")) == 10
        assert len(store.audit_events(action="run.create")) == 1


LOGGER = textwrap.dedent(
    """
    import sys, kiln
    app = kiln.App("ingest")
    with app.run(params={"client": int(sys.argv[1])}) as run:
        for i in range(int(sys.argv[2])):
            kiln.log({"x": float(i)}, step=i)
    print(run.id)
    """
)


def test_kill_9_of_the_server_loses_and_duplicates_no_point(
    start_server: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four processes log 50,000 points each; the server is killed outright meanwhile and
    started again on the same port: every point is stored exactly once."""
    server = start_server()
    port = int(server.url.rsplit(":", 1)[1])
    env = {**os.environ, "KILN_SERVER": server.url, "KILN_HOME": str(tmp_path / "client")}
    clients = [
        subprocess.Popen([sys.executable, "-c", LOGGER, str(n), "50000"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(4)
    ]  # fmt: skip
    with httpx.Client(base_url=server.url) as http:  # wait until points arrive, then kill
        for _ in range(600):
            if _ingested(http) > 20_000:
                break
            time.sleep(0.05)
    server.kill()
    restarted = ServerProcess(server.store_url, server.home)
    for _ in range(100):  # the port is free once the killed process is gone
        try:
            restarted.start(port=port)
            break
        except RuntimeError:
            time.sleep(0.1)
    try:
        run_ids = []
        for client in clients:
            out, err = client.communicate(timeout=300)
            assert client.returncode == 0, err
            run_ids.append(out.split()[-1])
        monkeypatch.setenv("KILN_SERVER", restarted.url)
        with open_store(Settings.from_env()) as store:
            for run_id in run_ids:
                steps = [p.step for p in store.metric_history(run_id, "x")]
                assert steps == list(range(50_000)), run_id
                assert store.get_run(run_id).status == "succeeded"
    finally:
        restarted.stop()


def _ingested(http: httpx.Client) -> float:
    try:
        text = http.get("/metrics").text
    except httpx.TransportError:
        return 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "kiln_server_ingested_points":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    return 0.0


SPOOLER = textwrap.dedent(
    """
    import kiln
    app = kiln.App("offline")
    with app.run(params={"n": 3}) as run:
        for i in range(3000):
            kiln.log({"x": float(i)}, step=i)
        kiln.save("model.bin", b"weights")
    print(run.id)
    """
)


def test_a_run_goes_on_while_the_server_is_down_and_kiln_sync_sends_it(
    start_server: Start, tmp_path: Path
) -> None:
    server = start_server()
    port = int(server.url.rsplit(":", 1)[1])
    env = {**os.environ, "KILN_SERVER": server.url, "KILN_HOME": str(tmp_path / "client"),
           "KILN_SYNC_WAIT_S": "0.5"}  # fmt: skip
    warm = subprocess.run([sys.executable, "-c", "import kiln; kiln.App('x').models.names()"],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert warm.returncode == 0, warm.stderr
    server.stop()
    done = subprocess.run([sys.executable, "-c", SPOOLER], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.split()[-1]
    assert "kiln sync" in done.stderr  # named once, with the spool file
    spooled = list((tmp_path / "client" / "spool").glob("*.jsonl"))
    assert len(spooled) == 1
    restarted = ServerProcess(server.store_url, server.home).start(port=port)
    try:
        synced = subprocess.run([sys.executable, "-m", "kiln", "sync", "--json"], env=env,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert synced.returncode == 0, synced.stderr
        assert json.loads(synced.stdout)["left"] == []
        again = subprocess.run([sys.executable, "-m", "kiln", "sync", "--json"], env=env,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert json.loads(again.stdout) == {"sent": 0, "left": [], "refused": []}
        with HttpStore(restarted.url, cache=tmp_path / "cache") as store:
            record = store.get_run(run_id)
            assert record.status == "succeeded" and record.params == {"n": 3}
            assert [p.step for p in store.metric_history(run_id, "x")] == list(range(3000))
            assert record.load("model.bin") == b"weights"  # the blob waited in the spool too
            assert list(store.verify()) == []
    finally:
        restarted.stop()


def test_kiln_push_copies_runs_with_blobs_and_points_once(
    start_server: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "local"
    env = {**os.environ, "KILN_HOME": str(local)}
    env.pop("KILN_SERVER", None)
    made = subprocess.run([sys.executable, "-c", SPOOLER], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert made.returncode == 0, made.stderr
    run_id = made.stdout.split()[-1]
    server = start_server()
    push = [sys.executable, "-m", "kiln", "push", "--all", "--to", server.url, "--json"]
    first = subprocess.run(push, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["pushed"] == [run_id]
    second = subprocess.run(push, env=env, capture_output=True, text=True, timeout=120)
    assert json.loads(second.stdout) == {"pushed": [], "already_there": [run_id],
                                         "to": server.url}  # fmt: skip
    with HttpStore(server.url, cache=tmp_path / "cache") as store:
        record = store.get_run(run_id)
        assert record.load("model.bin") == b"weights"
        assert len(store.metric_history(run_id, "x")) == 3000
        imports = store.audit_events(action="run.import")
        assert [e["target"] for e in imports] == [run_id]
        assert list(store.verify()) == []


def test_hostile_writes_are_refused_before_anything_is_stored(
    start_server: Start, tmp_path: Path
) -> None:
    server = start_server()
    rid = "cd" * 16
    post = {"headers": {"Content-Type": "application/json"}}
    with httpx.Client(base_url=server.url) as http:
        for row, field in (
            (json.dumps({**run_row(rid), "params": {"lr": float("nan")}}),
             "body.new_runs.0.params.lr"),
            (json.dumps({**run_row(rid), "result": 2**70}), "body.new_runs.0.result"),
            (json.dumps({**run_row(rid), "result": json.loads("[" * 70 + "]" * 70)}),
             "body.new_runs.0.result"),
            (json.dumps(run_row("../../" + "a" * 26)), "body.new_runs.0.id"),
            (json.dumps({**run_row(rid), "app": "a b"}), "body.new_runs.0.app"),
        ):  # fmt: skip
            refused = http.post("/api/v1/batches", content=f'{{"new_runs": [{row}]}}', **post)
            assert refused.status_code == 422, row
            assert refused.json()["field"] == field
        artifact = {"run_id": rid, "direction": "out", "name": "m", "kind": "file",
                    "sha256": "e" * 64, "size": 1}  # fmt: skip
        body = {"new_runs": [run_row(rid)], "artifacts": [artifact]}
        lacking = http.post("/api/v1/batches", json=body)
        assert lacking.status_code == 422 and lacking.json()["field"] == "artifacts.0.sha256"
        whole = gzip.compress(json.dumps({"new_runs": [run_row(rid)]}).encode())
        for bad in (whole[:-9], whole + b"junk"):
            cut = http.post("/api/v1/batches", content=bad, headers={"Content-Encoding": "gzip"})
            assert cut.status_code == 400 and "gzip" in cut.json()["detail"]
        assert http.get(f"/api/v1/runs/{rid}").status_code == 404  # nothing was written
        # a split is checked by the server, which writes its own audit event
        forged = {"split": {"m:1": 100}, "payload": {"override_policy": "x"}}
        refused = http.put("/api/v1/endpoints/scorer/traffic", json=forged)
        assert refused.status_code == 422
        # a refusal names the field, not where the server keeps its files
        http.post("/api/v1/batches", json={"new_runs": [run_row(rid)]}).raise_for_status()
        taken = http.post("/api/v1/batches", json={"new_runs": [run_row(rid)]})
        assert taken.status_code in (409, 422)
        assert str(server.home) not in taken.text and server.store_url not in taken.text
    with HttpStore(server.url, cache=tmp_path / "cache", actor="Zoë Ωmega") as store:
        store.write(WriteBatch(updates=[RunUpdate(id=rid, status=RunStatus.FAILED, ended_at=2.0,
                                                  error="x" * 1_500_000)]))  # fmt: skip
        record = store.get_run(rid)
        assert record.error is not None and len(record.error) <= 1_000_000
        assert record.error.startswith("[500,100 characters cut here]")
    with HttpStore(server.url, cache=tmp_path / "cache2", actor="Zoë Ωmega") as store:
        store.write(WriteBatch(new_runs=[RunRow.model_validate(run_row("ef" * 16))]))
        assert store.audit_events(action="run.create", target="ef" * 16)[0]["actor"] == "Zoë Ωmega"


def test_a_refused_row_costs_only_itself(start_server: Start, tmp_path: Path) -> None:
    server = start_server()
    env = {**os.environ, "KILN_SERVER": server.url, "KILN_HOME": str(tmp_path / "client")}
    script = textwrap.dedent(
        """
        import kiln
        from kiln.record import recorder
        from kiln.record.store.rows import ArtifactRow
        with kiln.App("a").run() as run:
            kiln.log({"x": 1.0})
            rec = recorder.recorder_for(kiln.config.Settings.from_env())
            rec.enqueue(artifacts=[ArtifactRow(run_id=run.id, direction="out", name="ghost",
                                               kind="file", sha256="e" * 64, size=1)])
            kiln.log({"x": 2.0})
        print(run.id)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    with HttpStore(server.url, cache=tmp_path / "cache") as store:
        record = store.get_run(done.stdout.split()[-1])
        assert record.status == "succeeded" and record.summary == {"x": 2.0}
        assert list(record.artifacts) == []
        (warning,) = store.audit_events(action="run.warning", target=record.id)
        assert "does not hold" in json.loads(warning["payload"])["message"]


def test_kiln_sync_sets_aside_what_the_server_refuses_and_sends_the_rest(
    start_server: Start, tmp_path: Path
) -> None:
    server = start_server()
    spool = tmp_path / "client" / "spool"
    spool.mkdir(parents=True)
    good, bad = run_row("01" * 16), {**run_row("02" * 16), "status": "exploded"}
    lines = [{"key": "key-of-bad-1", "actor": "ann", "batch": {"new_runs": [bad]}},
             {"blob": "e" * 64},  # its bytes are not in the cache
             {"key": "key-of-good-1", "actor": "ann", "batch": {"new_runs": [good]}}]  # fmt: skip
    (spool / "1-1-ab.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = {**os.environ, "KILN_SERVER": server.url, "KILN_HOME": str(tmp_path / "client")}
    synced = subprocess.run([sys.executable, "-m", "kiln", "sync", "--json"], env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert synced.returncode == 1
    out = json.loads(synced.stdout)
    assert out["sent"] == 1 and out["left"] == []
    (aside,) = out["refused"]
    kept = [json.loads(line) for line in Path(aside).read_text().splitlines()]
    assert [k.get("key", k.get("blob")) for k in kept] == ["key-of-bad-1", "e" * 64]
    assert "status" in kept[0]["refused"] and "gone" in kept[1]["refused"]
    with HttpStore(server.url, cache=tmp_path / "cache") as store:
        assert store.get_run("01" * 16).status == "running"


def test_a_client_that_sends_its_headers_slowly_is_cut_off(start_server: Start) -> None:
    import socket

    server = start_server()
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /api/v1/batches HTTP/1.1\r\nHost: x\r\n")  # and then nothing
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"application/problem+json" in answer
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/healthz").status_code == 200


def test_a_body_declared_past_the_json_bound_is_refused_before_it_is_read(
    start_server: Start,
) -> None:
    import socket
    from urllib.parse import urlsplit

    server = start_server()
    where = urlsplit(server.url)
    assert where.hostname is not None and where.port is not None
    with socket.create_connection((where.hostname, where.port), timeout=30) as conn:
        conn.sendall(b"PUT /api/v1/endpoints/fraud/traffic HTTP/1.1\r\nHost: kiln\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n{")  # fmt: skip
        answer = b""
        while b"bytes" not in answer and (chunk := conn.recv(4096)):  # headers, then body
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    answer = answer.decode()
    assert "larger than 67108864 bytes" in answer
