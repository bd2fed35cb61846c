"""``kiln audit verify`` over 1,000,000 events. Goal: under 10 s.

Baseline: the least any check can do on the same file: read every event with
sqlite3 and hash one line per event.
"""

from __future__ import annotations

import hashlib
import sqlite3
import tempfile
import time
from pathlib import Path

from kiln.record import audit
from kiln.record.store.sql import SqlStore

from _common import Row, emit

N = 1_000_000
BATCH = 50_000


def populate(url: str) -> None:
    store = SqlStore(url)
    from kiln.record.store._schema import audit as table

    seq, prev = 0, audit.GENESIS
    now = time.time()
    with store._engine.begin() as conn:
        for start in range(0, N, BATCH):
            events = [
                audit.Event(
                    "run.end",
                    f"{i:032x}",
                    {"status": "succeeded", "result": {"i": i}},
                    now + i,
                    "bench",
                )
                for i in range(start, start + BATCH)
            ]
            rows = audit.chain(events, seq, prev)
            seq, prev = rows[-1]["seq"], rows[-1]["hash"]
            conn.execute(table.insert(), rows)
    store.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "kiln.db"
        url = f"sqlite:///{db}"
        populate(url)
        store = SqlStore(url)
        t = time.perf_counter()
        problems = list(store.verify())
        kiln_s = time.perf_counter() - t
        assert problems == [], problems
        store.close()
        conn = sqlite3.connect(db)
        t = time.perf_counter()
        for row in conn.execute("SELECT seq, time, actor, action, target, payload_sha256, "
                                "prev_hash FROM audit ORDER BY seq"):  # fmt: skip
            hashlib.sha256("\n".join(map(str, row)).encode()).hexdigest()
        raw_s = time.perf_counter() - t
        conn.close()
    emit(
        [
            Row(
                "audit",
                "kiln audit verify, 1M events (s)",
                kiln_s,
                raw_s,
                "sqlite3 read + one sha256 per event",
                "s",
                "< 10 s",
                kiln_s < 10,
            )
        ]
    )


if __name__ == "__main__":
    main()
