"""Serving: HTTP throughput and p99, cold start from zero, batch rows/s.

- HTTP: ``kiln serve`` of a one-replica endpoint (tracing on: every request is a span
  exported to the store) against the bare FastAPI app a user would write for the same
  answer (``{"sum": sum(x), "n": len(x)}`` of 16 floats, pydantic-validated), both on
  uvicorn (uvloop, httptools), loaded by wrk (1 thread, 32 connections, 127.0.0.1),
  alternating, 3 rounds of 5 s each after a warm-up; medians. Goal: requests/s at
  least FastAPI's, p99 at most +1 ms.
- Cold start: the demo's digits model served with ``min_replicas=0``: time from a
  request finding zero replicas to its answer, median of 5, after the endpoint scaled
  to zero; against a fresh interpreter in the same environment importing and loading
  the same model and answering (what a replica costs without a standby). Goal: < 1 s.
- Batch: 100,000 JSONL rows through ``Endpoint.batch`` (shards on 2 replicas, written
  in order, checkpointed, recorded as a run), against a plain loop in one process that
  reads the same file, calls ``predict`` on each row and writes the answers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from _common import Row, emit

HERE = Path(__file__).parent
LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"x":[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,1.1,1.2,1.3,1.4,1.5,1.6]}'
"""
ROUNDS, SECONDS = 3, 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    body = {"x": [1.0, 2.0]}
    while time.monotonic() < deadline:
        try:
            if httpx.post(url + "/predict", json=body, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def wrk(url: str, script: Path, seconds: int) -> tuple[float, float]:
    """(requests/s, p99 ms)."""
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", "--latency", "-s", str(script), url + "/predict"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rps = float(next(x.split()[1] for x in out.splitlines() if x.startswith("Requests/sec")))
    p99 = next(x.split()[1] for x in out.splitlines() if x.strip().startswith("99%"))
    value = float(p99[:-2]) if p99.endswith("ms") else float(p99[:-2]) / 1000  # ms or us
    if p99.endswith("s") and not p99.endswith(("ms", "us")):
        value = float(p99[:-1]) * 1000
    return rps, value


def http(env: dict[str, str], work: Path) -> list[Row]:
    script = work / "post.lua"
    script.write_text(LUA)
    results: dict[str, list[tuple[float, float]]] = {"kiln": [], "fastapi": []}
    for round_ in range(ROUNDS):
        for name in ("fastapi", "kiln") if round_ % 2 == 0 else ("kiln", "fastapi"):
            port = free_port()
            if name == "kiln":
                cmd = [sys.executable, "-m", "kiln", "serve", f"{HERE / 'serve_app.py'}:Summer",
                       "--port", str(port)]  # fmt: skip
            else:
                cmd = [sys.executable, "-m", "uvicorn", "serve_app:fastapi_app", "--port",
                       str(port), "--log-level", "warning", "--no-access-log"]  # fmt: skip
            proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)  # fmt: skip
            try:
                url = f"http://127.0.0.1:{port}"
                wait_ready(url)
                wrk(url, script, 2)  # warm-up
                results[name].append(wrk(url, script, SECONDS))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    k_rps = statistics.median(r for r, _ in results["kiln"])
    b_rps = statistics.median(r for r, _ in results["fastapi"])
    k_p99 = statistics.median(p for _, p in results["kiln"])
    b_p99 = statistics.median(p for _, p in results["fastapi"])
    print(f"http: kiln {results['kiln']} fastapi {results['fastapi']}", file=sys.stderr)
    return [
        Row("serve", "POST /predict, 1 replica, tracing on (wrk -c32)", k_rps, b_rps,
            "bare FastAPI + uvicorn, same answer", "req/s", ">= 1.0x FastAPI",
            k_rps >= b_rps),
        Row("serve", "p99 latency at 32 connections", k_p99, b_p99,
            "bare FastAPI + uvicorn", "ms", "<= FastAPI + 1 ms", k_p99 <= b_p99 + 1.0),
    ]  # fmt: skip


