"""The approvals of agents' actions in the SQL store (SQLite and PostgreSQL): one live
request per agent, operation and arguments; decided once; used once; expiring; and a
project sees only its own."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.errors import NotFoundError, ValidationError
from kiln.record.store import open_sql_store
from kiln.record.store.base import ApprovalRow
from kiln.record.store.sql import SqlStore


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    opened = open_sql_store(url or f"sqlite:///{tmp_path / 'kiln.db'}", actor="root")
    yield opened
    opened.close()


def row(digest: str = "a" * 64, *, wait_s: float = 3600.0, who: str = "bot") -> ApprovalRow:
    now = time.time()
    return ApprovalRow(
        id=secrets.token_hex(6),
        project="default",
        principal=who,
        operation="model_rollback",
        args={"name": "fraud"},
        args_hash=digest,
        status="pending",
        created_at=now,
        expires_at=now + wait_s,
        sponsor="alice",
    )


def test_an_approval_is_asked_once_decided_once_and_used_once(store: SqlStore) -> None:
    bot = store.as_actor("bot", sponsor="alice")
    first = bot.ask_approval(row())
    assert bot.ask_approval(row()).id == first.id  # the same call asks nothing new
    assert bot.use_approval("bot", "model_rollback", "a" * 64) is None  # pending
    alice = store.as_actor("alice")
    decided = alice.decide_approval(first.id, approve=True, reason="fine", use_within_s=60)
    assert (decided.status, decided.decided_by, decided.reason) == ("approved", "alice", "fine")
    with pytest.raises(ValidationError, match="only a pending one"):
        alice.decide_approval(first.id, approve=False, reason=None, use_within_s=60)
    assert bot.use_approval("bot", "model_rollback", "b" * 64) is None  # other arguments
    assert bot.use_approval("eve", "model_rollback", "a" * 64) is None  # another agent
    used = bot.use_approval("bot", "model_rollback", "a" * 64)
    assert used is not None and used.status == "used"
    assert bot.use_approval("bot", "model_rollback", "a" * 64) is None  # spent
    assert bot.ask_approval(row()).id != first.id  # asking again: a new request
    actions = [e["action"] for e in store.audit_events(limit=10)]
    assert actions[:4] == [
        "approval.request",
        "approval.use",
        "approval.approve",
        "approval.request",
    ]


def test_expired_and_rejected_approvals_are_never_used(store: SqlStore) -> None:
    old = store.ask_approval(row(wait_s=-1))
    assert store.approval(old.id).status == "expired"
    with pytest.raises(ValidationError):
        store.decide_approval(old.id, approve=True, reason=None, use_within_s=60)
    fresh = store.ask_approval(row())
    assert fresh.id != old.id
    store.decide_approval(fresh.id, approve=True, reason=None, use_within_s=-1)
    assert store.use_approval("bot", "model_rollback", "a" * 64) is None  # its hour is over
    no = store.ask_approval(row("c" * 64))
    store.decide_approval(no.id, approve=False, reason="no", use_within_s=60)
    assert store.use_approval("bot", "model_rollback", "c" * 64) is None
    assert [r.id for r in store.approvals("rejected")] == [no.id]
    assert {r.id for r in store.approvals(principal="bot")} == {old.id, fresh.id, no.id}


def test_another_project_sees_none_of_them(store: SqlStore) -> None:
    mine = store.ask_approval(row())
    other = store.in_project("blue")
    assert other.approvals() == []
    with pytest.raises(NotFoundError):
        other.approval(mine.id)
    with pytest.raises(NotFoundError):
        other.decide_approval(mine.id, approve=True, reason=None, use_within_s=60)
    assert other.use_approval("bot", "model_rollback", "a" * 64) is None
