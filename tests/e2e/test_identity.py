"""Principals, tokens and roles on a real ``kiln server`` with authentication on: the
first admin's enrolment, token lifecycle, default deny on every route, the RBAC matrix
through real requests, escalation, self-approval, rate limiting and the actor."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from fastapi.routing import APIRoute

from conftest import ServerProcess
from kiln.govern import rbac

Start = Callable[..., ServerProcess]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def enrol(server: ServerProcess, name: str = "root") -> str:
    assert server.enrolment is not None
    found = httpx.post(
        f"{server.url}/api/v1/enrol", json={"name": name}, headers=bearer(server.enrolment)
    )
    assert found.status_code == 201, found.text
    return str(found.json()["token"])


def user(http: httpx.Client, admin: str, name: str, role: str, **extra: object) -> str:
    """Add principal ``name`` with ``role`` and mint it a token."""
    added = http.post(
        "/api/v1/principals", headers=bearer(admin), json={"name": name, "role": role, **extra}
    )
    assert added.status_code == 201, added.text
    minted = http.post(
        "/api/v1/tokens", headers=bearer(admin), json={"principal": name, "name": "test"}
    )
    assert minted.status_code == 201, minted.text
    return str(minted.json()["token"])


def test_every_route_declares_the_permission_it_needs(tmp_path: Path) -> None:
    from kiln.record.blobs import FileBlobStore
    from kiln.record.store.sql import SqlStore
    from kiln.server.app import build_app

    blobs = FileBlobStore(tmp_path / "blobs")
    with SqlStore(f"sqlite:///{tmp_path / 'kiln.db'}", blobs) as store:
        app = build_app(store, blobs, tmp_path)

    def every(routes: list[Any]) -> Iterator[Any]:  # included routers hold their own routes
        for route in routes:
            if hasattr(route, "original_router"):
                yield from every(route.original_router.routes)
            else:
                yield route

    undeclared, seen, count = [], set(), 0
    for route in every(app.routes):
        if not isinstance(route, APIRoute):  # FastAPI's own document; the MCP server's
            mcp = ("/mcp", "/.well-known/oauth-protected-resource/mcp")  # tokens: its own test
            assert route.path in ("/openapi.json", *mcp), route
            continue
        count += 1
        declared = [getattr(d.call, "permission", None) for d in route.dependant.dependencies]
        declared = [d for d in declared if d is not None]
        if len(declared) != 1:
            undeclared.append(f"{sorted(route.methods)} {route.path}")
        seen.update(declared)
    assert undeclared == [] and count > 45
    assert seen - {("public", "")} <= rbac.PERMISSIONS


def test_tokens_are_enrolled_used_revoked_and_expire(start_server: Start) -> None:
    server = start_server(auth=True)
    with httpx.Client(base_url=server.url) as http:
        nobody = http.get("/api/v1/endpoints")
        assert nobody.status_code == 401 and nobody.headers["www-authenticate"].startswith("Bearer")
        assert nobody.headers["content-type"] == "application/problem+json"
        assert (
            http.get("/api/v1/endpoints", headers=bearer(server.enrolment or "")).status_code == 401
        )
        root = enrol(server)
        again = http.post(
            "/api/v1/enrol", json={"name": "eve"}, headers=bearer(server.enrolment or "")
        )
        assert again.status_code == 401  # once only
        me = http.get("/api/v1/whoami", headers=bearer(root)).json()
        assert (me["name"], me["role"], me["kind"]) == ("root", "admin", "user")
        short = http.post(
            "/api/v1/tokens", headers=bearer(root), json={"name": "brief", "expires_in_s": 1}
        ).json()
        assert short["token"].startswith(f"kiln_{short['id']}_")
        assert http.get("/api/v1/whoami", headers=bearer(short["token"])).status_code == 200
        time.sleep(1.2)
        expired = http.get("/api/v1/whoami", headers=bearer(short["token"]))
        assert expired.status_code == 401 and "expired" in expired.json()["detail"]
        ann = user(http, root, "ann", "member")
        assert http.get("/api/v1/whoami", headers=bearer(ann)).json()["name"] == "ann"
        (listed,) = http.get("/api/v1/tokens", headers=bearer(ann)).json()["tokens"]
        assert "digest" not in listed and "token" not in listed
        assert http.delete(f"/api/v1/tokens/{listed['id']}", headers=bearer(ann)).status_code == 204
        revoked = http.get("/api/v1/whoami", headers=bearer(ann))
        assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]
        bob = user(http, root, "bob", "member")
        assert http.post("/api/v1/principals/bob/disable", headers=bearer(root)).status_code == 204
        assert http.get("/api/v1/whoami", headers=bearer(bob)).status_code == 401
        forged = "kiln_" + listed["id"] + "_" + "A" * 43  # a real id, a wrong secret
        assert http.get("/api/v1/whoami", headers=bearer(forged)).status_code == 401
        events = http.get(
            "/api/v1/audit/events",
            headers=bearer(root),
            params={"action": "auth.denied", "limit": 100},
        ).json()["events"]
        assert len(events) >= 6
        assert {
            e["action"]
            for e in http.get(
                "/api/v1/audit/events", headers=bearer(root), params={"limit": 100}
            ).json()["events"]
        } >= {"principal.add", "token.create", "token.revoke", "principal.disable"}


def test_no_one_grants_more_than_they_hold(start_server: Start) -> None:
    server = start_server(auth=True)
    with httpx.Client(base_url=server.url) as http:
        root = enrol(server)
        ann = user(http, root, "ann", "member")
        viewer = user(http, root, "vic", "viewer")
        for body in ({"role": "admin"}, {"role": "approver"}, {"principal": "vic"}):
            assert http.post("/api/v1/tokens", headers=bearer(ann), json=body).status_code == 403
        assert (
            http.post(
                "/api/v1/principals", headers=bearer(ann), json={"name": "mal", "role": "viewer"}
            ).status_code
            == 403
        )
        assert (
            http.post(
                "/api/v1/tokens", headers=bearer(root), json={"principal": "vic", "role": "member"}
            ).status_code
            == 403
        )
        narrower = http.post("/api/v1/tokens", headers=bearer(ann), json={"role": "viewer"})
        assert narrower.status_code == 201
        as_viewer = bearer(narrower.json()["token"])
        assert http.post("/api/v1/runs:search", headers=as_viewer, json={}).status_code == 200
        assert http.post("/api/v1/batches", headers=as_viewer, json={}).status_code == 403
        agent = http.post(
            "/api/v1/principals",
            headers=bearer(root),
            json={"name": "bot", "kind": "agent", "role": "member"},
        )
        assert agent.status_code == 422  # an agent needs a sponsor
        sponsored = http.post(
            "/api/v1/principals",
            headers=bearer(root),
            json={
                "name": "bot",
                "kind": "agent",
                "role": "member",
                "sponsor": "ann",
                "scopes": ["runs:read"],
                "budget": 10.0,
                "expires_in_s": 3600,
            },
        )
        assert sponsored.status_code == 201
        vague = http.post("/api/v1/principals", headers=bearer(root), json={
            "name": "bot2", "kind": "agent", "sponsor": "ann", "scopes": ["runs"]})  # fmt: skip
        assert vague.status_code == 422 and "runs:read" in vague.json()["detail"]
        assert (
            http.get("/api/v1/tokens", headers=bearer(viewer), params={"all": True}).status_code
            == 403
        )


# One request per permission: allowed, it may still be a 404 or 422, never a 403.
PROBES: dict[tuple[str, str], tuple[str, str, object]] = {
    ("runs", "read"): ("POST", "/api/v1/runs:search", {}),
    ("runs", "write"): ("POST", "/api/v1/batches", {}),
    ("runs", "delete"): ("DELETE", "/api/v1/runs/" + "ab" * 16, None),
    ("blobs", "read"): ("GET", "/api/v1/blobs/" + "e" * 64, None),
    ("blobs", "write"): ("PUT", "/api/v1/blobs/" + "e" * 64, None),
    ("models", "read"): ("GET", "/api/v1/models", None),
    ("models", "write"): ("POST", "/api/v1/models/m/versions", {}),
    ("models", "rollback"): ("POST", "/api/v1/models/m/rollback", {"alias": "production"}),
    ("promotions", "request"): ("POST", "/api/v1/models/m/promote", {"version": 1}),
    ("promotions", "approve"): ("POST", "/api/v1/promotion-requests/nope/approve", None),
    ("approvals", "decide"): ("POST", "/api/v1/approvals/" + "0" * 12 + "/approve", {}),
    ("policies", "write"): ("PUT", "/api/v1/models/m/policies/production", {}),
    ("endpoints", "read"): ("GET", "/api/v1/endpoints", None),
    ("endpoints", "write"): ("PUT", "/api/v1/endpoints/e/traffic", {"traffic": None}),
    ("traces", "read"): ("GET", "/api/v1/spans", None),
    ("traces", "write"): ("POST", "/api/v1/spans", {"spans": []}),
    ("audit", "read"): ("GET", "/api/v1/audit/head", None),
    ("store", "gc"): ("POST", "/api/v1/gc", {"dry_run": True}),
    ("quotas", "admin"): ("PUT", "/api/v1/budgets", {"amount": 1.0}),
    ("pools", "admin"): ("PUT", "/api/v1/pools/probe", {"cpu": 1.0}),
    ("principals", "admin"): ("GET", "/api/v1/principals", None),
    ("tokens", "admin"): ("GET", "/api/v1/tokens?all=true", None),
    ("account", "self"): ("GET", "/api/v1/whoami", None),
    ("projects", "create"): ("POST", "/api/v1/projects", {"name": "probe"}),
}


def test_each_role_may_do_exactly_what_the_table_grants(start_server: Start) -> None:
    assert set(PROBES) == rbac.PERMISSIONS  # a new permission needs a probe here
    server = start_server(auth=True)
    with httpx.Client(base_url=server.url) as http:
        root = enrol(server)
        holders = {role: user(http, root, f"u-{role}", role) for role in rbac.ROLES}
        wrong = []
        for role, token in holders.items():
            for permission, (method, path, body) in PROBES.items():
                found = http.request(
                    method,
                    path,
                    headers=bearer(token),
                    **({"json": body} if body is not None else {}),
                )
                assert found.status_code < 500, (role, path, found.text)
                if (found.status_code == 403) == rbac.allows(role, *permission):
                    wrong.append((role, permission, found.status_code))
        assert wrong == []


def test_the_actor_is_the_token_and_a_requester_cannot_approve_itself(
    start_server: Start, tmp_path: Path
) -> None:
    server = start_server(auth=True)
    with httpx.Client(base_url=server.url) as http:
        root = enrol(server)
        ann = user(http, root, "ann", "approver")
        bob = user(http, root, "bob", "approver")
    script = (
        "import kiln\n"
        "app = kiln.App('gated')\n"
        "with app.run() as run:\n"
        "    kiln.save('m.pkl', {'w': 1})\n"
        "app.models.register('gated', run.id, artifact='m.pkl')\n"
        "print(run.id)\n"
    )
    env = {
        "KILN_SERVER": server.url,
        "KILN_HOME": str(tmp_path / "c"),
        "KILN_ACTOR": "mallory",
        "PATH": "/usr/bin:/bin",
    }
    made = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "KILN_TOKEN": ann},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    run_id = made.stdout.split()[-1]
    with httpx.Client(base_url=server.url) as http:
        found = http.get(
            "/api/v1/audit/events",
            headers=bearer(root),
            params={"target": run_id, "action": "run.create"},
        ).json()["events"]
        assert [e["actor"] for e in found] == ["ann"]  # not the declared "mallory"
        # no list of approvers: anyone with the approver role, never the requester
        rule = {"allow_dirty": True, "approvals": {"count": 1}}
        assert (
            http.put(
                "/api/v1/models/gated/policies/production",
                headers=bearer(root),
                json={"policy": rule},
            ).status_code
            == 204
        )
        asked = http.post(
            "/api/v1/models/gated/promote", headers=bearer(ann), json={"version": 1}
        ).json()
        assert asked["kind"] == "request"
        request_id = asked["value"]["id"]
        own = http.post(f"/api/v1/promotion-requests/{request_id}/approve", headers=bearer(ann))
        assert own.status_code == 422 and "its own request" in own.json()["detail"]
        viewer = user(http, root, "vic", "viewer")
        seen = http.post(f"/api/v1/promotion-requests/{request_id}/approve",
                         headers=bearer(viewer))  # fmt: skip
        assert seen.status_code == 403
        done = http.post(f"/api/v1/promotion-requests/{request_id}/approve", headers=bearer(bob))
        assert done.status_code == 200, done.text
        aliases = http.get("/api/v1/models/gated/aliases", headers=bearer(root)).json()
        assert aliases == {"production": 1}


def test_failed_authentication_is_rate_limited(start_server: Start) -> None:
    server = start_server(auth=True)
    with httpx.Client(base_url=server.url) as http:
        root = enrol(server)
        bad = bearer("kiln_000000000000_" + "x" * 43)
        codes = [http.get("/api/v1/whoami", headers=bad).status_code for _ in range(25)]
        assert codes[:20] == [401] * 20 and set(codes[20:]) == {429}
        assert "retry-after" in http.get("/api/v1/whoami", headers=bad).headers
        assert http.get("/api/v1/whoami", headers=bearer(root)).status_code == 200  # no lockout
        denied = http.get(
            "/api/v1/audit/events",
            headers=bearer(root),
            params={"action": "auth.denied", "limit": 1000},
        ).json()["events"]
        assert len(denied) == 20  # the flood past the limit is not written down


def test_kiln_login_stores_the_token_for_the_cli(start_server: Start, tmp_path: Path) -> None:
    server = start_server(auth=True)
    env = {
        "KILN_SERVER": server.url,
        "KILN_HOME": str(tmp_path / "c"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "PATH": "/usr/bin:/bin",
    }

    def kiln(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kiln", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    logged = kiln("login", server.url, "--enrol", server.enrolment or "", "--name", "root")
    assert logged.returncode == 0, logged.stderr
    stored = tmp_path / "config" / "kiln" / "credentials.json"
    assert stored.stat().st_mode & 0o777 == 0o600
    added = kiln("users", "add", "ci", "--kind", "service", "--role", "member", "--json")
    assert added.returncode == 0, added.stderr
    minted = kiln("tokens", "create", "--principal", "ci", "--expires", "7d", "--json")
    assert minted.returncode == 0, minted.stderr
    token = json.loads(minted.stdout)
    listed = json.loads(kiln("tokens", "ls", "--all", "--json").stdout)
    assert token["id"] in {t["id"] for t in listed} and token["token"] not in json.dumps(listed)
    users = json.loads(kiln("users", "ls", "--json").stdout)
    assert {(u["name"], u["kind"], u["role"]) for u in users} == {
        ("root", "user", "admin"),
        ("ci", "service", "member"),
    }
    made = json.loads(kiln("projects", "create", "blue", "--json").stdout)
    assert made["name"] == "blue" and made["token"]["project"] == "blue"
    assert json.loads(kiln("projects", "ls", "--json").stdout) == ["blue", "default"]
    env["KILN_TOKEN"] = made["token"]["token"]
    joined = kiln("projects", "add-member", "blue", "ci", "--role", "viewer")
    assert joined.returncode == 0, joined.stderr
    members = json.loads(kiln("projects", "members", "blue", "--json").stdout)
    assert {(m["principal"], m["role"]) for m in members} == {("root", "admin"), ("ci", "viewer")}
    del env["KILN_TOKEN"]
    assert kiln("tokens", "revoke", token["id"]).returncode == 0
    env["KILN_TOKEN"] = token["token"]
    denied = kiln("runs", "ls")
    assert denied.returncode != 0 and "revoked" in denied.stderr