def cold_start(env: dict[str, str]) -> list[Row]:
    """Serve the demo's model from zero replicas, in this process."""
    os.environ.update(env)
    subprocess.run([sys.executable, "-m", "kiln", "demo", "--epochs", "3", "--no-serve"],
                   env=env, check=True, capture_output=True)  # fmt: skip
    from kiln._demo import Digits
    from kiln.envs.manager import env_manager
    from kiln.record.recorder import recorder_for
    from kiln.serve.endpoint import Endpoint

    demo: Endpoint = Digits  # type: ignore[assignment]
    endpoint = Endpoint(demo.app, demo.cls, dataclasses.replace(demo.spec, idle_timeout=0.5))
    pixels = {"pixels": [0.0] * 64}
    handle = endpoint.serve(port=0, block=False)
    assert handle is not None
    times = []
    try:
        with httpx.Client(base_url=handle.url, timeout=120) as client:
            client.post("/predict", json=pixels)  # the first ever: teaches the standby
            for _ in range(5):
                deadline = time.monotonic() + 60
                while handle.app.stats()["replicas"] and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(3.0)  # the standby refills after each cold start
                t = time.perf_counter()
                assert client.post("/predict", json=pixels).status_code == 200
                times.append(time.perf_counter() - t)
    finally:
        handle.stop()
    settings = demo.app.settings
    store = recorder_for(settings).store
    built = env_manager(settings.home, store.blobs).ensure(demo.spec.env)
    model = demo.app.models.get("digits@production")
    path = store.blobs.path(model.artifact_sha256)
    fresh_code = (
        f"import pickle, pathlib; b = pickle.loads(pathlib.Path({str(path)!r}).read_bytes()); "
        "b['model'].predict(b['scaler'].transform([[0.0] * 64]))"
    )
    fresh = statistics.median(
        _timed_run([str(built.python), "-c", fresh_code], env) for _ in range(3)
    )
    cold = statistics.median(times)
    print(f"cold starts {times}, fresh interpreter {fresh:.3f}s", file=sys.stderr)
    return [Row("serve", "cold start from zero replicas, demo model (request to answer)",
                cold, fresh, "fresh interpreter: import, load, predict", "s", "< 1 s",
                cold < 1.0)]  # fmt: skip


def _timed_run(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def batch(env: dict[str, str], work: Path) -> list[Row]:
    from serve_app import Summer

    os.environ.update(env)
    with Summer.app.run() as run:
        from kiln.record.runs import save

        save("model.pkl", {"offset": 0.0})
    models = Summer.app.models
    if "summer" not in models.names():
        models.register("summer", run.id, artifact="model.pkl")
        models.promote("summer", 1, alias="production")
    rows = 100_000
    data = work / "rows.jsonl"
    x = [0.1 * i for i in range(16)]
    data.write_text("".join(json.dumps({"x": x}) + "\n" for _ in range(rows)))
    endpoint = dataclasses.replace(Summer.spec, max_replicas=2)
    from kiln.serve.endpoint import Endpoint

    job = Endpoint(Summer.app, Summer.cls, endpoint)
    result = job.batch(data, output=work / "out.jsonl", shard_size=5000)
    kiln_rps = rows / result.seconds

    def plain() -> float:
        model = Summer.cls()
        model.offset = 0.0
        t = time.perf_counter()
        with data.open() as f, (work / "plain.jsonl").open("w") as out:
            for line in f:
                out.write(json.dumps(model.predict(**json.loads(line))) + "\n")
        return rows / (time.perf_counter() - t)

    plain_rps = statistics.median(plain() for _ in range(3))
    return [Row("serve", "batch 100k JSONL rows (2 replicas, checkpointed, recorded)",
                kiln_rps, plain_rps, "plain loop: json, predict, json in one process",
                "rows/s", "(reported)", True)]  # fmt: skip


def main() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("bench_serve needs wrk on PATH (Debian: apt-get install -y wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "KILN_HOME": str(work / "home"), "KILN_ACTOR": "bench"}
        env.pop("KILN_STORE", None)
        rows = batch(env, work)  # also registers the model the HTTP bench serves
        rows = http(env, work) + rows
        rows += cold_start(env)
    emit(rows)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
