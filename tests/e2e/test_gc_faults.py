"""kiln gc never removes bytes a record names or a run is saving, whatever their age,
survives being killed, and cleans up after killed writers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import kiln
from kiln.cli import app as cli
from kiln.config import Settings
from kiln.record import gc, recorder
from kiln.record.blobs import PENDING, FileBlobStore

OLD = time.time() - 7200


def make_old(blobs: FileBlobStore, sha: str) -> None:
    os.utime(blobs.path(sha), (OLD, OLD))


def gc_json(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["gc", "--json", *args])
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.output)
    return data


def test_bytes_saved_again_are_young_even_in_an_old_blob() -> None:
    app = kiln.App("gc")
    rec = recorder.recorder_for(Settings.from_env())
    orphan = rec.blobs.put_bytes(b"weights of a removed run")
    make_old(rec.blobs, orphan)
    with app.run():
        assert kiln.save("weights", b"weights of a removed run") == orphan
        # not yet flushed: nothing names it, but it was saved just now
        assert gc_json()["removed"] == []
    assert rec.blobs.exists(orphan)
    make_old(rec.blobs, orphan)
    assert gc_json()["removed"] == []  # and now its run names it


def test_a_registered_models_bytes_outlive_its_runs_artifact_row() -> None:
    from kiln.record.store.base import WriteBatch
    from kiln.record.store.rows import ArtifactRow

    app = kiln.App("gc")
    rec = recorder.recorder_for(Settings.from_env())
    with app.run() as run:
        kiln.save("model.pkl", b"weights of version 1")
    version = app.models.register("m", run.id, artifact="model.pkl")
    # The run's artifact row written again with other bytes: nothing but the model
    # version names the first ones now.
    other = rec.blobs.put_bytes(b"other bytes")
    rec.store.write(WriteBatch(artifacts=[ArtifactRow(
        run_id=run.id, direction="out", name="model.pkl", kind="file", sha256=other, size=11,
    )]))  # fmt: skip
    make_old(rec.blobs, version.artifact_sha256)
    assert version.artifact_sha256 not in gc_json()["removed"]
    assert rec.blobs.exists(version.artifact_sha256)


class NamedMeanwhile:
    """The real store, except that a blob becomes referenced after gc first asks."""

    def __init__(self, store: Any, sha: str) -> None:
        self.store, self.sha, self.calls = store, sha, 0

    def referenced_blobs(self) -> set[str]:
        self.calls += 1
        found: set[str] = self.store.referenced_blobs()
        return found | {self.sha} if self.calls > 1 else found


def test_a_blob_named_while_gc_runs_is_put_back(tmp_path: Path) -> None:
    rec = recorder.recorder_for(Settings.from_env())
    sha = rec.blobs.put_bytes(b"named meanwhile")
    gone = rec.blobs.put_bytes(b"nobody")
    make_old(rec.blobs, sha)
    make_old(rec.blobs, gone)
    store = NamedMeanwhile(rec.store, sha)
    removed, _ = gc.collect(store, rec.blobs, tmp_path, min_age_s=3600)
    assert removed == [gone] and store.calls == 2
    assert rec.blobs.read(sha) == b"named meanwhile"
    assert not list(rec.blobs.root.glob("??/.gc-*"))


def test_temporary_files_of_killed_writers_are_removed_after_the_age_guard(
    tmp_path: Path,
) -> None:
    rec = recorder.recorder_for(Settings.from_env())
    kept = rec.blobs.put_bytes(b"kept")
    stale = rec.blobs.path(kept).with_name(".tmp-killed-upload")
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (OLD, OLD))
    young = rec.blobs.path(kept).with_name(".tmp-in-progress")
    young.write_bytes(b"x")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    out = tmp_path / "run.kiln"
    for token, pid in (("deadbeefdeadbeef", int(dead.stdout)), ("0123456789abcdef", os.getpid())):
        export_tmp = out.with_name(f".{out.name}.{token}.tmp")
        export_tmp.write_bytes(b"partial bundle")
        note = rec.blobs.root / PENDING / token
        note.parent.mkdir(exist_ok=True)
        note.write_text(json.dumps({"path": str(export_tmp), "pid": pid,
                                    "host": os.uname().nodename}))  # fmt: skip
    gc_json()
    assert not stale.exists() and young.exists() and rec.blobs.exists(kept)
    assert not out.with_name(f".{out.name}.deadbeefdeadbeef.tmp").exists()
    assert out.with_name(f".{out.name}.0123456789abcdef.tmp").exists()  # its writer lives
    assert sorted(p.name for p in (rec.blobs.root / PENDING).iterdir()) == ["0123456789abcdef"]


def test_an_export_leaves_no_temporary_file_or_note(tmp_path: Path) -> None:
    app = kiln.App("gc")
    with app.run() as run:
        kiln.save("w", b"w")
    recorder.close_all()
    out = tmp_path / "bundles" / "run.kiln"
    out.parent.mkdir()
    assert CliRunner().invoke(cli, ["export", run.id, "-o", str(out)]).exit_code == 0
    assert [p.name for p in out.parent.iterdir()] == ["run.kiln"]
    blobs = recorder.recorder_for(Settings.from_env()).blobs
    assert list((blobs.root / PENDING).iterdir()) == []


@pytest.mark.parametrize("kill_after", [1, 7, 19])
def test_a_gc_killed_midway_loses_nothing_and_the_next_one_finishes(kill_after: int) -> None:
    app = kiln.App("gc")
    with app.run() as run:
        for i in range(5):
            kiln.save(f"w{i}", f"referenced {i}".encode())
    rec = recorder.recorder_for(Settings.from_env())
    rec.flush(seal=True)
    referenced = {a.sha256 for a in kiln.get_run(run.id).artifacts}
    orphans = {rec.blobs.put_bytes(f"orphan {i}".encode()) for i in range(25)}
    for sha in referenced | orphans:
        make_old(rec.blobs, sha)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, killed as it moves a blob aside
        moved = 0
        move = gc._move_aside

        def move_then_die(path: Path) -> Path | None:
            nonlocal moved
            moved += 1
            if moved == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return move(path)

        gc._move_aside = move_then_die  # type: ignore[assignment]
        try:
            gc.collect(rec.store, rec.blobs, Path(os.environ["KILN_HOME"]), min_age_s=3600)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert all(rec.blobs.exists(sha) for sha in referenced)
    assert set(gc_json()["removed"]) | {s for s in orphans if not rec.blobs.exists(s)} == orphans
    assert not any(rec.blobs.exists(s) for s in orphans)
    assert all(rec.blobs.exists(sha) for sha in referenced)
    assert not list(rec.blobs.root.glob("??/.gc-*"))
    assert CliRunner().invoke(cli, ["audit", "verify"]).exit_code == 0
