"""The operation table the MCP tools are made from: every operation classified, every
mutating one previewable, each holding the permission its HTTP route declares, and
approvals bound to exactly the arguments given."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute

from kiln.errors import ValidationError
from kiln.govern import rbac
from kiln.server.auth import Caller
from kiln.server.mcp import tool
from kiln.server.operations import EFFECTS, OPERATIONS, Mutating, args_hash, parse, visible


def test_every_operation_is_classified_and_every_mutating_one_has_a_dry_run() -> None:
    assert len(OPERATIONS) >= 14
    for op in OPERATIONS.values():
        assert op.effect in EFFECTS, op.name
        assert isinstance(op.idempotent, bool), op.name
        assert op.permission in rbac.PERMISSIONS, op.name
        mutating = op.effect != "read"
        assert issubclass(op.args, Mutating) == mutating, op.name
        assert (op.preview is not None) == mutating, op.name
        if op.effect == "destructive":
            assert op.approval, f"{op.name}: an agent's destructive call needs an approval"
    assert OPERATIONS["model_promote"].approval  # promotions too


def test_annotations_come_from_the_classification() -> None:
    for op in OPERATIONS.values():
        hints = tool(op).annotations
        assert hints is not None
        assert hints.read_only_hint == (op.effect == "read")
        assert hints.destructive_hint == (op.effect == "destructive")
        assert hints.idempotent_hint == op.idempotent


def test_each_operation_needs_what_its_http_route_needs(tmp_path: Path) -> None:
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

    declared = {}
    for route in every(app.routes):
        if isinstance(route, APIRoute):
            needs = [getattr(d.call, "permission", None) for d in route.dependant.dependencies]
            for method in route.methods:
                declared[(method, route.path)] = next(n for n in needs if n is not None)
    routed = [op for op in OPERATIONS.values() if op.route is not None]
    assert len(routed) >= 10
    for op in routed:
        assert op.route in declared, op.name
        assert declared[op.route] == op.permission, op.name


def test_who_sees_which_tools() -> None:
    viewer = Caller("v", "viewer", "default")
    assert {op.effect for op in visible(viewer)} == {"read"}
    member = Caller("m", "member", "default")
    names = {op.name for op in visible(member)}
    assert {"model_register", "model_promote", "traffic_set"} <= names
    assert not {"model_rollback", "run_delete"} & names  # an admin's
    scoped = Caller("s", "admin", "default", kind="agent", scopes=("runs:read",))
    assert {op.permission for op in visible(scoped)} <= {("runs", "read"), ("account", "self")}


def test_an_approval_is_bound_to_exactly_the_arguments() -> None:
    op = OPERATIONS["model_promote"]
    base = parse(op, {"name": "fraud", "version": 1})
    same = parse(op, {"version": 1, "name": "fraud", "alias": "production", "dry_run": True})
    assert args_hash(op.name, base) == args_hash(op.name, same)  # defaults, order, dry run
    for changed in (
        {"version": 2},
        {"alias": "staging"},
        {"reason": "x"},
        {"policy": {"min": {"accuracy": 0.9}}},
        {"name": "fraud2"},
    ):
        other = parse(op, {"name": "fraud", "version": 1, **changed})
        assert args_hash(op.name, other) != args_hash(op.name, base), changed
    rollback = OPERATIONS["model_rollback"]
    assert args_hash(rollback.name, parse(rollback, {"name": "fraud"})) != args_hash(
        op.name, parse(op, {"name": "fraud", "version": 1})
    )


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ValidationError) as found:
        parse(OPERATIONS["model_promote"], {"name": "fraud", "version": 0})
    assert found.value.field == "version"
    with pytest.raises(ValidationError) as found:
        parse(OPERATIONS["runs_search"], {"limit": 5, "sneaky": True})
    assert found.value.field == "sneaky"
