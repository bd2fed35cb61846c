"""Typed settings, read from the environment once per call to :meth:`Settings.from_env`.

| variable      | default                          | meaning                                  |
|---------------|----------------------------------|------------------------------------------|
| KILN_HOME     | the nearest .kiln (see below)    | embedded store and blobs                 |
| KILN_STORE    | sqlite:///$KILN_HOME/kiln.db     | metadata store URL (SQLite or PostgreSQL)|
| KILN_BACKEND  | local                            | engine: local, ray, kubernetes           |
| KILN_ACTOR    | the OS user                      | who is recorded as running things        |
| KILN_RAY_ADDRESS | this machine's Ray            | the Ray cluster of KILN_BACKEND=ray      |
| KILN_RAY_SHARED_HOME | nodes on this machine only | 1: every Ray node sees KILN_HOME (shared |
|               |                                  | disk); 0: none does, artifacts travel back |
| KILN_CACHE    | $XDG_CACHE_HOME/kiln or          | built envs, shared by every KILN_HOME on |
|               | ~/.cache/kiln                    | the machine: one lock is built once      |
| KILN_CEILING_DIRECTORIES | none                  | folders (separated by ``:``) the search  |
|               |                                  | for .kiln and .git does not go above     |
| KILN_SERVER   | unset                            | a team server's URL: the record is there;|
|               |                                  | KILN_HOME keeps a blob cache and a spool |
| KILN_POOL     | unset                            | the team server's pool this engine runs  |
|               |                                  | on: runs start once the server admits    |
|               |                                  | them to the project's queue there        |
| KILN_METRICS_PORT | unset                        | serve the engine's figures (Prometheus)  |
|               |                                  | at http://HOST:PORT/metrics once it starts|
| KILN_METRICS_HOST | 127.0.0.1                    | the address they are served on (0.0.0.0: |
|               |                                  | every interface, e.g. in a container)    |
| KILN_SANDBOX  | 0                                | 1: every function runs sandboxed (see    |
|               |                                  | kiln.Sandbox), as an agent's always do   |
| KILN_K8S_*    | see kiln.compute.kube            | the Kubernetes engine's namespace, image,|
|               |                                  | token Secret, Kueue queue, GPU sharing   |

Without ``KILN_HOME``, Kiln finds its home the way git finds ``.git``: the nearest
existing ``.kiln`` folder at or above the current directory; if there is none, the
``.kiln`` at the root of the git work tree the current directory is in; outside a
work tree, ``./.kiln``. :attr:`Settings.home_origin` says which, for error messages.
Like ``GIT_CEILING_DIRECTORIES``, ``KILN_CEILING_DIRECTORIES`` stops the search
below each folder it names (a shared ``/home`` or a network mount that must not be
looked into, or a ``.kiln`` above a project that is not its own).
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast, get_args

from kiln.errors import ConfigError

Backend = Literal["local", "ray", "kubernetes"]
_BACKENDS: tuple[str, ...] = get_args(Backend)
DEFAULT_PROJECT = "default"  # the project of a store without a server, and of old records
_PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_STORE_SCHEMES = ("sqlite", "postgresql")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}|[0-9A-Fa-f:.]{2,45}")  # a name, IPv4 or IPv6


@dataclass(frozen=True, slots=True)
class Settings:
    """Where Kiln keeps its records and who it records as acting."""

    home: Path
    store_url: str
    backend: Backend = "local"
    actor: str = "unknown"
    ray_address: str | None = None  # KILN_RAY_ADDRESS; unset: this machine's Ray
    ray_shared_home: bool | None = None  # KILN_RAY_SHARED_HOME; None: nodes on this machine
    cache: Path = field(default_factory=lambda: cache_dir(os.environ))  # KILN_CACHE
    home_origin: str = ""  # how ``home`` was found, for "not found" messages
    server_url: str | None = None  # KILN_SERVER: the record is a team server's, over HTTP
    # KILN_PROJECT: the tenant whose records these are; unset: the token's project on a
    # server, DEFAULT_PROJECT in a store of one's own
    project: str | None = None
    metrics_port: int | None = None  # KILN_METRICS_PORT: the engine's figures served there
    metrics_host: str = "127.0.0.1"  # KILN_METRICS_HOST: on this address (loopback)
    pool: str | None = None  # KILN_POOL: admission to this pool of the team server
    # The server's token handed to a task on a node that does not inherit the driver's
    # environment (Ray); None: KILN_TOKEN, else `kiln login`'s (see server_token).
    token: str | None = field(default=None, repr=False)
    sandbox: bool = False  # KILN_SANDBOX=1: every function runs sandboxed

    @property
    def blob_dir(self) -> Path:
        """Content-addressed blobs live here, whatever the metadata store is."""
        return self.home / "blobs"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the ``KILN_*`` variables; raise :class:`ConfigError` naming a bad one."""
        env = os.environ if environ is None else environ
        if env.get("KILN_HOME"):
            home = Path(env["KILN_HOME"]).expanduser().absolute()
            origin = f"KILN_HOME is set to {home}"
            for path in (home, *home.parents):
                if path.exists() and not path.is_dir():
                    raise ConfigError(
                        "KILN_HOME", f"{path} is a file; set it to a folder (made if missing)"
                    )
        else:
            ceilings = [Path(p) for p in env.get("KILN_CEILING_DIRECTORIES", "").split(":") if p]
            home, origin = find_home(Path.cwd(), ceilings)
        store_url = env.get("KILN_STORE") or f"sqlite:///{home / 'kiln.db'}"
        scheme = store_url.split(":", 1)[0].split("+", 1)[0]
        if scheme not in _STORE_SCHEMES:
            raise ConfigError(
                "KILN_STORE",
                f"unsupported URL scheme {scheme!r}; use sqlite:///PATH "
                "or postgresql+psycopg://USER@HOST:PORT/DB",
            )
        backend = env.get("KILN_BACKEND") or "local"
        if backend not in _BACKENDS:
            raise ConfigError("KILN_BACKEND", f"{backend!r} is not one of {', '.join(_BACKENDS)}")
        actor = env.get("KILN_ACTOR") or os_user()
        project = env.get("KILN_PROJECT") or None
        if project is not None and not _PROJECT.fullmatch(project):
            raise ConfigError("KILN_PROJECT", f"{project[:80]!r} is not a project name "
                              "(1-200 letters, digits, '.', '_' or '-')")  # fmt: skip
        shared = env.get("KILN_RAY_SHARED_HOME") or None
        if shared not in (None, "0", "1"):
            raise ConfigError("KILN_RAY_SHARED_HOME", f"{shared!r} is not 0 or 1")
        metrics_port, metrics_host = metrics_address(env)
        sandbox = env.get("KILN_SANDBOX") or "0"
        if sandbox not in ("0", "1"):
            raise ConfigError("KILN_SANDBOX", f"{sandbox[:40]!r} is not 0 or 1")
        pool = env.get("KILN_POOL") or None
        if pool is not None and not _PROJECT.fullmatch(pool):
            raise ConfigError("KILN_POOL", f"{pool[:80]!r} is not a pool name "
                              "(1-200 letters, digits, '.', '_' or '-')")  # fmt: skip
        if pool is not None and not env.get("KILN_SERVER"):
            raise ConfigError("KILN_POOL", "admission to a pool is the team server's: set "
                              "KILN_SERVER too, or unset KILN_POOL")  # fmt: skip
        return cls(
            home=home, store_url=store_url, backend=cast(Backend, backend), actor=actor,
            ray_address=env.get("KILN_RAY_ADDRESS") or None,
            ray_shared_home=None if shared is None else shared == "1",
            cache=cache_dir(env), home_origin=origin,
            server_url=server_url(env.get("KILN_SERVER") or None), project=project,
            metrics_port=metrics_port, metrics_host=metrics_host, pool=pool,
            sandbox=sandbox == "1",
        )  # fmt: skip

    @property
    def record_url(self) -> str:
        """Where the record is: the team server's URL, else the store's."""
        return self.server_url or self.store_url


