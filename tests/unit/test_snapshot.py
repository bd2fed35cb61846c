"""Code snapshots recreate the working tree exactly: commit + patch (untracked files included)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kiln._hashing import sha256_file
from kiln.record import snapshot
from kiln.record.blobs import FileBlobStore
from kiln.record.snapshot import UNTRACKED_FILE_LIMIT, CodeCapture


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "train.py").write_text("print('v1')\n")
    (root / "lib").mkdir()
    (root / "lib" / "util.py").write_text("X = 1\n")
    (root / ".gitignore").write_text("*.log\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "first")
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(root).parts
    }


def test_clean_tree_records_commit_and_branch_only(repo: Path, tmp_path: Path) -> None:
    snap = CodeCapture(FileBlobStore(tmp_path / "blobs")).capture(repo / "train.py")
    assert snap.commit == git(repo, "rev-parse", "HEAD").strip()
    assert snap.branch == "main" and not snap.dirty and snap.patch_sha256 is None
    assert snap.source_sha256 == sha256_file(repo / "train.py")[0]
    assert snap.repo_root == str(repo)


def test_patch_recreates_tracked_and_untracked_changes(repo: Path, tmp_path: Path) -> None:
    (repo / "train.py").write_text("print('version 2')\n")  # size changes: see git's racy-clean
    (repo / "lib" / "util.py").unlink()
    (repo / "new_module.py").write_text("Y = 2\n")
    (repo / "assets").mkdir()
    (repo / "assets" / "blob.bin").write_bytes(bytes(range(256)))
    (repo / "run.log").write_text("ignored\n")
    (repo / "big.dat").write_bytes(b"0" * (UNTRACKED_FILE_LIMIT + 1))
    index_before = (repo / ".git" / "index").read_bytes()

    blobs = FileBlobStore(tmp_path / "blobs")
    snap = CodeCapture(blobs).capture(repo / "train.py")
    assert snap.dirty and snap.patch_sha256 is not None
    assert snap.untracked_skipped == ("assets/blob.bin", "big.dat")
    blob_sha = sha256_file(repo / "assets" / "blob.bin")[0]
    assert snap.left_out[0] == f"assets/blob.bin: binary; 256 bytes, sha256 {blob_sha}"
    assert snap.left_out[1].startswith("big.dat: larger than the 1 MiB limit per file;")
    assert (repo / ".git" / "index").read_bytes() == index_before, "user's index was touched"

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    git(clone, "checkout", "-q", snap.commit or "")
    patch = tmp_path / "p.diff"
    patch.write_bytes(blobs.read(snap.patch_sha256))
    git(clone, "apply", "--binary", str(patch))
    left_out = ("run.log", "big.dat", "assets/blob.bin")
    expected = {k: v for k, v in tree(repo).items() if k not in left_out}
    assert tree(clone) == expected


def test_unchanged_tree_reuses_the_stored_patch(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshot, "SNAPSHOT_TTL_S", 0.0)  # every capture looks at git
    (repo / "train.py").write_text("print('version 2')\n")
    capture = CodeCapture(FileBlobStore(tmp_path / "blobs"))
    first = capture.capture(repo / "train.py")
    assert capture.capture(repo / "train.py").patch_sha256 == first.patch_sha256
    (repo / "train.py").write_text("print('v3')\n")
    assert capture.capture(repo / "train.py").patch_sha256 != first.patch_sha256


def test_runs_in_quick_succession_share_a_snapshot(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    capture = CodeCapture(FileBlobStore(tmp_path / "blobs"))
    first = capture.capture(repo / "train.py")
    (repo / "train.py").write_text("print('edited at once')\n")
    assert capture.capture(repo / "train.py") is first  # within SNAPSHOT_TTL_S
    monkeypatch.setattr(snapshot, "SNAPSHOT_TTL_S", 0.0)
    assert capture.capture(repo / "train.py").dirty


def test_a_repo_without_commits_patches_against_the_empty_tree(tmp_path: Path) -> None:
    root = tmp_path / "fresh"
    root.mkdir()
    git(root, "init", "-q")
    (root / "a.py").write_text("A = 1\n")
    blobs = FileBlobStore(tmp_path / "blobs")
    snap = CodeCapture(blobs).capture(root / "a.py")
    assert snap.commit is None and snap.dirty
    assert b"+A = 1" in blobs.read(snap.patch_sha256 or "")
    assert blobs.read(snap.source_blob or "") == b"A = 1\n"  # and keeps the module source


def test_without_git_the_module_source_itself_is_stored(tmp_path: Path) -> None:
    module = tmp_path / "plain" / "script.py"
    module.parent.mkdir()
    module.write_text("print('hi')\n")
    blobs = FileBlobStore(tmp_path / "blobs")
    snap = CodeCapture(blobs).capture(module)
    assert snap.commit is None and snap.repo_root is None
    assert blobs.read(snap.source_blob or "") == b"print('hi')\n"
    assert snap.source_sha256 == snap.source_blob


def test_a_broken_repo_is_reported_and_the_source_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "broken"
    root.mkdir()
    (root / ".git").write_text("gitdir: /nonexistent/worktree\n")
    (root / "m.py").write_text("Z = 3\n")
    blobs = FileBlobStore(tmp_path / "blobs")
    snap = CodeCapture(blobs).capture(root / "m.py")
    assert snap.repo_root == str(root) and snap.commit is None
    assert blobs.read(snap.source_blob or "") == b"Z = 3\n"
    assert "git could not snapshot" in caplog.text


def test_kilns_own_folders_are_never_code(repo: Path, tmp_path: Path) -> None:
    # A store the repository does not ignore: the default .kiln, a nested one, and a
    # KILN_HOME of another name (passed as excluded, as the recorder does).
    for home in (repo / ".kiln", repo / "lib" / ".kiln", repo / "records"):
        (home / "blobs").mkdir(parents=True)
        (home / "kiln.db").write_bytes(b"SQLite format 3\0" + b"x" * 4096)
        (home / "blobs" / "ab").write_text("a blob\n")
    blobs = FileBlobStore(tmp_path / "blobs")
    capture = CodeCapture(blobs, exclude=(repo / "records",))
    snap = capture.capture(repo / "train.py")
    assert not snap.dirty and snap.patch_sha256 is None and snap.left_out == ()

    (repo / "train.py").write_text("print('version 2')\n")
    (repo / "notes.md").write_text("a note\n")
    edited = CodeCapture(blobs, exclude=(repo / "records",)).capture(repo / "train.py")
    patch = blobs.read(edited.patch_sha256 or "")
    assert b"notes.md" in patch and b"train.py" in patch
    assert b"kiln.db" not in patch and b"a blob" not in patch


def test_untracked_files_past_the_total_limit_are_left_out(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshot, "UNTRACKED_TOTAL_LIMIT", 100)
    (repo / "a.txt").write_text("a" * 60)
    (repo / "b.txt").write_text("b" * 60)
    blobs = FileBlobStore(tmp_path / "blobs")
    snap = CodeCapture(blobs).capture(repo / "train.py")
    assert snap.untracked_skipped == ("b.txt",)
    assert "past the" in snap.left_out[0] and "limit for all untracked files" in snap.left_out[0]
    assert b"a" * 60 in blobs.read(snap.patch_sha256 or "")


def test_a_link_to_a_device_and_a_crowd_of_binaries_stay_bounded(tmp_path: Path) -> None:
    import os
    import subprocess

    from kiln.record.snapshot import NOTES_LIMIT, _select_untracked

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    os.symlink("/dev/zero", tmp_path / "zero")  # followed, hashing it would never end
    os.mkfifo(tmp_path / "pipe")
    names = [f"img{i}.bin" for i in range(NOTES_LIMIT + 20)]
    for name in names:
        (tmp_path / name).write_bytes(b"\0\1")
    from kiln.record.snapshot import _content_stamp

    assert _content_stamp(tmp_path / "zero") == "link:/dev/zero"
    assert _content_stamp(tmp_path / "pipe").startswith("special:")
    included, skipped, notes = _select_untracked(tmp_path, ["zero", "pipe", *names])
    assert included == ["zero"]
    assert "pipe" in skipped and len(skipped) == len(names) + 1
    assert "pipe: not a regular file" in notes[0]
    assert len(notes) == NOTES_LIMIT + 1 and notes[-1] == "... and 21 more untracked files left out"
