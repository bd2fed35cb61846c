"""The router of an endpoint on Kubernetes, run for real: in front of two real
front doors pinned to one version each (as each version's Deployment runs them), it
follows the alias in the record and moves traffic only once the new version answers
``/readyz``, dropping no request."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from serving_app import Scorer, app, register
from test_serving import wait_for

from kiln.config import Settings
from kiln.serve import on_kubernetes
from kiln.serve.on_kubernetes import Router

CLOSED = "http://127.0.0.1:9"  # nothing listens there: a version whose pods are not ready


@pytest.fixture
def router(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, dict[int, str]]]:
    monkeypatch.setattr(on_kubernetes, "POLL_S", 0.2)
    upstreams: dict[int, str] = {}
    endpoint = app.endpoint(model="scorer@production", cpu=0.5)(Scorer)
    routing = Router(endpoint.spec, Settings.from_env(), lambda v: upstreams.get(v, CLOSED))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(routing, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="the router to start")
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", upstreams
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_the_router_moves_to_a_new_version_once_its_pods_are_ready(
    router: tuple[str, dict[int, str]],
) -> None:
    url, upstreams = router
    first, second = register(1.0), register(2.0)
    app.models.promote("scorer", first, alias="production", reason="first")
    endpoint = app.endpoint(model="scorer@production", cpu=0.5)(Scorer)
    handles: list[Any] = []
    try:
        for version in (first, second):
            handles.append(endpoint.pinned(f"scorer:{version}", 1).serve(port=0, block=False))
        upstreams[first] = handles[0].url
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/readyz").status_code in (200, 503)
            wait_for(lambda: client.get("/readyz").status_code == 200, what="ready")
            answer = client.post("/predict", json={"x": [1, 2]})
            assert answer.json()["version"] == first
            assert answer.headers["x-kiln-model"] == f"scorer:{first}"
            # the alias moves; the new version's pods are not up: traffic stays
            app.models.promote("scorer", second, alias="production", reason="better")
            for _ in range(10):
                stays = client.post("/predict", json={"x": [1, 2]})
                assert stays.status_code == 200 and stays.json()["version"] == first
            upstreams[second] = handles[1].url  # its pods are ready now
            moved = wait_for(lambda: client.post("/predict", json={"x": [1]}).json()["version"]
                             == second, what="traffic to move")  # fmt: skip
            assert moved
            assert client.get("/").json()["weights"] == {str(second): 100.0}
            assert client.post("/predict", content=b"{").status_code == 422  # passed through
            assert client.get("/nowhere").status_code == 404
    finally:
        for handle in handles:
            handle.stop()