def server_url(value: str | None) -> str | None:
    """``KILN_SERVER`` checked: an ``http://`` or ``https://`` URL with a host, no path
    beyond ``/``, no credentials (a token goes in ``KILN_TOKEN``); without its final ``/``."""
    if value is None:
        return None
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.username or parts.password:  # said before anything echoes the value
        raise ConfigError("KILN_SERVER", "holds credentials; put a token in KILN_TOKEN instead")
    try:
        parts.port  # noqa: B018  a port that is not a number raises here
    except ValueError as e:
        raise ConfigError("KILN_SERVER", f"{value!r} is not a URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            "KILN_SERVER", f"{value!r} is not an http:// or https:// URL of a kiln server"
        )
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ConfigError(
            "KILN_SERVER", f"{value!r} has a path; give the server's root, e.g. http://host:8700"
        )
    return f"{parts.scheme}://{parts.netloc}"


def metrics_address(environ: Mapping[str, str]) -> tuple[int | None, str]:
    """``KILN_METRICS_PORT`` (a port, 1-65535, or unset) and ``KILN_METRICS_HOST`` (an
    IP address or a host name; loopback by default) checked."""
    value = (environ.get("KILN_METRICS_PORT") or "").strip()
    port = None
    if value:
        if not (value.isascii() and value.isdigit() and 1 <= int(value) <= 65535):
            raise ConfigError("KILN_METRICS_PORT", f"{value[:40]!r} is not a port (1-65535)")
        port = int(value)
    host = (environ.get("KILN_METRICS_HOST") or "").strip() or "127.0.0.1"
    if not _HOST.fullmatch(host):
        raise ConfigError(
            "KILN_METRICS_HOST",
            f"{host[:80]!r} is not an IP address or a host name (127.0.0.1, 0.0.0.0, ::)",
        )
    return port, host


