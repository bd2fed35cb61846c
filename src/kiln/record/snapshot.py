"""What a run executed: its code (git state and module source) and its environment.

The code snapshot is exact: ``git apply`` of the stored patch on top of the stored
commit recreates the working tree, untracked files included, except Kiln's own
folders (``KILN_HOME``, ``KILN_CACHE`` and any ``.kiln`` inside the tree: they are
records, not code) and untracked files that are binary, over a size limit per file
or past a total: those are named in ``CodeSnapshot.untracked_skipped`` and described
(size and sha256) in ``CodeSnapshot.left_out``. The module's source is always stored
too, so a run in a repository with no commits (or one that is gone) can still be
re-run from it.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kiln._hashing import sha256_file
from kiln.record.model import CodeSnapshot, EnvSnapshot
from kiln.record.store.base import BlobStore

UNTRACKED_FILE_LIMIT = 1 << 20  # bytes; larger untracked files are data, not code
SNAPSHOT_TTL_S = 2.0  # runs started within this long of each other share a snapshot
UNTRACKED_TOTAL_LIMIT = 16 << 20  # bytes of untracked files in one patch, all together
HASH_LIMIT = 256 << 20  # a left-out file larger than this is described by its size alone
NOTES_LIMIT = 100  # notes kept on what was left out; past it, one line counts the rest
_BINARY_SNIFF_BYTES = 8000  # git's test: a NUL byte in the first 8000 bytes means binary
_EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
_GIT_TIMEOUT_S = 30
_log = logging.getLogger("kiln")


def find_repo_root(start: Path) -> Path | None:
    """The nearest directory at or above ``start`` holding ``.git`` (a dir or a file)."""
    for directory in (start, *start.parents):
        if (directory / ".git").exists():
            return directory
    return None


@dataclass
class _GitState:
    commit: str | None
    branch: str | None
    changed: list[str] = field(default_factory=list)
    untracked: list[str] = field(default_factory=list)
    status_text: str = ""


# A patch's blob (None: nothing to patch), the untracked files it leaves out, a note on each.
_Patch = tuple[str | None, tuple[str, ...], tuple[str, ...]]


class CodeCapture:
    """Takes code snapshots, reusing the last patch while the working tree is unchanged."""

    def __init__(self, blobs: BlobStore, *, exclude: Sequence[Path] = ()) -> None:
        """``exclude``: folders that are never code wherever they are (Kiln's home and
        cache); any folder named ``.kiln`` is left out as well."""
        self._blobs = blobs
        self._exclude = tuple(path.absolute() for path in exclude)
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, ...], _Patch] = {}
        self._git = shutil.which("git")
        self._recent: dict[str, tuple[float, CodeSnapshot]] = {}

    def capture(self, module_path: Path | None) -> CodeSnapshot:
        """The code as it is now, or as it was at most SNAPSHOT_TTL_S ago: a loop of
        runs pays for git once every two seconds, not once a run."""
        key = str(module_path)
        now = time.monotonic()
        with self._lock:
            recent = self._recent.get(key)
        if recent is not None and now - recent[0] < SNAPSHOT_TTL_S:
            return recent[1]
        snapshot = self._capture(module_path)
        with self._lock:
            self._recent[key] = (now, snapshot)
        return snapshot

    def _capture(self, module_path: Path | None) -> CodeSnapshot:
        module = str(module_path) if module_path else None
        source_sha = None
        if module_path is not None and module_path.is_file():
            source_sha, _ = sha256_file(module_path)

        # Kept with git too: without a commit (a fresh `git init`) or once the repository
        # is gone, the module source is what `kiln reproduce` can still run.
        blob = self._blobs.put_file(module_path)[0] if module_path and source_sha else None

        def source_only(root: Path | None) -> CodeSnapshot:
            return CodeSnapshot(
                module_path=module,
                source_sha256=source_sha,
                source_blob=blob,
                repo_root=str(root) if root else None,
            )

        root = find_repo_root(module_path.parent if module_path else Path.cwd())
        if root is None or self._git is None:
            return source_only(None)
        try:
            state = self._status(root)
            patch_sha: str | None = None
            skipped: tuple[str, ...] = ()
            left_out: tuple[str, ...] = ()
            if state.changed or state.untracked:
                patch_sha, skipped, left_out = self._patch(root, state)
        except (subprocess.SubprocessError, OSError) as exc:
            _log.warning(
                "kiln: git could not snapshot %s (%s); storing the module source", root, exc
            )
            return source_only(root)
        return CodeSnapshot(
            module_path=module,
            source_sha256=source_sha,
            source_blob=blob,
            repo_root=str(root),
            commit=state.commit,
            branch=state.branch,
            dirty=bool(state.changed or state.untracked),
            patch_sha256=patch_sha,
            untracked_skipped=skipped,
            left_out=left_out,
        )

    def _pathspec(self, root: Path) -> tuple[str, ...]:
        """The whole tree but Kiln's own folders: a store inside the tree is records, not
        code, whether or not the repository ignores it (else every run's patch carries
        the database of the runs before it, and no run is ever clean)."""
        specs = ["--", ".", ":(exclude,glob)**/.kiln/**"]
        real_root = root.resolve()
        for path in self._exclude:
            try:
                rel = path.resolve().relative_to(real_root)
            except ValueError:
                continue  # outside the tree: nothing to leave out
            if rel.parts:
                specs.append(f":(exclude,literal){rel.as_posix()}")
        return tuple(specs)

    def _run_git(self, root: Path, *args: str, env: dict[str, str] | None = None) -> bytes:
        return subprocess.run(
            [self._git or "git", "-C", str(root), *args],
            capture_output=True,
            check=True,
            timeout=_GIT_TIMEOUT_S,
            env=env,
        ).stdout

    def _status(self, root: Path) -> _GitState:
        out = self._run_git(
            root,
            "--no-optional-locks",
            "status",
            "--porcelain=v2",
            "--branch",
            "-z",
            "--untracked-files=all",
            *self._pathspec(root),
        ).decode("utf-8", "surrogateescape")
        state = _GitState(commit=None, branch=None, status_text=out)
        entries = iter(out.split("\0"))
        for entry in entries:
            if entry.startswith("# branch.oid "):
                oid = entry.removeprefix("# branch.oid ")
                state.commit = None if oid == "(initial)" else oid
            elif entry.startswith("# branch.head "):
                head = entry.removeprefix("# branch.head ")
                state.branch = None if head == "(detached)" else head
            elif entry.startswith("? "):
                state.untracked.append(entry[2:])
            elif entry.startswith(("1 ", "u ")):
                state.changed.append(entry.split(" ", 8 if entry[0] == "1" else 10)[-1])
            elif entry.startswith("2 "):
                state.changed.append(entry.split(" ", 9)[-1])
                next(entries, None)  # a rename's second path: the original name
        return state

    def _patch(self, root: Path, state: _GitState) -> _Patch:
        """Store a binary patch of every change against HEAD, untracked files included
        (within limits); return it, the untracked files left out, and why each was."""
        # Keyed by content, not mtime: an edit within one filesystem timestamp tick
        # keeps the mtime and often the size.
        stamp = [state.status_text]
        for rel in (*state.changed, *state.untracked):
            try:
                stamp.append(_content_stamp(root / rel))
            except OSError:
                stamp.append("-")
        key = tuple(stamp)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        included, skipped, left_out = _select_untracked(root, state.untracked)
        # Untracked files enter the diff through a throwaway copy of the index marked
        # intent-to-add: nothing is written to the user's index or object store.
        with tempfile.TemporaryDirectory(prefix="kiln-index-") as tmp:
            env = dict(os.environ)
            git_index = self._run_git(root, "rev-parse", "--git-path", "index").decode().strip()
            index = Path(git_index) if Path(git_index).is_absolute() else root / git_index
            tmp_index = Path(tmp) / "index"
            if index.exists():
                shutil.copyfile(index, tmp_index)
            env["GIT_INDEX_FILE"] = str(tmp_index)
            if included:
                self._run_git(root, "add", "--intent-to-add", "--", *included, env=env)
            base = state.commit or _EMPTY_TREE
            patch = self._run_git(root, "diff", "--binary", base, *self._pathspec(root), env=env)
        result = (
            self._blobs.put_bytes(patch) if patch else None,
            tuple(skipped),
            tuple(left_out),
        )
        with self._lock:
            self._cache = {key: result}  # only the latest state is worth keeping
        return result


def _select_untracked(root: Path, untracked: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Which untracked files go into the patch; the others, and a note on each of those."""
    included: list[str] = []
    skipped: list[str] = []
    notes: list[str] = []
    total = 0
    for rel in untracked:
        path = root / rel
        try:
            st = path.lstat()
            why = _left_out_because(path, st, total)
            if why is not None:
                notes.append(_describe(path, rel, st.st_size, why))
        except OSError:
            continue  # gone since git listed it
        if why is None:
            included.append(rel)
            total += st.st_size
        else:
            skipped.append(rel)
    if len(notes) > NOTES_LIMIT:  # a data folder of 20,000 files: a count, not 20,000 notes
        more = len(notes) - NOTES_LIMIT
        notes[NOTES_LIMIT:] = [f"... and {more:,} more untracked files left out"]
    return included, skipped, notes


