"""Projects as tenants on a real ``kiln server`` (SQLite and PostgreSQL): one project's
runs, metrics, artifacts, lineage and blobs are, to another, things that do not exist;
tokens act in one project; an embedded store keeps one implicit project."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import kiln
from conftest import ServerProcess
from kiln.config import Settings
from kiln.errors import NotFoundError, RunNotFoundError, StoreRefusedError
from kiln.record.model import RunStatus
from kiln.record.store.base import RunQuery, WriteBatch
from kiln.record.store.http import HttpStore
from kiln.record.store.rows import ArtifactRow, RunRow, RunUpdate, SpanRow

Start = Callable[..., ServerProcess]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def two_projects(server: ServerProcess) -> tuple[str, str]:
    """An admin token of ``default`` and one of ``blue``, the same admin's."""
    assert server.enrolment is not None
    with httpx.Client(base_url=server.url) as http:
        root = http.post("/api/v1/enrol", json={"name": "root"}, headers=bearer(server.enrolment))
        default = root.json()["token"]
        made = http.post("/api/v1/projects", json={"name": "blue"}, headers=bearer(default))
        assert made.status_code == 201, made.text
        return default, made.json()["token"]["token"]


def span(trace: str, span_id: str, *, run_id: str) -> SpanRow:
    return SpanRow(trace_id=trace, span_id=span_id, name="POST /predict", endpoint="fraud",
                   model_name="fraud", model_version=1, run_id=run_id, start_ns=1,
                   duration_ns=5, status="ok", attributes={})  # fmt: skip