def find_home(start: Path, ceilings: Sequence[Path] = ()) -> tuple[Path, str]:
    """The ``KILN_HOME`` for a process started in ``start``, and how it was found.

    Like git's search for ``.git``: the nearest existing ``.kiln`` folder at or above
    ``start``, so a run from a subfolder records into the project's store; else the
    ``.kiln`` at the root of the git work tree (where the first run of a project should
    put it); else ``start/.kiln``. Neither search looks at or above a folder of
    ``ceilings`` (``start`` itself is always looked at).
    """
    start = start.absolute()
    above = [Path(c).absolute() for c in ceilings]
    searched = [start]
    for directory in start.parents:
        if directory in above:
            break
        searched.append(directory)
    for directory in searched:
        if (directory / ".kiln").is_dir():
            home = directory / ".kiln"
            return home, f"the nearest .kiln folder at or above {start} is {home}"
    looked = f"there is no .kiln folder in {start} or any folder above it"
    if len(searched) <= len(start.parents):
        looked += f" below the ceiling {searched[-1].parent} (KILN_CEILING_DIRECTORIES)"
    for directory in searched:
        if (directory / ".git").exists():  # a folder, or a file in a worktree or submodule
            return directory / ".kiln", f"{looked}, so it goes at the work tree's root {directory}"
    return start / ".kiln", f"{looked}, and it is not in a git work tree"


def make_home(home: Path) -> None:
    """Create ``home`` if it does not exist, readable by its owner only (it holds every
    run's code, data hashes and params), with a ``.gitignore`` that ignores all of it: a
    store inside a work tree must never show up as a change (or in a code snapshot)."""
    if home.is_dir():
        return  # the user's own folder (or one made before): not ours to add files to
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    home.chmod(0o700)  # whatever the umask
    gitignore = home / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("# Kiln's store: records, blobs and env links, never code.\n*\n")


def cache_dir(environ: Mapping[str, str]) -> Path:
    """``KILN_CACHE``, else the user's cache folder: built envs shared by every home."""
    if environ.get("KILN_CACHE"):
        return Path(environ["KILN_CACHE"]).expanduser().absolute()
    xdg = environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore a relative one
        return Path(xdg) / "kiln"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "kiln"
    return Path.home() / ".cache" / "kiln"


@functools.cache
def os_user() -> str:
    """The name of the OS account running this process."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. an arbitrary uid in a container
        return f"uid:{os.getuid()}"


def credentials_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where ``kiln login`` keeps tokens: the user's config folder, readable by them only."""
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return base / "kiln" / "credentials.json"


def server_token(url: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The token for the server at ``url``: ``KILN_TOKEN``, else the one ``kiln login``
    stored for it."""
    env = os.environ if environ is None else environ
    if env.get("KILN_TOKEN"):
        return env["KILN_TOKEN"]
    path = credentials_path(env)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    found = stored.get("servers", {}).get(url) if isinstance(stored, dict) else None
    return found if isinstance(found, str) else None


def save_server_token(url: str, token: str) -> Path:
    """Keep ``token`` for ``url`` in :func:`credentials_path` (mode 0600, written whole
    then renamed, so a crash leaves the old file or the new one)."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    if not isinstance(stored, dict) or not isinstance(stored.get("servers"), dict):
        stored = {"servers": {}}
    stored["servers"][url] = token
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(stored, f, indent=1)
    tmp.replace(path)
    return path
