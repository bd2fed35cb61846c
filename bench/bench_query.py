"""``kiln.runs(order_by="-accuracy", limit=10)`` over a store of 100,000 runs.

Baseline: the same top-10 as one raw sqlite3 query on the same file. Goal: under 50 ms.
"""

from __future__ import annotations

import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import kiln
from kiln.config import Settings
from kiln.record.model import RunStatus
from kiln.record.store.base import WriteBatch
from kiln.record.store.rows import RunRow
from kiln.record.store.sql import SqlStore

from _common import Row, emit

RUNS = 100_000
BATCH = 10_000


def populate(settings: Settings) -> None:
    rng = random.Random(0)
    store = SqlStore(settings.store_url)
    now = time.time()
    for start in range(0, RUNS, BATCH):
        batch = WriteBatch()
        for i in range(start, start + BATCH):
            rid = f"{rng.getrandbits(128):032x}"
            app = "fraud" if i % 2 else "churn"
            batch.new_runs.append(
                RunRow(
                    id=rid,
                    app=app,
                    status=RunStatus.SUCCEEDED,
                    created_at=now + i,
                    params={"lr": rng.choice([0.1, 0.01, 0.001]), "depth": rng.randint(1, 8)},
                )
            )
            batch.summaries += [
                (rid, app, "accuracy", rng.random()),
                (rid, app, "loss", rng.random()),
            ]
        store.write(batch)
    store.close()


def median_ms(fn, n: int = 30) -> float:  # type: ignore[no-untyped-def]
    fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env({"KILN_HOME": tmp})
        populate(settings)
        conn = sqlite3.connect(Path(tmp) / "kiln.db")
        raw_sql = (
            "SELECT runs.* FROM summary JOIN runs ON runs.id = summary.run_id "
            "WHERE summary.key = 'accuracy' AND summary.value IS NOT NULL "
            "ORDER BY summary.value DESC LIMIT 10"
        )
        raw = median_ms(lambda: conn.execute(raw_sql).fetchall())
        top = median_ms(lambda: kiln.runs(order_by="-accuracy", limit=10, settings=settings))
        top_app = median_ms(
            lambda: kiln.runs(app="fraud", order_by="-accuracy", limit=10, settings=settings)
        )
        newest = median_ms(lambda: kiln.runs(limit=10, settings=settings))
        best = kiln.runs(order_by="-accuracy", limit=10, settings=settings)
        values = [r.summary["accuracy"] for r in best]
        assert values == sorted(values, reverse=True) and len(values) == 10
        conn.close()
    emit(
        [
            Row(
                "query",
                "100k runs, order_by=-accuracy limit 10 (ms)",
                top,
                raw,
                "raw sqlite3 top-10 join on the same file",
                "ms",
                "< 50 ms",
                top < 50,
            ),
            Row(
                "query",
                "100k runs, app filter + order_by=-accuracy (ms)",
                top_app,
                raw,
                "raw sqlite3 top-10 join on the same file",
                "ms",
                "< 50 ms",
                top_app < 50,
            ),
            Row(
                "query",
                "100k runs, newest 10 (ms)",
                newest,
                raw,
                "raw sqlite3 top-10 join on the same file",
                "ms",
                "< 50 ms",
                newest < 50,
            ),
        ]
    )


if __name__ == "__main__":
    main()
