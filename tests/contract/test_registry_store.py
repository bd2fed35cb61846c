"""The RegistryStore interface itself (``Models`` over its rows) on the stores that own
their rows: SQLite, PostgreSQL and the in-memory fake of kiln.testing. Through a server
the same operations are asked of it (tests/contract/test_registry.py runs the SDK's
registry on every store, servers included)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import STORES
from kiln.errors import NotFoundError, ValidationError
from kiln.record.blobs import FileBlobStore
from kiln.record.model import RunStatus
from kiln.record.store.base import WriteBatch
from kiln.record.store.rows import ArtifactRow, RunRow
from kiln.record.store.sql import SqlStore
from kiln.registry.models import AliasMove, PromotionRequest, models_for
from kiln.registry.policy import PolicyError
from kiln.testing import MemoryRegistryStore


@pytest.fixture(params=[*STORES, "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryRegistryStore()
        return
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else (
        f"sqlite:///{tmp_path / 'kiln.db'}")  # fmt: skip
    with SqlStore(url, FileBlobStore(tmp_path / "blobs")) as s:
        yield s


def trained(store: Any, n: int, accuracy: float) -> str:
    """A succeeded run with an ``accuracy`` and a ``model.pkl`` artifact."""
    run_id = f"{n:032x}"
    sha = store.blob_store.put_bytes(f"model {n}".encode())
    now = time.time()
    store.write(WriteBatch(
        new_runs=[RunRow(id=run_id, app="fraud", status=RunStatus.SUCCEEDED, created_at=now,
                         started_at=now, ended_at=now)],
        summaries=[(run_id, "fraud", "accuracy", accuracy)],
        artifacts=[ArtifactRow(run_id=run_id, direction="out", name="model.pkl",
                               kind="pickle", sha256=sha, size=7)],
    ))  # fmt: skip
    return run_id


def test_versions_aliases_gates_approvals_and_rollback(store: Any) -> None:
    models = models_for(store, app="fraud", actor="ann")
    first, second = trained(store, 1, 0.8), trained(store, 2, 0.9)
    v1 = models.register("fraud", first, artifact="model.pkl")
    v2 = models.register("fraud", second, artifact="model.pkl")
    assert (v1.version, v2.version) == (1, 2) and v2.metrics == {"accuracy": 0.9}
    with pytest.raises(NotFoundError):
        models.register("fraud", first, artifact="weights")
    assert models.get("fraud:2") == v2 and models.names() == ["fraud"]
    assert isinstance(models.promote("fraud", 1), AliasMove)
    models.set_policy("fraud", "production", {"metrics": {"accuracy": ">= 0.95"},
                                              "allow_dirty": True})  # fmt: skip
    with pytest.raises(PolicyError, match=r"accuracy: 0\.9 is not >= 0\.95"):
        models.promote("fraud", 2)
    assert models.gate_failures("fraud", 2, "production") == ["accuracy: 0.9 is not >= 0.95"]
    assert models.aliases("fraud") == {"production": 1}  # a refusal changes nothing
    rule = {"allow_dirty": True, "approvals": {"count": 1, "approvers": ["bo"]}}
    models.set_policy("fraud", "production", rule, weaken=True, reason="approvals instead")
    asked = models.promote("fraud", 2, reason="better")
    assert isinstance(asked, PromotionRequest) and asked.status == "pending"
    with pytest.raises(ValidationError, match="its own request"):
        models.approve(asked.id)  # ann asked
    done = models_for(store, app="fraud", actor="bo").approve(asked.id)
    assert done.status == "applied" and models.get("fraud@production").version == 2
    back = models.rollback("fraud", "production")
    assert (back.from_version, back.to_version) == (2, 1)
    history = models.history("fraud", "production")
    assert [(m.from_version, m.to_version) for m in history] == [(None, 1), (1, 2), (2, 1)]
    actions = [e["action"] for e in reversed(store.audit_events(limit=None))]
    assert [a for a in actions if a.startswith(("model", "alias", "policy", "promotion"))] == [
        "model.register", "model.register", "alias.promote", "policy.set", "policy.set",
        "promotion.request", "promotion.approve", "alias.promote", "alias.rollback",
    ]  # fmt: skip
    assert list(store.verify()) == []
    weakened = store.audit_events(action="policy.set", limit=None)[0]  # the newest
    assert json.loads(weakened["payload"])["reason"] == "approvals instead"
