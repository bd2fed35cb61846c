"""Opening and closing a run with no metrics, on SQLite.

Baseline: raw sqlite3 inserting one run row and updating it, each committed, in the
same schema. Goal: under 5 ms per open+close. Measured outside a git work tree (the
store path alone) and inside a dirty one (adds git's status, run beside the run body).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kiln
from kiln.config import Settings
from kiln.record import recorder

from _common import Row, emit

N = 500


def kiln_ms(home: Path, cwd: Path) -> float:
    code = f"""
import time, kiln
from kiln.config import Settings
app = kiln.App("bench", settings=Settings.from_env({{"KILN_HOME": {str(home)!r}}}))
with app.run(): pass
t = time.perf_counter()
for i in range({N}):
    with app.run(params={{"i": i}}): pass
print((time.perf_counter() - t) / {N} * 1000)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


def raw_ms(home: Path) -> float:
    settings = Settings.from_env({"KILN_HOME": str(home)})
    with kiln.App("bench", settings=settings).run():
        pass
    recorder.close_all()
    conn = sqlite3.connect(home / "kiln.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    t = time.perf_counter()
    for i in range(N):
        rid = f"{i:032x}"
        now = time.time()
        conn.execute(
            "INSERT INTO runs (id, app, status, created_at, started_at, params, tags) "
            "VALUES (?, 'bench', 'running', ?, ?, ?, '{}')",
            (rid, now, now, json.dumps({"i": i})),
        )
        conn.execute(
            "UPDATE runs SET status='succeeded', ended_at=?, usage=? WHERE id=?",
            (time.time(), json.dumps({"wall_s": 0.0}), rid),
        )
    elapsed = time.perf_counter() - t
    conn.close()
    return elapsed / N * 1000


def git_tree(root: Path) -> Path:
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / "train.py").write_text("print('x')\n")
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(
        ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "x"],
        cwd=root,
        check=True,
    )
    (root / "train.py").write_text("print('changed')\n")
    (root / "notes.py").write_text("untracked\n")
    return root


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        plain = base / "plain"
        plain.mkdir()
        raw = raw_ms(base / "raw")
        no_git = kiln_ms(base / "h1", plain)
        with_git = kiln_ms(base / "h2", git_tree(base / "repo"))
    emit(
        [
            Row(
                "runs",
                "open+close, no git work tree (ms)",
                no_git,
                raw,
                "raw sqlite3 insert + update of the run row",
                "ms",
                "< 5 ms",
                no_git < 5,
            ),
            Row(
                "runs",
                "open+close, in a dirty git work tree (ms)",
                with_git,
                raw,
                "raw sqlite3 insert + update of the run row",
                "ms",
                "< 5 ms",
                with_git < 5,
            ),
        ]
    )


if __name__ == "__main__":
    main()
