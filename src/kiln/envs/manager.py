"""Resolve, lock, build and cache environments with uv.

Built envs live in the machine's cache (``KILN_CACHE``, see :mod:`kiln.config`), shared
by every ``KILN_HOME``: the same lock is resolved and built once per machine, whichever
project asks for it. Layout under ``KILN_CACHE/envs``::

    <env-id>/                 a virtual environment, built from its lock; ready when
                              .kiln-env.json exists (it is written last, then renamed in);
                              .kiln-last-used is touched by every use, from any home
    <env-id>.lock             file lock: builders hold it exclusively, workers shared
    declarations/<key>.json   declaration key -> env id, lock blob and the lock itself
                              (skips the resolver; needs no home's blob store)
    homes/<env-id>/<key>      one file per KILN_HOME that used the env: its path, and
                              its last use from there as the file's mtime
    _kiln/<key>/              links to kiln and the few packages its worker needs
    builds.log                one line per build

An env's identity is the sha256 of its normalized lock and the interpreter, so the
same packages on the same interpreter are one directory, however they were asked for.
Each home still keeps the lock as a blob of its own: its runs name it.

Pruning goes by the env's last use from any home, and never removes an env a worker
of any home on this machine holds (its shared file lock): one home's ``kiln envs
prune`` cannot pull an env from under another home's warm workers.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.config import cache_dir
from kiln.envs.spec import Env
from kiln.errors import EnvError, NotFoundError, ValidationError
from kiln.record.store.base import BlobStore

READY = ".kiln-env.json"
LAST_USED = ".kiln-last-used"
# Names the driver's overlay (its own kiln) to the env's workers: an env built by one
# project's kiln may be used by another project's, whose workers must run its kiln.
OVERLAY_VARIABLE = "KILN_ENV_OVERLAY"
# What a worker inside an env needs of Kiln's own dependencies; everything else the
# env must bring itself.
WORKER_DISTRIBUTIONS = (
    "cloudpickle",
    "SQLAlchemy",
    "alembic",
    "packaging",
    "psycopg",
    "psycopg-binary",
    "httpx",  # the client of a team server (KILN_SERVER), where installed
    # what a serving replica needs (kiln[serve]), where installed
    "pydantic",
    "opentelemetry-sdk",
    "openinference-semantic-conventions",
    "opentelemetry-exporter-otlp-proto-http",
)
_UV_TIMEOUT_S = 1800


@dataclass(frozen=True, slots=True)
class Materialized:
    """A built environment ready to run tasks."""

    env_id: str
    path: Path
    python: Path
    lock_sha256: str
    resolved: bool  # the resolver ran for this request
    built: bool  # the env was built for this request

    @property
    def lock_file(self) -> Path:
        return self.path.parent / f"{self.env_id}.lock"


@dataclass(frozen=True, slots=True)
class Locked:
    """An env as its lock alone, for an engine that builds it on each node (Ray)."""

    env_id: str
    lock_sha256: str
    requirements: str  # the lock's lines, and ``--index-url`` if the env names an index


@dataclass(frozen=True, slots=True)
class EnvInfo:
    """One cached environment, as ``kiln envs ls`` shows it."""

    env_id: str
    path: Path
    python: str
    packages: int
    size_bytes: int
    created_at: float
    last_used_at: float
    lock_sha256: str
    homes: tuple[str, ...] = ()  # the KILN_HOMEs that used it (those still there)

    def to_dict(self) -> dict[str, Any]:
        return {
            "env_id": self.env_id, "path": str(self.path), "python": self.python,
            "packages": self.packages, "size_bytes": self.size_bytes,
            "created_at": self.created_at, "last_used_at": self.last_used_at,
            "lock_sha256": self.lock_sha256, "homes": list(self.homes),
        }  # fmt: skip


class EnvManager:
    """Environments as one ``KILN_HOME`` sees them, built into the machine's shared cache."""

    def __init__(self, home: Path, blobs: BlobStore, cache: Path | None = None) -> None:
        """``cache``: ``KILN_CACHE``; None reads it (or its default) from the environment."""
        self.home = home
        self.root = (cache or cache_dir(os.environ)) / "envs"
        self.blobs = blobs
        import uv

        self.uv = uv.find_uv_bin()

    # -- ensure ------------------------------------------------------------------------

    def ensure(self, env: Env) -> Materialized:
        """The built environment for ``env``: cached, or resolved and built now."""
        interpreter, interpreter_id = self._interpreter(env.python)
        record, ran = self._declared(env, interpreter, interpreter_id, self._resolve_and_build)
        resolved, built = ran is not None, bool(ran)
        env_id, lock_sha = record["env_id"], record["lock_sha256"]
        path = self.root / env_id
        if not (path / READY).is_file():  # pruned since: rebuilt from its lock, no resolver
            built = self._build(
                env_id, lock_sha, interpreter_id, env.index, interpreter=interpreter
            )
        self._used(env_id)
        return Materialized(env_id, path, path / "bin" / "python", lock_sha, resolved, built)

    def lock(self, env: Env) -> Locked:
        """The env's identity and lock, resolved if need be, but not built here: for an
        engine that builds its own copy from the lock on each node (Ray's runtime_env)."""
        interpreter, interpreter_id = self._interpreter(env.python)
        record, _ = self._declared(env, interpreter, interpreter_id, self._resolve)
        requirements = self.blobs.read(record["lock_sha256"]).decode()
        if env.index:
            requirements += f"--index-url {env.index}\n"
        return Locked(record["env_id"], record["lock_sha256"], requirements)

    def from_lock(self, env_id: str, lock_sha: str, python: str | None = None) -> Materialized:
        """The env with this identity, rebuilt from its stored lock if it is gone
        (``kiln reproduce``): no resolver, so the same pins and hashes."""
        path = self.root / env_id
        built = False
        if not (path / READY).is_file():
            interpreter, interpreter_id = self._interpreter(python)
            built = self._build(env_id, lock_sha, interpreter_id, None, interpreter=interpreter)
        self._used(env_id)
        return Materialized(env_id, path, path / "bin" / "python", lock_sha, False, built)

    def from_requirements(self, requirements: str) -> Materialized:
        """The env of a lock handed over as :meth:`lock`'s requirements text (a pod of the
        Kubernetes engine), built here once from those exact pins and hashes."""
        lines = requirements.splitlines(keepends=True)
        index = next((ln.split(None, 1)[1].strip() for ln in lines
                      if ln.startswith("--index-url ")), None)  # fmt: skip
        lock = "".join(ln for ln in lines if not ln.startswith("--index-url "))
        lock_sha = self.blobs.put_bytes(lock.encode())
        interpreter, interpreter_id = self._interpreter(None)
        env_id, _ = self._identity(lock, interpreter_id)
        path = self.root / env_id
        built = False
        if not (path / READY).is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            built = self._build(env_id, lock_sha, interpreter_id, index, interpreter=interpreter)
        self._used(env_id)
        return Materialized(env_id, path, path / "bin" / "python", lock_sha, False, built)

    def _used(self, env_id: str) -> None:
        """Note a use: the env's last use (any home's), this home's reference to it, and
        the overlay this process's workers in it are to import kiln from."""
        (self.root / env_id / LAST_USED).touch()
        ref = self.root / "homes" / env_id / _home_key(self.home)
        if not ref.is_file():
            _write_atomically(ref, str(self.home))
        ref.touch()
        # Inherited by every worker this process starts (they copy its environment).
        os.environ[OVERLAY_VARIABLE] = str(self._kiln_overlay())

    def _declared(
        self, env: Env, interpreter: str, interpreter_id: str,
        resolve: Callable[[Env, Path, str, str], bool],
    ) -> tuple[dict[str, str], bool | None]:  # fmt: skip
        """The declaration's record (env id, lock blob), made by ``resolve`` if there is
        none yet, and what ``resolve`` returned (None: it did not run)."""
        declared = self.root / "declarations" / f"{env.declaration_key(interpreter_id)}.json"
        ran: bool | None = None
        if not declared.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            with _flock(self.root / f".declaration-{declared.stem[:16]}.lock", fcntl.LOCK_EX):
                if not declared.is_file():  # nobody resolved it while we waited
                    ran = resolve(env, declared, interpreter, interpreter_id)
        record: dict[str, str] = json.loads(declared.read_text())
        if "lock" in record and not self.blobs.exists(record["lock_sha256"]):
            self.blobs.put_bytes(record["lock"].encode())  # declared by another home
        return record, ran

    def _resolve(self, env: Env, declared: Path, interpreter: str, interpreter_id: str) -> bool:
        """Resolve the hashed lock and declare it; nothing is built."""
        with tempfile.TemporaryDirectory(prefix="kiln-resolve-") as work:
            lock = self._compile(env, interpreter, self._inputs(env, Path(work)))
        env_id, lock_sha = self._identity(lock, interpreter_id)
        _declare(declared, env_id, lock_sha, lock)
        return False

    def _identity(self, lock: str, interpreter_id: str) -> tuple[str, str]:
        """An env's id (its lock and interpreter) and its lock, stored as a blob."""
        env_id = hashlib.sha256(f"{lock}\n{interpreter_id}".encode()).hexdigest()
        return env_id, self.blobs.put_bytes(lock.encode())

    def _resolve_and_build(
        self, env: Env, declared: Path, interpreter: str, interpreter_id: str
    ) -> bool:
        """Resolve the hashed lock while the empty venv is created beside it, then sync
        the venv to the lock (from uv's cache, which the resolver has just filled)."""
        prepared = self.root / f".tmp-{declared.stem[:16]}-{secrets.token_hex(4)}"
        with tempfile.TemporaryDirectory(prefix="kiln-resolve-") as work:
            inputs = self._inputs(env, Path(work))
            with ThreadPoolExecutor(2, thread_name_prefix="kiln-env") as pool:
                lock_job = pool.submit(self._compile, env, interpreter, inputs)
                venv_job = pool.submit(self._venv, prepared, interpreter, env, inputs)
                try:
                    lock = lock_job.result()
                except BaseException:
                    venv_job.exception()  # wait for it, then throw it away
                    shutil.rmtree(prepared, ignore_errors=True)
                    raise
                speculative = venv_job.exception() is None
        if not speculative:
            shutil.rmtree(prepared, ignore_errors=True)
        env_id, lock_sha = self._identity(lock, interpreter_id)
        built = self._build(
            env_id,
            lock_sha,
            interpreter_id,
            env.index,
            prepared=prepared if speculative else None,
            interpreter=interpreter,
        )
        _declare(declared, env_id, lock_sha, lock)
        return built

    def _interpreter(self, python: str | None) -> tuple[str, str]:
        """The interpreter's path and an identity that names its version and platform."""
        if python is None:
            exe = sys.executable
        else:
            found = self._uv("python", "find", python, what=f"find Python {python}")
            exe = found.strip().splitlines()[-1]
        return exe, _interpreter_id(exe)

    def _inputs(self, env: Env, work: Path) -> list[str]:
        """The declaration as files uv reads: requirements, a pyproject, an exported uv.lock."""
        inputs = []
        if env.packages:
            source = work / "requirements.in"
            source.write_text("\n".join(env.packages) + "\n")
            inputs.append(str(source))
        if env.requirements is not None:
            if env.requirements.name == "uv.lock":
                exported = work / "uv-lock.txt"
                exported.write_text(
                    self._uv(
                        "export",
                        "--frozen",
                        "--format",
                        "requirements-txt",
                        "--no-emit-project",
                        "--no-header",
                        "--no-hashes",
                        "--directory",
                        str(env.requirements.parent),
                        what=f"read {env.requirements}",
                    )
                )
                inputs.append(str(exported))
            else:
                inputs.append(str(env.requirements))
        return inputs

    def _compile(self, env: Env, interpreter: str, inputs: list[str]) -> str:
        args = ["pip", "compile", "--generate-hashes", "--no-header", "--no-annotate",
                "--python", interpreter, "--quiet", *inputs]  # fmt: skip
        if env.index:
            args += ["--index-url", env.index]
        return _normalize_lock(self._uv(*args, what="resolve the environment"))

    def _venv(
        self, venv: Path, interpreter: str, env: Env | None = None, inputs: Sequence[str] = ()
    ) -> None:
        """Create an empty venv; with ``inputs``, also install them from uv's cache alone.

        That runs beside the resolver and needs no network: whatever it manages to
        install, the sync to the lock that follows makes exact.
        """
        self._uv("venv", "--relocatable", "--quiet", "--python", interpreter, str(venv),
                 what="create the environment")  # fmt: skip
        if not inputs or env is None or env.index:
            return
        args = ["pip", "install", "--offline", "--quiet", "--python", str(venv / "bin" / "python")]
        for source in inputs:
            args += ["-r", source]
        with contextlib.suppress(EnvError):  # not all in the cache: the sync will fetch it
            self._uv(*args, what="prefill the environment")

    def _build(
        self,
        env_id: str,
        lock_sha: str,
        interpreter_id: str,
        index: str | None,
        *,
        interpreter: str,
        prepared: Path | None = None,
    ) -> bool:
        """Make ``root/env_id`` from its lock, atomically: built aside, renamed in last."""
        lock = self.blobs.read(lock_sha).decode()
        target = self.root / env_id
        with _flock(self.root / f"{env_id}.lock", fcntl.LOCK_EX):
            if (target / READY).is_file():  # another process built it while we waited
                if prepared is not None:
                    shutil.rmtree(prepared, ignore_errors=True)
                return False
            tmp = prepared or self.root / f".tmp-{env_id[:16]}-{secrets.token_hex(4)}"
            try:
                if prepared is None:
                    self._venv(tmp, interpreter)
                (tmp / "kiln.lock").write_text(lock)
                # Compiled once here, so that no worker or replica compiles at import.
                python = str(tmp / "bin" / "python")
                args = ["pip", "sync", "--require-hashes", "--quiet", "--compile-bytecode",
                        "--python", python, str(tmp / "kiln.lock")]  # fmt: skip
                if index:
                    args += ["--index-url", index]
                try:  # the resolver has just fetched what the lock names: try uv's cache first
                    self._uv(*args, "--offline", what="install the environment")
                except EnvError:
                    self._uv(*args, what="install the environment")
                site = _site_packages(tmp)
                (site / "_kiln.pth").write_text(_overlay_pth(self._kiln_overlay()))
                (tmp / READY).write_text(json.dumps({
                    "env_id": env_id, "lock_sha256": lock_sha, "interpreter": interpreter_id,
                    "created_at": time.time(), "built_by_pid": os.getpid(),
                }))  # fmt: skip
                if target.exists():  # a leftover of a crashed build: never marked ready
                    shutil.rmtree(target)
                tmp.rename(target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            with (self.root / "builds.log").open("a") as log:
                log.write(f"{time.time():.3f} {env_id} pid={os.getpid()}\n")
        return True

    def _kiln_overlay(self) -> Path:
        """A directory of links to kiln and the packages its worker imports, appended to
        the env's path after its own site-packages, so the env's versions win."""
        roots, key = _overlay_roots()
        overlay = self.root / "_kiln" / key
        if not overlay.is_dir():
            tmp = overlay.with_name(f".tmp-{key}-{secrets.token_hex(4)}")
            tmp.mkdir(parents=True)
            for name, path in roots.items():
                (tmp / name).symlink_to(path)
            with contextlib.suppress(OSError):  # another process made it first
                tmp.rename(overlay)
            shutil.rmtree(tmp, ignore_errors=True)
        return overlay

    def _uv(self, *args: str, what: str) -> str:
        proc = subprocess.run(
            [self.uv, *args],
            capture_output=True,
            text=True,
            timeout=_UV_TIMEOUT_S,
            env={**os.environ, "VIRTUAL_ENV": ""},
        )
        if proc.returncode != 0:
            raise EnvError(f"environment: could not {what}", proc.stderr or proc.stdout)
        return proc.stdout

    # -- inventory -----------------------------------------------------------------------

    def installed(self) -> list[EnvInfo]:
        if not self.root.is_dir():
            return []
        infos = []
        for path in sorted(self.root.iterdir()):
            if (path / READY).is_file():
                infos.append(self._info(path))
        return sorted(infos, key=lambda i: i.last_used_at, reverse=True)

    def get(self, prefix: str) -> EnvInfo:
        matches = [i for i in self.installed() if i.env_id.startswith(prefix.lower())]
        if not prefix or not matches:
            raise NotFoundError(f"no environment {prefix!r}; `kiln envs ls` lists them")
        if len(matches) > 1:
            raise ValidationError(
                "HASH", f"{prefix!r} matches {len(matches)} environments; give more"
            )
        return matches[0]

    def lock_text(self, info: EnvInfo) -> str:
        return (info.path / "kiln.lock").read_text()

    def prune(self, older_than_s: float, in_use: set[str], *, dry_run: bool = False) -> list[str]:
        """Remove envs unused for ``older_than_s``; never one in ``in_use`` or held by a worker."""
        removed = []
        cutoff = time.time() - older_than_s
        for info in self.installed():
            if info.last_used_at > cutoff or info.env_id in in_use:
                continue
            lock_path = self.root / f"{info.env_id}.lock"
            with lock_path.open("a") as lock:
                try:  # workers hold a shared lock on their env for as long as they live
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                if not dry_run:
                    doomed = self.root / f".trash-{info.env_id[:16]}-{secrets.token_hex(4)}"
                    info.path.rename(doomed)  # gone for readers at once, then deleted
                    shutil.rmtree(doomed, ignore_errors=True)
                    shutil.rmtree(self.root / "homes" / info.env_id, ignore_errors=True)
                fcntl.flock(lock, fcntl.LOCK_UN)
            removed.append(info.env_id)
        return removed

    def _info(self, path: Path) -> EnvInfo:
        meta = json.loads((path / READY).read_text())
        lock = path / "kiln.lock"
        packages = sum(1 for line in lock.read_text().splitlines() if "==" in line)
        last_used = path / LAST_USED
        return EnvInfo(
            env_id=path.name,
            path=path,
            python=meta.get("interpreter", ""),
            packages=packages,
            size_bytes=sum(p.lstat().st_size for p in path.rglob("*")),
            created_at=meta.get("created_at", 0.0),
            last_used_at=last_used.stat().st_mtime if last_used.exists() else meta["created_at"],
            lock_sha256=meta.get("lock_sha256", ""),
            homes=self._homes(path.name),
        )

    def _homes(self, env_id: str) -> tuple[str, ...]:
        """The homes that used an env and are still there, most recent use first."""
        refs = self.root / "homes" / env_id
        found = []
        for ref in refs.iterdir() if refs.is_dir() else ():
            with contextlib.suppress(OSError):
                home = ref.read_text()
                if Path(home).is_dir():
                    found.append((ref.stat().st_mtime, home))
        return tuple(home for _, home in sorted(found, reverse=True))


def _normalize_lock(text: str) -> str:
    """The lock without comments or blank lines: the same resolution, the same bytes."""
    lines = [line.rstrip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line and not line.lstrip().startswith("#")) + "\n"


_interpreter_ids: dict[str, str] = {}


def _interpreter_id(exe: str) -> str:
    if exe not in _interpreter_ids:
        if exe == sys.executable:
            import platform

            impl, version = platform.python_implementation(), platform.python_version()
            out = f"{impl}-{version}-{sys.platform}-{platform.machine()}"
        else:
            code = (
                "import platform, sys; print(f'{platform.python_implementation()}-"
                "{platform.python_version()}-{sys.platform}-{platform.machine()}')"
            )
            out = subprocess.run(
                [exe, "-c", code], capture_output=True, text=True, check=True
            ).stdout.strip()
        _interpreter_ids[exe] = out
    return _interpreter_ids[exe]


def _site_packages(venv: Path) -> Path:
    found = list(venv.glob("lib/python*/site-packages"))
    if len(found) == 1:
        return found[0]
    python = venv / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(
        subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
    )


@functools.cache
def _overlay_roots() -> tuple[dict[str, Path], str]:
    """What the overlay links to, and a key naming that set (computed once per process)."""
    roots: dict[str, Path] = {"kiln": Path(__file__).resolve().parent.parent}
    for dist in _closure(WORKER_DISTRIBUTIONS):
        for name, path in _import_roots(dist).items():
            roots.setdefault(name, path)
    listing = json.dumps(sorted((n, str(p)) for n, p in roots.items()))
    return roots, hashlib.sha256(listing.encode()).hexdigest()[:16]


def _closure(names: tuple[str, ...]) -> list[importlib.metadata.Distribution]:
    """The installed distributions among ``names`` and everything they require."""
    from packaging.requirements import Requirement

    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen[key] = dist
        for text in dist.requires or ():
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def _import_roots(dist: importlib.metadata.Distribution) -> dict[str, Path]:
    """Top-level modules and packages a distribution installed, by name."""
    roots: dict[str, Path] = {}
    for file in dist.files or ():
        parts = file.parts
        if not parts or parts[0].endswith((".dist-info", ".egg-info", ".pth")) or parts[0] == "..":
            continue
        if parts[0] == "__pycache__" or parts[0].endswith(".data"):
            continue
        located = Path(str(dist.locate_file(parts[0])))
        if located.exists():  # linked under its own name: a module keeps its suffix
            roots.setdefault(parts[0], located)
    return roots


def _declare(declared: Path, env_id: str, lock_sha: str, lock: str) -> None:
    """Write a declaration; the lock goes in too, so any home can rebuild the env."""
    record = {"env_id": env_id, "lock_sha256": lock_sha, "lock": lock}
    _write_atomically(declared, json.dumps(record))


def _home_key(home: Path) -> str:
    return hashlib.sha256(str(home).encode()).hexdigest()[:16]


def _overlay_pth(builder_overlay: Path) -> str:
    """The env's ``_kiln.pth``: the overlay of the kiln that starts the worker (named by
    its environment), else that of the kiln that built the env."""
    return (
        f"import os, sys; p = os.environ.get({OVERLAY_VARIABLE!r}) or {str(builder_overlay)!r}; "
        "p in sys.path or sys.path.append(p)\n"
    )


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_text(text)
    tmp.replace(path)


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_managers: dict[str, EnvManager] = {}


def env_manager(home: Path, blobs: BlobStore, cache: Path | None = None) -> EnvManager:
    """The process's manager for this ``KILN_HOME`` and env cache (``KILN_CACHE``; None:
    as the environment says now)."""
    cache = cache or cache_dir(os.environ)
    key = f"{home}\0{cache}"
    if key not in _managers:
        _managers[key] = EnvManager(home, blobs, cache)
    return _managers[key]