def _content_stamp(path: Path) -> str:
    """What identifies a changed file's content for the patch cache: its sha256 when it
    is a small regular file; a link's target; size and mtime otherwise. Never follows a
    link or reads a device (a link to /dev/zero would never end)."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return f"link:{path.readlink()}"
    if not stat.S_ISREG(st.st_mode):
        return f"special:{st.st_mode}"
    if st.st_size <= UNTRACKED_FILE_LIMIT:
        return sha256_file(path)[0]
    return f"{st.st_mtime_ns}:{st.st_size}"


def _left_out_because(path: Path, st: os.stat_result, total: int) -> str | None:
    """Why an untracked file stays out of the patch, or None if it goes in."""
    if stat.S_ISLNK(st.st_mode):
        return None  # a link is stored as its target's name: small, and code's business
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"  # a fifo, socket or device: reading it may never end
    if st.st_size > UNTRACKED_FILE_LIMIT:
        return f"larger than the {_mib(UNTRACKED_FILE_LIMIT)} limit per file"
    with path.open("rb") as f:
        if b"\0" in f.read(_BINARY_SNIFF_BYTES):
            return "binary"
    if total + st.st_size > UNTRACKED_TOTAL_LIMIT:
        return f"past the {_mib(UNTRACKED_TOTAL_LIMIT)} limit for all untracked files"
    return None


def _describe(path: Path, rel: str, size: int, why: str) -> str:
    regular = stat.S_ISREG(path.lstat().st_mode)
    digest = f"sha256 {sha256_file(path)[0]}" if regular and size <= HASH_LIMIT else "not hashed"
    return f"{rel}: {why}; {size:,} bytes, {digest}"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


_env_lock = threading.Lock()
_env_cache: dict[str, EnvSnapshot] = {}


def capture_environment(blobs: BlobStore) -> EnvSnapshot:
    """The interpreter and its installed distributions, computed once per process."""
    with _env_lock:
        key = _key_of(blobs)
        cached = _env_cache.get(key)
        if cached is not None:
            return cached
        import importlib.metadata

        packages = sorted(
            {
                f"{d.metadata['Name']}=={d.version}"
                for d in importlib.metadata.distributions()
                if d.metadata["Name"]
            },
            key=str.lower,
        )
        snapshot = EnvSnapshot(
            python=platform.python_version(),
            implementation=platform.python_implementation(),
            platform=platform.platform(),
            executable=sys.executable,
            packages_sha256=blobs.put_bytes(("\n".join(packages) + "\n").encode()),
            package_count=len(packages),
        )
        _env_cache[key] = snapshot
        return snapshot


def _key_of(blobs: BlobStore) -> str:
    """Which blob store this is: its kind and folder (a server's: its cache's)."""
    root = getattr(blobs, "root", None) or getattr(getattr(blobs, "cache", None), "root", None)
    return f"{type(blobs).__name__}:{root or id(blobs)}"
