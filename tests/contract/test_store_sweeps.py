"""Sweep-related store behaviour, on every store: ties, hidden reproductions, removing a
sweep with its runs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kiln.config import Settings
from kiln.errors import DependencyError
from kiln.record.blobs import FileBlobStore
from kiln.record.model import RunStatus
from kiln.record.store.base import RunQuery, WriteBatch
from kiln.record.store.rows import RunRow
from kiln.record.store.sql import SqlStore


@pytest.fixture
def store(settings: Settings) -> Iterator[SqlStore]:
    with SqlStore(settings.store_url, FileBlobStore(settings.blob_dir)) as s:
        yield s


def row(n: int, *, created: float, parent: str | None = None, **tags: str) -> RunRow:
    return RunRow(
        id=f"{n:x}".rjust(32, "f"),
        app="a",
        status=RunStatus.SUCCEEDED,
        created_at=created,
        params={"n": n},
        tags=tags,
        parent_id=parent,
    )


def test_ties_on_a_metric_go_to_the_run_created_first(store: SqlStore) -> None:
    # ids sort the other way round from creation: only the creation order can win
    rows = [row(n, created=1000.0 + i) for i, n in enumerate([3, 2, 1])]
    summaries = [(r.id, "a", "acc", 0.5) for r in rows]
    store.write(WriteBatch(new_runs=rows, summaries=summaries))
    for order in ("acc", "-acc"):
        found = store.query_runs(RunQuery(order_by=order, limit=None))
        assert [r.params["n"] for r in found] == [3, 2, 1]


def test_reproductions_can_be_left_out(store: SqlStore) -> None:
    original = row(1, created=1.0)
    copy = row(2, created=2.0, reproduced_from=original.id)
    store.write(WriteBatch(new_runs=[original, copy]))
    everything = store.query_runs(RunQuery(limit=None))
    assert {r.id for r in everything} == {original.id, copy.id}
    hidden = store.query_runs(RunQuery(limit=None, reproductions=False))
    assert [r.id for r in hidden] == [original.id]


def test_a_sweep_is_removed_with_its_runs_unless_others_depend_on_them(
    store: SqlStore,
) -> None:
    sweep = row(1, created=1.0, kind="sweep")
    runs = [row(n, created=2.0, parent=sweep.id) for n in (2, 3)]
    copy = row(4, created=3.0, reproduced_from=runs[0].id)
    store.write(WriteBatch(new_runs=[sweep, *runs, copy]))
    with pytest.raises(DependencyError, match=f"its run {runs[0].id}: run {copy.id}"):
        store.delete_run(sweep.id, with_runs=True)
    assert len(store.query_runs(RunQuery(parent_id=sweep.id))) == 2  # nothing removed
    store.delete_run(copy.id)
    removed = store.delete_run(sweep.id, with_runs=True)
    assert removed == [runs[0].id, runs[1].id, sweep.id]
    assert store.query_runs(RunQuery(limit=None)) == []
    events = store.audit_events(action="run.delete")
    assert {e["target"] for e in events} == {sweep.id, *(r.id for r in runs), copy.id}
