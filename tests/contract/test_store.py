"""One suite over every implementation of the run store: SQLite, PostgreSQL, a real
``kiln server`` on each, reached over HTTP, and the in-memory fake of kiln.testing
(the fixture yields the interface)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from conftest import SERVER_STORES, STORES, record_settings
from kiln.config import Settings
from kiln.errors import AmbiguousIdError, RunNotFoundError, StoreRefusedError, ValidationError
from kiln.record.model import RunStatus
from kiln.record.store import open_store
from kiln.record.store._schema import metadata
from kiln.record.store.base import KilnStore, RunQuery, WriteBatch
from kiln.record.store.rows import ArtifactRow, RunRow, RunUpdate
from kiln.record.store.sql import SqlStore
from kiln.testing import MemoryStore


@pytest.fixture(params=[*STORES, *SERVER_STORES, "memory"])
def store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[KilnStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    with open_store(record_settings(request, str(request.param), monkeypatch)) as s:
        yield s


def run_row(run_id: str, *, app: str = "a", created: float = 0.0, **extra: object) -> RunRow:
    row = {
        "id": run_id,
        "app": app,
        "status": "succeeded",
        "created_at": created or time.time(),
        "params": {},
        "tags": {},
    }
    row.update(extra)
    return RunRow.model_validate(row)


def hexid(n: int, prefix: str = "") -> str:
    return (prefix + f"{n:x}").ljust(32, "0")


def test_migrations_create_exactly_the_declared_schema(settings: Settings) -> None:
    with SqlStore(settings.store_url) as store, store._engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_reopening_a_store_keeps_its_records(settings: Settings) -> None:
    with SqlStore(settings.store_url) as s:
        s.write(WriteBatch(new_runs=[run_row(hexid(1))]))
    with SqlStore(settings.store_url) as s:
        assert s.get_run(hexid(1)).app == "a"


def test_write_and_read_back_a_whole_record(store: KilnStore) -> None:
    rid = hexid(7, "ab")
    store.write(
        WriteBatch(
            new_runs=[
                run_row(
                    rid, status="running", params={"lr": 0.1, "layers": [1, 2]}, tags={"t": "x"}
                )
            ]
        )
    )
    model = store.blob_store.put_bytes(b"0123456789")  # a server takes artifacts it holds
    store.write(
        WriteBatch(
            metrics=[(rid, "loss", i, 100.0 + i, 1.0 / (i + 1)) for i in range(5)],
            summaries=[(rid, "a", "loss", 0.2)],
            artifacts=[
                ArtifactRow(
                    run_id=rid, name="m.pkl", direction="out", kind="pickle", sha256=model, size=10
                )
            ],
            updates=[
                RunUpdate(id=rid, status=RunStatus.SUCCEEDED, ended_at=5.0, result={"acc": 1})
            ],
        )
    )
    record = store.get_run(rid)
    assert record.status is RunStatus.SUCCEEDED
    assert record.params == {"lr": 0.1, "layers": [1, 2]}
    assert record.tags == {"t": "x"}
    assert record.result == {"acc": 1}
    assert record.summary == {"loss": 0.2}
    assert [a.name for a in record.artifacts] == ["m.pkl"]
    assert [p.value for p in record.metric_history("loss")] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    assert [p.step for p in store.metric_history(rid, "loss")] == [0, 1, 2, 3, 4]


def test_non_finite_metric_values_are_kept(store: KilnStore) -> None:
    rid = hexid(3)
    store.write(WriteBatch(new_runs=[run_row(rid)]))
    values = [math.nan, math.inf, -math.inf, 1.5]
    store.write(WriteBatch(metrics=[(rid, "x", i, 1.0, v) for i, v in enumerate(values)]))
    got = [p.value for p in store.metric_history(rid, "x")]
    assert math.isnan(got[0]) and got[1:] == [math.inf, -math.inf, 1.5]


def test_id_prefix_lookup(store: KilnStore) -> None:
    store.write(WriteBatch(new_runs=[run_row(hexid(1, "abc1")), run_row(hexid(2, "abc2"))]))
    assert store.get_run("abc1").id == hexid(1, "abc1")
    with pytest.raises(AmbiguousIdError):
        store.get_run("abc")
    for missing in ("ffff", "not-hex", ""):
        with pytest.raises(RunNotFoundError):
            store.get_run(missing)


def test_order_by_metric_puts_missing_and_nan_last(store: KilnStore) -> None:
    accs = {1: 0.5, 2: 0.9, 3: None, 4: 0.7, 5: math.nan}
    store.write(WriteBatch(new_runs=[run_row(hexid(i), created=float(i)) for i in accs]))
    store.write(
        WriteBatch(summaries=[(hexid(i), "a", "acc", v) for i, v in accs.items() if v is not None])
    )
    best = store.query_runs(RunQuery(order_by="-acc", limit=10))
    assert [r.id for r in best[:3]] == [hexid(2), hexid(4), hexid(1)]
    assert {r.id for r in best[3:]} == {hexid(3), hexid(5)}
    worst = store.query_runs(RunQuery(order_by="acc", limit=2))
    assert [r.id for r in worst] == [hexid(1), hexid(4)]
    top1 = store.query_runs(RunQuery(order_by="-metrics.acc", limit=1))
    assert [r.id for r in top1] == [hexid(2)]


def test_filters_by_app_status_params_and_tags(store: KilnStore) -> None:
    store.write(
        WriteBatch(
            new_runs=[
                run_row(
                    hexid(1), app="x", params={"lr": 0.1, "opt": "sgd", "bn": True}, tags={"t": "1"}
                ),
                run_row(hexid(2), app="x", params={"lr": 0.2, "opt": "adam"}, status="failed"),
                run_row(hexid(3), app="y", params={"lr": 1, "opt": "sgd"}),
            ]
        )
    )

    def ids(**kw: object) -> set[str]:
        return {r.id for r in store.query_runs(RunQuery(**kw))}  # type: ignore[arg-type]

    assert ids(app="x") == {hexid(1), hexid(2)}
    assert ids(status=(RunStatus.FAILED,)) == {hexid(2)}
    assert ids(params={"opt": "sgd"}) == {hexid(1), hexid(3)}
    assert ids(params={"lr": 1}) == {hexid(3)}
    assert ids(params={"lr": 0.1, "bn": True}) == {hexid(1)}
    assert ids(tags={"t": "1"}) == {hexid(1)}
    assert ids(app="x", params={"opt": "sgd"}) == {hexid(1)}
    with pytest.raises(ValidationError, match=r"params\.lr"):
        ids(params={"lr": [1]})
    with pytest.raises(ValidationError, match="quote"):  # a JSON path cannot hold it
        ids(params={'"q': 1})
    with pytest.raises(ValidationError, match="control character"):  # NUL ends a path
        ids(tags={"a\x00b": "1"})


def test_order_by_run_fields_and_limit(store: KilnStore) -> None:
    store.write(WriteBatch(new_runs=[run_row(hexid(i), created=float(i)) for i in range(1, 6)]))
    assert [r.id for r in store.query_runs(RunQuery(order_by="-created", limit=2))] == [
        hexid(5),
        hexid(4),
    ]
    assert [r.id for r in store.query_runs(RunQuery(order_by="created", limit=None))] == [
        hexid(i) for i in range(1, 6)
    ]


def test_pages_by_offset_follow_the_order_past_the_runs_without_the_metric(
    store: KilnStore,
) -> None:
    accs = {i: (None if i % 4 == 0 else i / 10) for i in range(1, 12)}
    store.write(WriteBatch(new_runs=[run_row(hexid(i), created=float(i)) for i in accs]))
    store.write(WriteBatch(summaries=[(hexid(i), "a", "acc", v) for i, v in accs.items()
                                      if v is not None]))  # fmt: skip
    for order in ("-acc", "acc", "-created", "name"):
        whole = [r.id for r in store.query_runs(RunQuery(order_by=order, limit=None))]
        pages = [store.query_runs(RunQuery(order_by=order, limit=3, offset=start))
                 for start in range(0, 12, 3)]  # fmt: skip
        paged = [r.id for page in pages for r in page]
        assert paged == whole and len(whole) == 11, order
    assert store.query_runs(RunQuery(offset=50)) == []
    with pytest.raises(ValidationError, match="offset"):
        store.query_runs(RunQuery(offset=-1))


def test_filters_by_metric_comparisons_and_text(store: KilnStore) -> None:
    store.write(WriteBatch(new_runs=[
        run_row(hexid(1), name="resnet-small"), run_row(hexid(2), name="resnet-big"),
        run_row(hexid(3), name="vit", app="vision"), run_row(hexid(4), name="a_b"),
        run_row(hexid(5), name="axb"),
    ]))  # fmt: skip
    store.write(WriteBatch(summaries=[(hexid(1), "a", "acc", 0.5), (hexid(2), "a", "acc", 0.9),
                                      (hexid(3), "vision", "acc", math.nan),
                                      (hexid(2), "a", "loss", 0.1)]))  # fmt: skip

    def ids(**kw: object) -> set[str]:
        return {r.id for r in store.query_runs(RunQuery(**kw))}  # type: ignore[arg-type]

    assert ids(metrics=(("acc", ">", 0.6),)) == {hexid(2)}
    assert ids(metrics=(("acc", "<=", 0.9),)) == {hexid(1), hexid(2)}  # NaN matches nothing
    assert ids(metrics=(("acc", "!=", 0.5),)) == {hexid(2)}  # nor does a missing metric
    assert ids(metrics=(("acc", ">", 0.1), ("loss", "<", 1.0))) == {hexid(2)}
    ordered = store.query_runs(RunQuery(metrics=(("acc", ">", 0.1),), order_by="-acc"))
    assert [r.id for r in ordered] == [hexid(2), hexid(1)]
    assert ids(text="resnet") == {hexid(1), hexid(2)}
    assert ids(text="vision") == {hexid(3)}  # the app
    assert ids(text=hexid(4)[:6]) == {hexid(4)}  # an id prefix
    assert ids(text="a_b") == {hexid(4)}  # _ and % are plain characters
    assert ids(text="%") == set()
    with pytest.raises(ValidationError, match=r"metrics.*(op|comparison)"):
        ids(metrics=(("acc", "~", 1.0),))


def test_summary_and_artifact_writes_are_upserts(store: KilnStore) -> None:
    rid = hexid(9)
    first, second = store.blob_store.put_bytes(b"a"), store.blob_store.put_bytes(b"b")
    store.write(WriteBatch(new_runs=[run_row(rid)]))
    for value, sha in ((1.0, first), (2.0, second)):
        art = ArtifactRow(run_id=rid, name="f", direction="out", kind="file", sha256=sha, size=1)
        store.write(WriteBatch(summaries=[(rid, "a", "m", value)], artifacts=[art]))
    record = store.get_run(rid)
    assert record.summary == {"m": 2.0}
    assert [a.sha256 for a in record.artifacts] == [second]


def test_a_key_sent_again_is_a_retry_and_one_reused_for_another_batch_is_refused(
    store: KilnStore,
) -> None:
    rid = hexid(11)
    store.write(WriteBatch(new_runs=[run_row(rid)]))
    for _ in range(2):  # a client that did not hear back sends the same batch again
        store.write(
            WriteBatch(metrics=[(rid, "m", 0, 1.0, 1.0)], key="key-of-batch-1", digest="a" * 64)
        )  # fmt: skip (a server hashes the body itself)
    with pytest.raises(StoreRefusedError, match="used for another batch"):
        store.write(WriteBatch(metrics=[(rid, "m", 1, 1.0, 2.0)], key="key-of-batch-1",
                               digest="b" * 64))  # fmt: skip
    assert [p.value for p in store.metric_history(rid, "m")] == [1.0]


def test_a_failed_batch_leaves_nothing_behind(store: KilnStore) -> None:
    rid = hexid(4)
    store.write(WriteBatch(new_runs=[run_row(rid)]))
    with pytest.raises(StoreRefusedError, match=r"store.*: .*(UNIQUE|duplicate key)"):
        store.write(
            WriteBatch(
                new_runs=[run_row(hexid(5)), run_row(rid)], metrics=[(rid, "m", 0, 1.0, 1.0)]
            )
        )
    with pytest.raises(RunNotFoundError):
        store.get_run(hexid(5))
    assert store.metric_history(rid, "m") == []


def test_concurrent_writers_keep_one_unbroken_audit_chain(settings: Settings) -> None:
    import threading

    from kiln.record.audit import verify_chain
    from kiln.record.store._schema import audit

    stores = [SqlStore(settings.store_url) for _ in range(3)]
    errors: list[BaseException] = []

    def writer(store: SqlStore, base: int) -> None:
        try:
            for i in range(30):
                store.write(WriteBatch(new_runs=[run_row(hexid(base + i))]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=writer, args=(s, 1000 * (n + 1))) for n, s in enumerate(stores)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with stores[0]._engine.connect() as conn:
        rows = conn.execute(sa.select(*audit.c).order_by(audit.c.seq)).all()
    assert len(rows) == 180  # each run is created already ended: run.create + run.end
    assert list(verify_chain(iter(rows))) == []
    for s in stores:
        s.close()


def test_spans_are_stored_and_read_back_with_their_attributes(store: KilnStore) -> None:
    from kiln.observe.tracing import compact_row
    from kiln.observe.why import list_spans

    attrs = {"kiln.endpoint": "fraud", "kiln.model.name": "fraud", "kiln.model.version": 3,
             "input.value": '{"x": [1, 2]}', "llm.token_count.total": 12,
             "tags": ("a", "b")}  # fmt: skip
    now = time.time_ns()
    store.write_spans([
        compact_row((7, 1, None, "predict", now, now + 2_000, False, attrs)),
        compact_row((7, 2, 1, "predict", now + 10, now + 20, True, {"kiln.endpoint": "fraud"})),
    ])  # fmt: skip
    spans = {s["span_id"]: s for s in list_spans(store, endpoint="fraud")}
    first, second = spans[f"{1:016x}"], spans[f"{2:016x}"]
    assert first["trace_id"] == f"{7:032x}" and first["model_version"] == 3
    assert first["duration_ns"] == 2_000 and first["status"] == "ok"
    assert first["attributes"]["tags"] == ["a", "b"]
    assert first["attributes"]["input.value"] == '{"x": [1, 2]}'
    assert second["parent_id"] == f"{1:016x}" and second["status"] == "error"


def test_upgrading_puts_what_was_recorded_in_the_default_project(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    from kiln.record.store.sql import _MIGRATIONS

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # a store as Kiln left it before projects
        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0012")
        conn.execute(sa.text(
            "INSERT INTO runs (id, app, status, created_at, params, tags, code) VALUES "
            "(:id, 'a', 'succeeded', 1.0, '{}', '{}', :code)"
        ), {"id": hexid(1), "code": '{"source_blob": "' + "c" * 64 + '"}'})  # fmt: skip
        conn.execute(sa.text(
            "INSERT INTO artifacts (run_id, direction, name, kind, sha256, size) VALUES "
            "(:id, 'out', 'm', 'file', :sha, 1)"
        ), {"id": hexid(1), "sha": "a" * 64})  # fmt: skip
    engine.dispose()
    with SqlStore(url) as store:
        assert store.get_run(hexid(1)).app == "a"
        assert store.holds_blob("a" * 64) and store.holds_blob("c" * 64)
        assert not store.in_project("blue").holds_blob("a" * 64)
        with pytest.raises(RunNotFoundError):
            store.in_project("blue").get_run(hexid(1))


def test_the_dashboards_reads_on_each_database(settings: Settings) -> None:
    """Groups, columns, counts and cut series: SQL the SQL stores alone run (the server's)."""
    with SqlStore(settings.store_url) as store:
        store.write(WriteBatch(new_runs=[
            run_row(hexid(i), params={"lr": [0.1, 1][i % 2], "opt": "sgd"}, tags={"t": str(i % 3)})
            for i in range(1, 7)
        ], summaries=[(hexid(i), "a", "acc", i / 10) for i in range(1, 7)]))  # fmt: skip
        groups = store.group_runs(RunQuery(), "params.lr", ["acc", "none"])
        assert [(g["value"], g["runs"]) for g in groups] == [(0.1, 3), (1, 3)]
        spread = {"mean": 0.4, "median": 0.4, "min": 0.2, "max": 0.6, "n": 3}
        assert groups[0]["metrics"]["acc"] == pytest.approx(spread)
        assert [g["value"] for g in store.group_runs(RunQuery(), "tags.t", [])] == ["0", "1", "2"]
        with pytest.raises(ValidationError, match="by"):
            store.group_runs(RunQuery(), "acc", [])
        assert store.run_columns(RunQuery()) == {"params": ["lr", "opt"], "tags": ["t"],
                                                 "metrics": ["acc"]}  # fmt: skip
        assert store.count_matching(RunQuery(metrics=(("acc", ">=", 0.5),), limit=1)) == 2
        run = hexid(1)
        values = [math.cos(s / 40) for s in range(1000)]
        values[500] = 9.0
        store.write(WriteBatch(metrics=[(run, "y", s, 1.0, v) for s, v in enumerate(values)]))
        [cut] = store.series([run, hexid(99)], ["y"], points=100)
        assert cut["total"] == 1000 and len(cut["points"]) <= 100 and [500, 9.0] in cut["points"]
        assert min(v for _, v in cut["points"]) == min(values)
        [zoom] = store.series([run], ["y"], points=100, min_step=10, max_step=19)
        assert zoom["points"] == [[s, values[s]] for s in range(10, 20)]


def test_series_of_steps_across_all_64_bits(settings: Settings) -> None:
    with SqlStore(settings.store_url) as store:
        run = hexid(2)
        store.write(WriteBatch(new_runs=[run_row(run)]))
        steps = [-(2**63), -5, 0, 7, 2**63 - 1]
        store.write(WriteBatch(metrics=[(run, "w", s, 1.0, float(i)) for i, s in enumerate(steps)]))
        for points in (2, 4):
            [cut] = store.series([run], ["w"], points=points)
            assert cut["total"] == 5 and [-(2**63), 0.0] in cut["points"]
            assert [2**63 - 1, 4.0] in cut["points"]
