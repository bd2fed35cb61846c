"""What a run executed: its code (git state and module source) and its environment.

The code snapshot is exact: ``git apply`` of the stored patch on top of the stored
commit recreates the working tree, untracked files included (up to a size limit,
past which they are named in ``CodeSnapshot.untracked_skipped`` instead).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kiln._hashing import sha256_file
from kiln.record.blobs import BlobStore
from kiln.record.model import CodeSnapshot, EnvSnapshot

UNTRACKED_FILE_LIMIT = 1 << 20  # bytes; larger untracked files are data, not code
SNAPSHOT_TTL_S = 2.0  # runs started within this long of each other share a snapshot
UNTRACKED_TOTAL_LIMIT = 16 << 20
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


class CodeCapture:
    """Takes code snapshots, reusing the last patch while the working tree is unchanged."""

    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, ...], tuple[str | None, tuple[str, ...]]] = {}
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

        def source_only(root: Path | None) -> CodeSnapshot:
            # Without git the module source itself is the record of the code.
            blob = self._blobs.put_file(module_path)[0] if module_path and source_sha else None
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
            if state.changed or state.untracked:
                patch_sha, skipped = self._patch(root, state)
        except (subprocess.SubprocessError, OSError) as exc:
            _log.warning(
                "kiln: git could not snapshot %s (%s); storing the module source", root, exc
            )
            return source_only(root)
        return CodeSnapshot(
            module_path=module,
            source_sha256=source_sha,
            repo_root=str(root),
            commit=state.commit,
            branch=state.branch,
            dirty=bool(state.changed or state.untracked),
            patch_sha256=patch_sha,
            untracked_skipped=skipped,
        )

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

    def _patch(self, root: Path, state: _GitState) -> tuple[str | None, tuple[str, ...]]:
        """Store a binary patch of every change against HEAD, untracked files included."""
        # Keyed by content, not mtime: an edit within one filesystem timestamp tick
        # keeps the mtime and often the size.
        stamp = [state.status_text]
        for rel in (*state.changed, *state.untracked):
            try:
                st = (root / rel).stat()
                small = st.st_size <= UNTRACKED_FILE_LIMIT
                stamp.append(
                    sha256_file(root / rel)[0] if small else f"{st.st_mtime_ns}:{st.st_size}"
                )
            except OSError:
                stamp.append("-")
        key = tuple(stamp)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        included, skipped, total = [], [], 0
        for rel in state.untracked:
            try:
                size = (root / rel).stat().st_size
            except OSError:
                continue
            if size > UNTRACKED_FILE_LIMIT or total + size > UNTRACKED_TOTAL_LIMIT:
                skipped.append(rel)
            else:
                included.append(rel)
                total += size
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
            patch = self._run_git(root, "diff", "--binary", base, env=env)
        result = (self._blobs.put_bytes(patch) if patch else None, tuple(skipped))
        with self._lock:
            self._cache = {key: result}  # only the latest state is worth keeping
        return result


_env_lock = threading.Lock()
_env_cache: dict[str, EnvSnapshot] = {}


def capture_environment(blobs: BlobStore) -> EnvSnapshot:
    """The interpreter and its installed distributions, computed once per process."""
    with _env_lock:
        cached = _env_cache.get(str(blobs.root))
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
        _env_cache[str(blobs.root)] = snapshot
        return snapshot