def record_a_run(store: HttpStore, blob: bytes, n: int) -> tuple[str, str]:
    """A finished run with metrics, a summary and an artifact; its id and the blob's sha."""
    run_id = (f"{n:x}" * 32)[:32]
    sha = store.blob_store.put_bytes(blob)
    store.write(WriteBatch(
        new_runs=[RunRow(id=run_id, app="fraud", status=RunStatus.RUNNING, created_at=1.0,
                         params={"lr": 0.1})],
        metrics=[(run_id, "loss", i, 1.0, 1.0 / (i + 1)) for i in range(5)],
        summaries=[(run_id, "fraud", "loss", 0.2)],
        artifacts=[ArtifactRow(run_id=run_id, direction="out", name="m.pkl", kind="file",
                               sha256=sha, size=len(blob))],
        updates=[RunUpdate(id=run_id, status=RunStatus.SUCCEEDED, ended_at=2.0)],
    ))  # fmt: skip
    return run_id, sha


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_one_projects_records_do_not_exist_for_another(
    kind: str, start_server: Start, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("pg_url") if kind == "postgres" else None
    server = start_server(url, auth=True)
    default, blue = two_projects(server)
    red_store = HttpStore(server.url, cache=tmp_path / "c1", token=default)
    blue_store = HttpStore(server.url, cache=tmp_path / "c2", token=blue)
    with red_store, blue_store:
        theirs, secret = record_a_run(red_store, b"red's model", 1)
        mine, _ = record_a_run(blue_store, b"blue's model", 2)
        # reads: another project's run is a run that does not exist
        with pytest.raises(RunNotFoundError):
            blue_store.get_run(theirs)
        with pytest.raises(RunNotFoundError):
            blue_store.get_run(theirs[:8])  # by prefix too
        assert [r.id for r in blue_store.query_runs(RunQuery(limit=None))] == [mine]
        top = blue_store.query_runs(RunQuery(order_by="-metrics.loss", limit=1))
        assert [r.id for r in top] == [mine]  # the page is full: filtered in SQL
        assert blue_store.metric_history(theirs, "loss") == []
        with pytest.raises(RunNotFoundError):
            blue_store.lineage(theirs)
        with pytest.raises(RunNotFoundError):
            blue_store.lineage(secret[:12])  # an artifact's hash names nothing here
        with pytest.raises(RunNotFoundError):
            blue_store.export_rows(theirs)
        # blobs: red's bytes are not blue's to read, or to claim by naming their hash
        assert not blue_store.blob_store.exists(secret)
        with pytest.raises(NotFoundError):
            blue_store.blob_store.read(secret)
        claim = ArtifactRow(run_id=mine, direction="out", name="stolen", kind="file",
                            sha256=secret, size=11)  # fmt: skip
        with pytest.raises(StoreRefusedError, match="does not hold"):
            blue_store.write(WriteBatch(artifacts=[claim]))
        # writes to another project's run change nothing
        blue_store.write(WriteBatch(
            metrics=[(theirs, "loss", 99, 1.0, 9.0)],
            updates=[RunUpdate(id=theirs, status=RunStatus.FAILED, error="x")],
        ))  # fmt: skip
        with pytest.raises(RunNotFoundError):
            blue_store.delete_run(theirs)
        record = red_store.get_run(theirs)
        assert record.status is RunStatus.SUCCEEDED and record.error is None
        assert len(red_store.metric_history(theirs, "loss")) == 5
        # sending the same bytes gives blue its own copy, checked as if new
        assert blue_store.blob_store.put_bytes(b"red's model") == secret
        assert blue_store.blob_store.read(secret) == b"red's model"
        # traces and the audit log are per project too
        trace = "ab" * 16
        red_store.write_spans([span(trace, "1" * 16, run_id=theirs)])
        assert [s["trace_id"] for s in red_store.list_spans()] == [trace]
        assert blue_store.list_spans() == [] and blue_store.list_spans(run_id=theirs) == []
        with pytest.raises(NotFoundError):
            blue_store.find_trace(trace[:8])
        assert red_store.audit_events(target=theirs)
        assert blue_store.audit_events(target=theirs) == []
        assert {e["target"] for e in blue_store.audit_events(limit=None)} >= {mine}
        assert list(red_store.verify()) == []
    with httpx.Client(base_url=server.url) as http:
        absent = http.get(f"/api/v1/runs/{'f' * 32}", headers=bearer(blue))
        hidden = http.get(f"/api/v1/runs/{theirs}", headers=bearer(blue))
        assert absent.status_code == hidden.status_code == 404
        assert absent.json()["title"] == hidden.json()["title"]
        assert theirs not in str(http.get("/api/v1/runs:search", headers=bearer(blue)).text)
        other = http.get("/api/v1/whoami", headers={**bearer(blue), "Kiln-Project": "default"})
        assert other.status_code == 403 and "acts in project blue" in other.json()["detail"]


def test_tokens_act_in_their_project_and_no_wider(start_server: Start) -> None:
    server = start_server(auth=True)
    default, blue = two_projects(server)
    with httpx.Client(base_url=server.url) as http:
        added = http.post("/api/v1/principals", headers=bearer(blue),
                          json={"name": "ann", "role": "member"})  # fmt: skip
        assert added.status_code == 201, added.text
        ann = http.post("/api/v1/tokens", headers=bearer(blue),
                        json={"principal": "ann"}).json()  # fmt: skip
        assert ann["project"] == "blue" and ann["role"] == "member"
        me = http.get("/api/v1/whoami", headers=bearer(ann["token"])).json()
        assert (me["name"], me["project"], me["role"]) == ("ann", "blue", "member")
        # a member's token mints tokens of its own project only, and ann is not in default
        elsewhere = http.post("/api/v1/tokens", headers=bearer(ann["token"]),
                              json={"project": "default"})  # fmt: skip
        assert elsewhere.status_code == 403
        for_ann = http.post("/api/v1/tokens", headers=bearer(default),
                            json={"principal": "ann"})  # fmt: skip
        assert for_ann.status_code == 404  # not a member of default
        # blue's admin sees blue's members only, and nothing of default's
        members = http.get("/api/v1/projects/blue/members", headers=bearer(blue)).json()
        assert sorted(m["principal"] for m in members["members"]) == ["ann", "root"]
        assert http.get("/api/v1/projects/default/members", headers=bearer(blue)).status_code == 404
        names = [p["name"] for p in http.get("/api/v1/principals", headers=bearer(blue)).json()[
            "principals"]]  # fmt: skip
        assert sorted(names) == ["ann", "root"]
        # only the default project's admins create projects
        assert http.post("/api/v1/projects", headers=bearer(blue),
                         json={"name": "green"}).status_code == 403  # fmt: skip
        # every event names the token it came with and, for an agent, its sponsor
        http.post("/api/v1/principals", headers=bearer(blue), json={
            "name": "bot", "kind": "agent", "role": "member", "sponsor": "ann"},
        ).raise_for_status()  # fmt: skip
        bot = http.post("/api/v1/tokens", headers=bearer(blue), json={"principal": "bot"}).json()
        run = {"id": "b0" * 16, "app": "fraud", "status": "running", "created_at": 1.0}
        http.post("/api/v1/batches", headers=bearer(bot["token"]),
                  json={"new_runs": [run]}).raise_for_status()  # fmt: skip
        events = http.get("/api/v1/audit/events", headers=bearer(blue)).json()["events"]
        made = next(e for e in events if e["action"] == "run.create")
        assert made["actor"] == "bot"
        payload = json.loads(made["payload"])
        assert (payload["via_token"], payload["sponsor"], payload["project"]) == (
            bot["id"],
            "ann",
            "blue",
        )
        # removed from the project, ann's token stops working at once
        gone = http.delete("/api/v1/projects/blue/members/ann", headers=bearer(blue))
        assert gone.status_code == 204
        assert http.get("/api/v1/whoami", headers=bearer(ann["token"])).status_code == 401
        assert sorted(http.get("/api/v1/projects", headers=bearer(default)).json()[
            "projects"]) == ["blue", "default"]  # fmt: skip


def test_an_embedded_store_keeps_projects_apart_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    with kiln.App("fraud").run() as plain:
        kiln.log({"loss": 1.0})
    with kiln.App("fraud", project="blue").run() as blue:
        kiln.log({"loss": 0.5})
    assert [r.id for r in kiln.App("fraud").runs()] == [plain.id]
    assert [r.id for r in kiln.App("fraud", project="blue").runs()] == [blue.id]
    monkeypatch.setenv("KILN_PROJECT", "blue")
    assert Settings.from_env().project == "blue"
    assert [r.id for r in kiln.App("fraud").runs()] == [blue.id]
    monkeypatch.setenv("KILN_PROJECT", "no way")
    with pytest.raises(kiln.errors.ConfigError, match="KILN_PROJECT"):
        Settings.from_env()


def test_a_blob_hash_tells_a_project_nothing(start_server: Start, tmp_path: Path) -> None:
    server = start_server(auth=True)
    default, blue = two_projects(server)
    data = b"only default has these bytes"
    sha = hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=server.url) as http:
        first = http.put(f"/api/v1/blobs/{sha}", content=data, headers=bearer(default))
        assert first.status_code == 201
        assert http.head(f"/api/v1/blobs/{sha}", headers=bearer(default)).status_code == 200
        assert http.head(f"/api/v1/blobs/{sha}", headers=bearer(blue)).status_code == 404
        assert http.get(f"/api/v1/blobs/{sha}", headers=bearer(blue)).status_code == 404
        # claiming it with other bytes is refused; with its bytes, answered as a new blob
        lie = http.put(f"/api/v1/blobs/{sha}", content=b"guess", headers=bearer(blue))
        assert lie.status_code == 422
        again = http.put(f"/api/v1/blobs/{sha}", content=data, headers=bearer(blue))
        assert again.status_code == 201
        assert http.get(f"/api/v1/blobs/{sha}", headers=bearer(blue)).content == data


