"""Metric ingest: 1,000,000 points through kiln.log, durable after the final flush,
against raw sqlite3 executemany of the same rows into the same schema (the limit here).

Goal: kiln at least 50% of the raw rate.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import kiln
from kiln.config import Settings
from kiln.record import recorder

from _common import Row, emit

POINTS = 1_000_000
KEYS = ("loss", "accuracy", "lr", "grad_norm", "throughput")


def kiln_rate(home: Path, keys_per_call: int) -> float:
    settings = Settings.from_env({"KILN_HOME": str(home)})
    app = kiln.App("bench", settings=settings)
    keys = KEYS[:keys_per_call]
    calls = POINTS // keys_per_call
    values = [{k: float(i) for k in keys} for i in range(1000)]
    with app.run():
        pass  # open the store and warm the caches outside the timing
    t = time.perf_counter()
    with app.run():
        log = kiln.log
        for i in range(calls):
            log(values[i % 1000], step=i)
    elapsed = time.perf_counter() - t  # the run's end waits for the final flush
    recorder.close_all()
    with sqlite3.connect(home / "kiln.db") as conn:
        stored = conn.execute("SELECT count(*) FROM metrics").fetchone()[0]
    assert stored == POINTS, stored
    return POINTS / elapsed


def raw_rate(home: Path) -> float:
    """The same rows, prebuilt, in one executemany into a Kiln-created metrics table."""
    settings = Settings.from_env({"KILN_HOME": str(home)})
    with kiln.App("bench", settings=settings).run():
        pass
    recorder.close_all()
    now = time.time()
    rows = [("f" * 32, k, i, now, float(i)) for i in range(POINTS // len(KEYS)) for k in KEYS]
    conn = sqlite3.connect(home / "kiln.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    t = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO metrics (run_id, key, step, time, value) VALUES (?, ?, ?, ?, ?)", rows
    )
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - t
    conn.close()
    return POINTS / elapsed


def main(repeats: int = 3) -> None:
    results: dict[str, list[float]] = {"raw": [], "kiln5": [], "kiln1": []}
    for _ in range(repeats):  # interleaved, so drift hits every variant alike
        for name, fn in (
            ("raw", raw_rate),
            ("kiln5", lambda h: kiln_rate(h, 5)),
            ("kiln1", lambda h: kiln_rate(h, 1)),
        ):
            with tempfile.TemporaryDirectory() as tmp:
                results[name].append(fn(Path(tmp)))
    raw = sorted(results["raw"])[len(results["raw"]) // 2]
    rows = []
    for name, label in (("kiln5", "5 metrics per log call"), ("kiln1", "1 metric per log call")):
        rate = sorted(results[name])[len(results[name]) // 2]
        rows.append(
            Row(
                "ingest",
                f"1M points, {label} (points/s)",
                rate,
                raw,
                "raw sqlite3 executemany, same rows and schema",
                "points/s",
                ">= 0.5x raw",
                rate >= 0.5 * raw,
            )
        )
    emit(rows)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
