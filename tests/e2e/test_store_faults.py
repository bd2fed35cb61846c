"""A store survives the faults of opening it: a process killed at any statement of a
migration, and a PostgreSQL server that accepts connections but never answers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Engine

import kiln
from kiln.record import recorder
from kiln.record.store import sql
from kiln.record.store.base import RunQuery
from kiln.record.store.sql import SCHEMA_HEAD, SqlStore

REVISIONS = ["base", *(f"{n:04d}" for n in range(1, int(SCHEMA_HEAD)))]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A store with three runs, at every revision before head (downgraded from head)."""
    root = tmp_path_factory.mktemp("revisions")
    os.environ["KILN_HOME"] = str(root / "home")  # the fixture's own, set back below
    try:
        app = kiln.App("faults")
        for i in range(3):
            with app.run(params={"i": i}):
                kiln.log({"x": float(i)})
        recorder.close_all()
    finally:
        del os.environ["KILN_HOME"]
    out = {}
    for rev in REVISIONS:
        path = Path(shutil.copy(root / "home" / "kiln.db", root / f"at-{rev}.db"))
        engine = sa.create_engine(f"sqlite:///{path}")
        with engine.begin() as conn:
            cfg = Config()
            cfg.set_main_option("script_location", str(sql._MIGRATIONS))
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, rev)
        engine.dispose()
        out[rev] = path
    return out


def statements_to_head(path: Path) -> int:
    count = 0

    def counted(*_args: Any) -> None:
        nonlocal count
        count += 1

    event.listen(Engine, "before_cursor_execute", counted)
    try:
        SqlStore(f"sqlite:///{path}").close()
    finally:
        event.remove(Engine, "before_cursor_execute", counted)
    return count


def open_killed_at(path: Path, statement: int) -> None:
    """Open (and so upgrade) the store in a child process SIGKILLed as it sends its
    ``statement``-th SQL statement."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        sent = 0

        def kill_at(*_args: Any) -> None:
            nonlocal sent
            sent += 1
            if sent == statement:
                os.kill(os.getpid(), signal.SIGKILL)

        event.listen(Engine, "before_cursor_execute", kill_at)
        try:
            SqlStore(f"sqlite:///{path}").close()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), "the child finished before the statement it was to die at"


def kill_points(rev: str, total: int) -> list[int]:
    """Every other statement of a first open (every migration, from nothing), and its
    last few (the commit's); every fifth of an upgrade from an older revision holding
    runs (each revision's start differs, so together they still cover most statements),
    and its last few."""
    if rev == "base":
        return sorted({*range(1, total, 2), *range(max(1, total - 3), total)})
    return sorted({*range(1 + int(rev) % 5 if rev.isdigit() else 1, total, 5),
                   *range(max(1, total - 3), total)})  # fmt: skip


@pytest.mark.parametrize("rev", REVISIONS)
def test_a_store_killed_during_any_migration_opens_at_head_with_its_runs(
    rev: str, stores: dict[str, Path], tmp_path: Path
) -> None:
    total = statements_to_head(Path(shutil.copy(stores[rev], tmp_path / "count.db")))
    expected = 0 if rev == "base" else 3
    for n in kill_points(rev, total):
        path = Path(shutil.copy(stores[rev], tmp_path / f"killed-{n}.db"))
        open_killed_at(path, n)
        with SqlStore(f"sqlite:///{path}") as store:
            assert store._schema_version() == SCHEMA_HEAD, f"killed at statement {n}"
            runs = store.query_runs(RunQuery(app="faults"))
            assert len(runs) == expected, f"killed at statement {n}"


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for conn in held:
        conn.close()


def test_a_server_that_never_answers_fails_the_command(silent_server: int) -> None:
    url = f"postgresql+psycopg://kiln:pw@127.0.0.1:{silent_server}/db?connect_timeout=2"
    done = subprocess.run(
        [sys.executable, "-m", "kiln", "runs", "ls"],
        capture_output=True,
        text=True,
        env={**os.environ, "KILN_STORE": url},
        timeout=120,
    )
    assert done.returncode == 1
    assert "cannot be reached (connection timeout expired)" in done.stderr
    assert "Traceback" not in done.stderr and "pw@" not in done.stderr


def test_postgres_urls_get_timeouts_unless_they_set_their_own() -> None:
    url = sa.make_url("postgresql+psycopg://u@h/db?options=-csearch_path%3Dx")
    query = sql._with_timeouts(url).query
    assert query["connect_timeout"] == str(sql.PG_TIMEOUT_S)
    assert query["options"] == f"-csearch_path=x -c statement_timeout={sql.PG_TIMEOUT_S}s"
    own = sa.make_url(
        "postgresql+psycopg://u@h/db?connect_timeout=5&options=-c statement_timeout=9s"
    )
    assert sql._with_timeouts(own).query == own.query


@pytest.mark.postgres
def test_a_statement_past_the_timeout_is_cancelled(pg_url: str) -> None:
    url = f"{pg_url}%20-c%20statement_timeout%3D1s"  # after the search_path option
    with SqlStore(url) as store, store.connect() as conn, pytest.raises(sa.exc.OperationalError):
        conn.execute(sa.text("SELECT pg_sleep(5)"))
