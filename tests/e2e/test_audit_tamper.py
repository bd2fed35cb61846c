"""Every change made around Kiln to a sealed run or to the registry is caught by
``kiln audit verify``: any recorded column of any row, a row removed or added, and,
against an anchor, the newest events removed."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import kiln
from kiln.cli import app as cli
from kiln.record import recorder
from kiln.record.anchors import check_anchors, write_anchor
from kiln.record.audit import SEALED_RUN_FIELDS
from kiln.record.store.sql import SqlStore
from kiln.registry.traffic import set_traffic
from kiln.serve import state

# The columns verify answers for, by table (tags, heartbeats and timestamps of
# liveness are not recorded facts; an endpoint's spec is its server's to report).
CHECKED = {
    "runs": [c for c in SEALED_RUN_FIELDS if c != "id"],
    "metrics": ["key", "step", "time", "value"],
    "summary": ["key", "value"],
    "artifacts": ["name", "direction", "sha256", "size"],
    "run_logs": ["time", "stream", "text"],
    "model_versions": ["run_id", "artifact", "artifact_sha256", "metrics"],
    "aliases": ["version"],
    "alias_moves": ["from_version", "to_version", "reason", "actor"],
    "policies": ["policy"],
    "promotion_requests": ["version", "requested_by", "approvals", "status", "policy"],
    "endpoints": ["traffic"],
    "audit": ["time", "actor", "action", "target", "payload"],
}
KEYS = {"runs": "id", "model_versions": "rowid", "aliases": "rowid", "alias_moves": "id",
        "policies": "rowid", "promotion_requests": "id", "endpoints": "name",
        "metrics": "rowid", "summary": "rowid", "artifacts": "rowid", "audit": "seq",
        "run_logs": "id"}  # fmt: skip


class Scorer:
    def predict(self, x: float) -> float:
        return x


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A store holding sealed runs and a registry with every kind of row."""
    root = tmp_path_factory.mktemp("tamper")
    os.environ["KILN_HOME"] = str(root / "home")
    try:
        app = kiln.App("tamper")
        runs = []
        for accuracy in (0.8, 0.9, 0.95):
            with app.run(params={"lr": accuracy / 10}) as run:
                print(f"training at {accuracy}")  # its logs are sealed too
                kiln.log({"accuracy": accuracy}, step=0)
                kiln.save("model.pkl", {"acc": accuracy})
            runs.append(run.id)
        for run_id in runs:
            app.models.register("m", run_id, artifact="model.pkl")
        app.models.promote("m", 1)
        app.models.promote("m", 2, reason="better")
        app.models.rollback("m", "production")
        policy = {"metrics": {"accuracy": ">= 0.85"}, "allow_dirty": True,
                  "approvals": {"count": 1, "approvers": ["ann"]}}  # fmt: skip
        app.models.set_policy("m", "production", policy)
        app.models.promote("m", 3)  # a pending request
        os.environ["KILN_ACTOR"] = "ann"
        kiln.App("tamper").models.approve(kiln.App("tamper").models.requests()[0].id)
        os.environ["KILN_ACTOR"] = "tester"
        endpoint = app.endpoint(model="m@production", name="scorer")(Scorer)
        store = recorder.recorder_for(kiln.config.Settings.from_env()).store
        state.announce(store, endpoint.spec, "http://127.0.0.1:1")
        set_traffic(store, "scorer", {"m:3": 100}, actor="tester")
        recorder.close_all()
    finally:
        recorder.close_all()
        del os.environ["KILN_HOME"]
    yield root / "home" / "kiln.db"


def problems(db: Path, anchors: Path | None = None) -> list[str]:
    with SqlStore(f"sqlite:///{db}", create=False) as store:
        found = [p.message for p in store.verify()]
        if anchors is not None:
            found += [p.message for p in check_anchors(anchors, store.event_hash)]
    return found


