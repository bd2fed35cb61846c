"""What other local users can see: no password in any process's argv, and a store
readable by its owner only."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

import kiln
from kiln.observe.tracing import FLUSH_SPANS, tracer_provider
from kiln.record.store.sql import SqlStore


def _children_cmdlines() -> list[str]:
    lines = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "stat").read_text().split()[3] != str(os.getpid()):
                continue
            lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError):
            continue  # gone meanwhile
    return lines


@pytest.mark.postgres
def test_the_span_writer_gets_the_store_url_without_argv(pg_url: str) -> None:
    # Trust authentication ignores the password, so it reaches the store all the same.
    url = pg_url.replace("postgres@", "postgres:s3cret-pw@", 1)
    assert "s3cret-pw" in url
    SqlStore(url, create=True).close()
    provider = tracer_provider("secrets", store_url=url)
    tracer = provider.get_tracer("t")
    for i in range(FLUSH_SPANS):  # a full batch starts the writer process
        with tracer.start_as_current_span(f"s{i}"):
            pass
    writers: list[str] = []
    for _ in range(300):
        writers = [c for c in _children_cmdlines() if "_span_writer" in c]
        if writers:
            break
        time.sleep(0.05)
    assert writers, "the writer process did not start"
    assert not any("s3cret-pw" in c for c in writers)
    provider.shutdown()
    with SqlStore(url, create=False) as store, store.connect() as conn:
        stored = conn.execute(sa.text("SELECT count(*) FROM spans")).scalar_one()
    assert stored == FLUSH_SPANS


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_a_new_home_and_database_are_owner_only(
    tmp_path: Path, umask: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / f"home-{umask:o}"
    monkeypatch.setenv("KILN_HOME", str(home))
    old = os.umask(umask)
    try:
        app = kiln.App("secrets")
        with app.run(params={"a": 1}) as run:
            kiln.log({"x": 1.0})
        assert kiln.get_run(run.id).status == "succeeded"
    finally:
        os.umask(old)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for name in ("kiln.db", "kiln.db-wal", "kiln.db-shm"):
        path = home / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
    assert (home / "kiln.db").exists()