def test_moving_an_audit_event_to_another_project_is_caught(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from kiln.record.store.sql import SqlStore

    url = f"sqlite:///{tmp_path / 'kiln.db'}"
    with SqlStore(url, project="blue") as blue:
        blue.write(WriteBatch(new_runs=[RunRow(id="b" * 32, app="a", status=RunStatus.RUNNING,
                                               created_at=1.0)]))  # fmt: skip
        assert [e["project"] for e in blue.audit_events()] == ["blue"]
        assert list(blue.verify()) == []
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # someone edits the database to hide blue's event
        conn.execute(sa.text("UPDATE audit SET project = 'default'"))
    engine.dispose()
    with SqlStore(url) as store:
        assert store.audit_events() != []  # now in default's log, but:
        problems = [p.message for p in store.verify()]
        assert problems and "moved to project 'default'" in problems[0]


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_models_and_endpoints_are_named_per_project(
    kind: str, start_server: Start, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from kiln.record.store.base import EndpointRow, ServerRow
    from kiln.registry.models import models_for

    url = request.getfixturevalue("pg_url") if kind == "postgres" else None
    server = start_server(url, auth=True)
    default, blue = two_projects(server)
    red_store = HttpStore(server.url, cache=tmp_path / "c1", token=default)
    blue_store = HttpStore(server.url, cache=tmp_path / "c2", token=blue)
    with red_store, blue_store:
        theirs, _ = record_a_run(red_store, b"red's model", 1)
        mine, _ = record_a_run(blue_store, b"blue's model", 2)
        red = models_for(red_store, app="fraud", actor="root")
        ours = models_for(blue_store, app="fraud", actor="root")
        assert red.register("fraud", theirs, artifact="m.pkl").version == 1
        assert ours.register("fraud", mine, artifact="m.pkl").version == 1  # its own "fraud"
        with pytest.raises(RunNotFoundError):
            ours.register("stolen", theirs, artifact="m.pkl")
        assert ours.get("fraud:1").run_id == mine and red.get("fraud:1").run_id == theirs
        red.set_policy(
            "fraud",
            "production",
            {"allow_dirty": True, "approvals": {"count": 1, "approvers": ["ann"]}},
        )
        request = red.promote("fraud", 1, alias="production")
        assert ours.requests() == [] and ours.policy("fraud", "production") is None
        with pytest.raises(NotFoundError):
            ours.approve(request.id)
        assert red.requests()[0].status == "pending"  # untouched
        now = 1.0
        red_store.announce_server(
            EndpointRow(name="scorer", app="fraud", model="fraud@production", spec={},
                        traffic=None, updated_at=now),
            ServerRow(id="s" * 32, endpoint="scorer", url="http://127.0.0.1:1", host="h",
                      pid=1, status="serving", stats={}, started_at=now, updated_at=now),
        )  # fmt: skip
        assert [e.name for e in red_store.endpoints()] == ["scorer"]
        assert blue_store.endpoints() == [] and blue_store.endpoint("scorer") is None
        assert blue_store.servers(["scorer"]) == []
        assert list(red_store.verify()) == []
    with httpx.Client(base_url=server.url) as http:
        split = http.put("/api/v1/endpoints/scorer/traffic", headers=bearer(blue),
                         json={"traffic": {"fraud:1": 100}})  # fmt: skip
        assert split.status_code == 404
        assert http.get("/api/v1/models", headers=bearer(blue)).json()["items"] == ["fraud"]


def _routes() -> list[tuple[str, str]]:
    """(method, path) of every route of the app."""
    import tempfile

    from fastapi.routing import APIRoute

    from kiln.record.blobs import FileBlobStore
    from kiln.record.store.sql import SqlStore
    from kiln.server.app import build_app

    def every(routes: list[object]) -> list[object]:
        out: list[object] = []
        for route in routes:
            inner = getattr(route, "original_router", None)
            out += every(inner.routes) if inner is not None else [route]
        return out

    with tempfile.TemporaryDirectory() as tmp:
        blobs = FileBlobStore(Path(tmp) / "blobs")
        with SqlStore(f"sqlite:///{tmp}/kiln.db", blobs) as store:
            app = build_app(store, blobs, Path(tmp))
    return sorted((method, route.path) for route in every(app.routes)
                  if isinstance(route, APIRoute) for method in route.methods)  # fmt: skip


def _ask(
    http: httpx.Client, method: str, path: str, ids: dict[str, str], token: str
) -> tuple[int, str]:
    """Call ``path`` naming ``ids`` (a plausible body where one is needed)."""
    url = path
    if path.endswith(("/endpoints/{name}", "/endpoints/{name}/traffic")):
        url = url.replace("{name}", ids["endpoint"])
    values = {"ref": ids["run_id"], "alias": "production", "version": "1", "seq": "1",
              "key": "loss", "principal": "root", **ids}  # fmt: skip
    for key, value in values.items():
        url = url.replace("{" + key + "}", value)
    run = ids["run_id"]
    bodies: dict[str, object] = {
        "/api/v1/batches": {"updates": [{"id": run, "status": "failed"}],
                            "metrics": [[run, "loss", 9, 1.0, 9.0]], "seal": [run]},
        "/api/v1/endpoints/{name}/traffic": {"traffic": {"fraud:1": 100}},
        "/api/v1/models/{name}/versions": {"run_id": run, "artifact": "m.pkl"},
        "/api/v1/models/{name}/promote": {"version": 1, "alias": "production"},
        "/api/v1/models/{name}/rollback": {"alias": "production"},
        "/api/v1/models/{name}/policies/{alias}": {"policy": {}},
        "/api/v1/servers/{server_id}": {"status": "stopped"},
    }  # fmt: skip
    kwargs: dict[str, object] = {}
    if method == "PUT" and path.endswith("{sha256}"):
        kwargs = {"content": b"not red's model"}
    elif method in ("POST", "PUT", "PATCH") and path in bodies:
        kwargs = {"json": bodies[path]}
    found = http.request(method, url, headers=bearer(token), **kwargs)  # type: ignore[arg-type]
    return found.status_code, found.text


# What these answer changes between two calls anyway (the calls' own events, counters).
_GROWING = ("/api/v1/audit/events", "/metrics")


def _masked(text: str, ids: dict[str, str]) -> str:
    for key, value in sorted(ids.items(), key=lambda kv: -len(kv[1])):
        text = text.replace(value, f"<{key}>")
    return text


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_every_route_with_every_role_gets_nothing_of_another_project(
    kind: str, start_server: Start, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Default's run, artifact blob, model, promotion request, endpoint, trace and token
    named in every route, by blue's viewer, member, approver and admin: no answer holds
    any of them, and default's records are as they were."""
    from kiln.record.store.base import EndpointRow, ServerRow
    from kiln.registry.models import models_for

    url = request.getfixturevalue("pg_url") if kind == "postgres" else None
    server = start_server(url, auth=True)
    default, blue = two_projects(server)
    red_store = HttpStore(server.url, cache=tmp_path / "c1", token=default)
    with red_store:
        run_id, sha = record_a_run(red_store, b"red's model", 1)
        red = models_for(red_store, app="fraud", actor="root")
        red.register("fraud", run_id, artifact="m.pkl")
        red.set_policy(
            "fraud",
            "production",
            {"allow_dirty": True, "approvals": {"count": 1, "approvers": ["ann"]}},
        )
        request_id = red.promote("fraud", 1, alias="production").id  # type: ignore[union-attr]
        red_store.announce_server(
            EndpointRow(name="scorer", app="fraud", model="fraud@production", spec={},
                        traffic=None, updated_at=1.0),
            ServerRow(id="5" * 32, endpoint="scorer", url="http://127.0.0.1:1", host="h",
                      pid=1, status="serving", stats={}, started_at=1.0, updated_at=1.0),
        )  # fmt: skip
        red_store.write_spans([span("cd" * 16, "1" * 16, run_id=run_id)])
        before = (red_store.export_rows(run_id), red.versions("fraud"), red.requests(),
                  red_store.endpoints(), red_store.list_spans())  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=30) as http:
        token_id = http.get("/api/v1/tokens", headers=bearer(default)).json()["tokens"][0]["id"]
        tokens = {"admin": blue}
        for role in ("viewer", "member", "approver"):
            http.post("/api/v1/principals", headers=bearer(blue),
                      json={"name": f"b-{role}", "role": role}).raise_for_status()  # fmt: skip
            minted = http.post("/api/v1/tokens", headers=bearer(blue),
                               json={"principal": f"b-{role}"})  # fmt: skip
            tokens[role] = minted.json()["token"]
        real = {"run_id": run_id, "sha256": sha, "name": "fraud", "endpoint": "scorer",
                "request_id": request_id, "trace_id": "cd" * 16, "token_id": token_id,
                "server_id": "5" * 32}  # fmt: skip
        fake = {"run_id": "e" * 32, "sha256": "e" * 64, "name": "nosuch", "endpoint": "nothere",
                "request_id": "e" * len(request_id), "trace_id": "ef" * 16,
                "token_id": "e" * 12, "server_id": "e" * 32}  # fmt: skip
        differ, leaks = [], []
        for method, path in _routes():
            if path in ("/api/v1/enrol", "/api/v1/projects"):
                continue  # the enrolment exchange, and creating projects (no other's ids)
            for role, token in tokens.items():
                answers = [_ask(http, method, path, ids, token) for ids in (real, fake)]
                assert answers[0][0] < 500, (role, method, path, answers[0])
                texts = [
                    _masked(text, ids) for (_, text), ids in zip(answers, (real, fake), strict=True)
                ]
                if answers[0][0] != answers[1][0] or (
                    texts[0] != texts[1] and path not in _GROWING
                ):  # fmt: skip
                    differ.append((role, method, path, answers[0][0], answers[1][0]))
                if any(v in texts[0] for v in real.values()):
                    leaks.append((role, method, path))
        # to blue, default's ids are ids that do not exist, and no answer names them
        print("DIFFER", differ, "LEAKS", leaks)
        assert differ == [] and leaks == []
    with HttpStore(server.url, cache=tmp_path / "c3", token=default) as again:
        red = models_for(again, app="fraud", actor="root")
        after = (again.export_rows(run_id), red.versions("fraud"), red.requests(),
                 again.endpoints(), again.list_spans())  # fmt: skip
    assert after == before


@pytest.mark.parametrize("role", ["viewer", "admin"])
def test_schemathesis_with_a_project_token_finds_no_fault(
    role: str, start_server: Start, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    server = start_server(auth=True)
    default, blue = two_projects(server)
    with HttpStore(server.url, cache=tmp_path / "c", token=default) as red_store:
        record_a_run(red_store, b"red", 1)
    with httpx.Client(base_url=server.url) as http:
        token = blue
        if role != "admin":
            http.post("/api/v1/principals", headers=bearer(blue),
                      json={"name": "v", "role": role}).raise_for_status()  # fmt: skip
            token = http.post("/api/v1/tokens", headers=bearer(blue),
                              json={"principal": "v"}).json()["token"]  # fmt: skip
    report = tmp_path / "report.json"
    found = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
         "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         "--max-examples", "8", "--seed", "1", "--workers", "1",
         "-H", f"Authorization: Bearer {token}",
         "--generation-deterministic", "--no-color", "--request-timeout", "30",
         "--report", "json", "--report-json-path", str(report)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"},
    )  # fmt: skip
    assert found.returncode == 0, found.stdout[-6000:] + found.stderr[-2000:]
    checked = json.loads(report.read_text())
    assert checked["failures"] == [] and checked["errors"] == []
    assert checked["operations"]["tested"] >= 50
    assert "Traceback" not in server.log.read_text()
    with HttpStore(server.url, cache=tmp_path / "c2", token=default) as red:
        assert red.get_run("1" * 32).status is RunStatus.SUCCEEDED  # default's, untouched


def test_idempotency_keys_are_per_project(start_server: Start) -> None:
    server = start_server(auth=True)
    default, blue = two_projects(server)
    with httpx.Client(base_url=server.url) as http:
        for token, n in ((default, "a"), (blue, "b")):  # the same key, two projects' batches
            run = {"id": n * 32, "app": "a", "status": "running", "created_at": 1.0}
            headers = {**bearer(token), "Idempotency-Key": "same-key-1"}
            sent = http.post("/api/v1/batches", json={"new_runs": [run]}, headers=headers)
            assert sent.status_code == 200, sent.text
        assert http.get(f"/api/v1/runs/{'b' * 32}", headers=bearer(blue)).status_code == 200