def changed(value: Any) -> Any:
    """A value other than ``value``, of a kind its column takes."""
    if value is None:
        return 7
    if isinstance(value, int | float):
        return value + 1
    try:
        data = json.loads(value)
    except (TypeError, ValueError):
        return value + "x"
    if isinstance(data, dict | list):
        return json.dumps({"tampered": data})
    return json.dumps(data + 1) if isinstance(data, int | float) else value + "x"


def tampers(db: Path) -> list[tuple[str, ...]]:
    """Every single-row change of a checked column, every removal of a row, and an
    added alias move: each as (sql, *args) with a description."""
    out: list[tuple[str, ...]] = []
    with sqlite3.connect(db) as conn:
        for table, columns in CHECKED.items():
            key = KEYS[table]
            rows = conn.execute(f"SELECT {key}, {', '.join(columns)} FROM {table}").fetchall()
            newest = max(r[0] for r in rows) if table == "audit" else None
            for row in rows:
                if row[0] != newest:  # removing the newest events needs an anchor: see below
                    out.append((f"DELETE FROM {table} WHERE {key} = ?", row[0]))
                for column, value in zip(columns, row[1:], strict=True):
                    if table == "promotion_requests" and column == "status":
                        new: Any = "pending" if value == "rejected" else "rejected"
                    else:
                        new = changed(value)
                    out.append((f"UPDATE {table} SET {column} = ? WHERE {key} = ?", new, row[0]))
    out.append(("INSERT INTO alias_moves (name, alias, from_version, to_version, reason, actor, at)"
                " VALUES ('m', 'production', 2, 3, 'quiet', 'mallory', 0)",))  # fmt: skip
    out.append(("INSERT INTO run_logs (run_id, time, stream, text) SELECT run_id, 0, 'stdout',"
                " 'a line it never printed' FROM run_logs LIMIT 1",))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def all_tampers(template: Path) -> list[tuple[str, ...]]:
    return tampers(template)


def test_the_untouched_store_verifies(template: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copy(template, tmp_path / "kiln.db"))
    assert problems(copy) == []


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(data=st.data())
def test_every_tamper_of_a_sealed_run_or_the_registry_is_caught(
    template: Path, all_tampers: list[tuple[Any, ...]], data: st.DataObject,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    sql, *args = data.draw(st.sampled_from(all_tampers))
    copy = Path(shutil.copy(template, tmp_path_factory.mktemp("t") / "kiln.db"))
    with sqlite3.connect(copy) as conn:
        assert conn.execute(sql, args).rowcount == 1, sql
    assert problems(copy), f"not caught: {sql} {args}"


@pytest.mark.parametrize("cut", [1, 2, 5])
def test_removing_the_newest_events_is_caught_against_an_anchor(
    template: Path, tmp_path: Path, cut: int
) -> None:
    copy = Path(shutil.copy(template, tmp_path / "kiln.db"))
    with SqlStore(f"sqlite:///{copy}", create=False) as store:
        write_anchor(tmp_path / "anchors.jsonl", *store.chain_head())
    with sqlite3.connect(copy) as conn:
        conn.execute("DELETE FROM audit WHERE seq > (SELECT max(seq) FROM audit) - ?", (cut,))
    assert any("the log was cut" in p for p in problems(copy, tmp_path / "anchors.jsonl"))


def test_kiln_audit_anchor_then_verify_on_the_command_line(tmp_path: Path) -> None:
    with kiln.App("anchored").run():
        kiln.log({"x": 1.0}, step=0)
    recorder.close_all()
    written = CliRunner().invoke(cli, ["audit", "anchor", "--json"])
    assert written.exit_code == 0, written.output
    anchor = json.loads(written.output)
    assert anchor["file"] == os.environ["KILN_ANCHORS"] and anchor["seq"] > 0
    assert CliRunner().invoke(cli, ["audit", "verify"]).exit_code == 0
    db = kiln.config.Settings.from_env().home / "kiln.db"
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit WHERE seq = ?", (anchor["seq"],))
    result = CliRunner().invoke(cli, ["audit", "verify"])
    assert result.exit_code == 1 and f"event {anchor['seq']}, anchored in" in result.output
