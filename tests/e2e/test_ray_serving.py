"""Endpoints on Ray Serve, on the real two-node Ray cluster, over real HTTP."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from serving_app import Scorer, Talker, app, register
from test_serving import _explained, promoted, store, wait_for
from typer.testing import CliRunner

import kiln
from kiln.cli import app as cli
from kiln.errors import ValidationError
from kiln.observe.why import find_trace, list_spans
from kiln.registry.traffic import set_traffic
from kiln.serve import state
from kiln.serve.on_ray import RayEndpoint


@pytest.fixture
def serve_on_ray(on_ray: str) -> Iterator[Callable[..., RayEndpoint]]:
    handles: list[RayEndpoint] = []

    def start(**spec: Any) -> RayEndpoint:
        endpoint = app.endpoint(
            **{"model": "scorer@production", "cpu": 0.5, "name": "scorer", **spec}
        )(Talker)
        with socket.socket() as probe:  # a free port for Ray Serve's proxy
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        handle = endpoint.serve(port=port, block=False, backend="ray")
        assert isinstance(handle, RayEndpoint)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


def test_an_endpoint_on_ray_serve_answers_traces_and_follows_its_alias(
    serve_on_ray: Callable[..., RayEndpoint],
) -> None:
    first = promoted(2.0)
    handle = serve_on_ray(min_replicas=0, max_replicas=2, target_concurrency=1)
    assert handle.stats()["replicas"] == 0  # scaled to zero until a request comes
    with httpx.Client(base_url=handle.url, timeout=60) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.delete("/healthz").headers["allow"] == "GET, HEAD"
        assert client.get("/predict").status_code == 405
        document = client.get("/openapi.json").json()
        assert document["servers"] == [{"url": "/scorer"}] and "/predict" in document["paths"]
        response = client.post("/predict", json={"x": [1, 2]})  # a cold start on Ray
        assert response.status_code == 200, response.text
        assert response.json()["score"] == 6.0 and response.json()["version"] == first
        assert response.headers["x-kiln-model"] == f"scorer:{first}"
        assert response.headers["traceparent"].split("-")[1] == response.headers["x-kiln-trace-id"]
        bad = client.post("/predict", json={"x": [1, "two"]})
        assert bad.status_code == 422 and bad.json()["error"].startswith("x.1: ")
        assert handle.stats()["replicas"] >= 1
        # The same span as on the local engine, and `kiln why` walks it to the run.
        info = wait_for(lambda: _explained(response.headers["x-kiln-trace-id"]), what="span")
        assert info["model"]["ref"] == f"scorer:{first}"
        assert info["run"]["id"] == app.models.get("scorer@production").run_id
        assert info["endpoint"] == "scorer" and info["kind"] == "CHAIN"
        (span,) = find_trace(store(), response.headers["x-kiln-trace-id"])
        assert span["name"] == "POST /scorer/predict"
        assert span["attributes"]["http.route"] == "/scorer/predict"
        # Promote under load: the new version's app is ready before the router moves.
        failures: list[int] = []
        seen: set[int] = set()
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=handle.url, timeout=60) as c:
                while not stop.is_set():
                    r = c.post("/predict", json={"x": [1]})
                    if r.status_code != 200:
                        failures.append(r.status_code)
                    else:
                        seen.add(r.json()["version"])

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        second = register(3.0)
        app.models.promote("scorer", second, alias="production", reason="on ray")
        try:
            wait_for(lambda: second in seen, timeout=120, what="the promoted version")
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert failures == [] and seen == {first, second}
        assert client.post("/predict", json={"x": [1]}).json()["version"] == second
        # A live canary split: the router sends every other request to each version.
        split = {f"scorer:{first}": 50, f"scorer:{second}": 50}
        set_traffic(store(), "scorer", split, actor="tester")
        wait_for(lambda: len(handle.weights) == 2, timeout=120, what="the split")
        wait_for(lambda: len({client.post("/predict", json={"x": [1]}).json()["version"]
                              for _ in range(2)}) == 2, what="the new router")  # fmt: skip
        versions = [client.post("/predict", json={"x": [1]}).json()["version"] for _ in range(8)]
        assert sorted(versions) == [first] * 4 + [second] * 4
    # Its figures reach the store, from Ray Serve and the router, for `kiln endpoints`.
    row = wait_for(lambda: _reported(state.get(store(), "scorer")), timeout=30, what="figures")
    assert row.status == "serving" and row.url == handle.url
    assert row.stats["versions"][str(second)]["usage"]["cpu_seconds"] > 0
    shown = CliRunner().invoke(cli, ["endpoints", "show", "scorer"])
    assert shown.exit_code == 0 and "on Ray Serve" in shown.output, shown.output
    # What its replicas printed is the endpoint's, by version (Ray logs it as ever).
    for version in (first, second):
        said = wait_for(lambda v=version: [c.text for c in store().endpoint_logs("scorer",
                        version=v)], timeout=30, what=f"v{version}'s output")  # fmt: skip
        assert f"loaded version {version}\n" in said and "scoring [1.0]\n" in said
    handle.stop()
    assert state.get(store(), "scorer").status == "stopped"
    import ray
    from ray import serve

    ray.init(address=on_ray_address(), log_to_driver=False)  # stop() disconnected
    try:
        assert not any(name.startswith("scorer") for name in serve.status().applications)
    finally:
        ray.shutdown()


def _reported(row: state.EndpointInfo) -> state.EndpointInfo | None:
    """The row once its figures count the requests sent, on both versions."""
    return row if row.stats.get("requests", 0) >= 8 and len(row.stats["versions"]) == 2 else None


def on_ray_address() -> str:
    import os

    return os.environ["KILN_RAY_ADDRESS"]


def test_a_batch_job_on_ray_runs_on_ray_actors_and_is_recorded(on_ray: str) -> None:
    version = promoted(2.0)
    endpoint = app.endpoint(model="scorer@production", cpu=0.5, max_replicas=2)(Scorer)
    rows = [{"x": [i]} for i in range(50)] + [{"x": ["bad"]}]
    result = endpoint.batch(rows, shard_size=10)
    assert result.rows == 51 and result.rows_failed == 1 and result.shards == 6
    outputs = result.outputs or []
    assert [o["score"] for o in outputs[:50]] == [2.0 * i for i in range(50)]  # in order
    assert outputs[50]["error"].startswith("x.0: ")
    assert {o["version"] for o in outputs[:50]} == {version}
    pids = {o["pid"] for o in outputs[:50]}
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids  # Ray actors answered, not us
    record = kiln.get_run(result.run_id)
    assert record.status is kiln.RunStatus.SUCCEEDED and record.result["rows"] == 51
    spans = list_spans(store(), endpoint="scorer", limit=None)  # flushed as each actor stops
    mine = [s for s in spans if s["attributes"].get("kiln.batch.run_id") == result.run_id]
    assert len(mine) == 6 and {s["model_version"] for s in mine} == {version}


def test_serving_on_ray_refuses_bad_input_before_deploying() -> None:
    endpoint = app.endpoint(model="scorer@production", cpu=0.5)(Scorer)
    with pytest.raises(ValidationError, match="port: Ray Serve's proxy needs a fixed port"):
        endpoint.serve(port=0, block=False, backend="ray")
    with pytest.raises(ValidationError, match="backend: 'k8s' cannot serve"):
        endpoint.serve(port=0, block=False, backend="k8s")
