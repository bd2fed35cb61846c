"""Typed settings, read from the environment once per call to :meth:`Settings.from_env`.

| variable      | default                          | meaning                                  |
|---------------|----------------------------------|------------------------------------------|
| KILN_HOME     | ./.kiln                          | embedded store and blobs                 |
| KILN_STORE    | sqlite:///$KILN_HOME/kiln.db     | metadata store URL (SQLite or PostgreSQL)|
| KILN_BACKEND  | local                            | engine: local, ray, kubernetes           |
| KILN_ACTOR    | the OS user                      | who is recorded as running things        |
| KILN_RAY_ADDRESS | this machine's Ray            | the Ray cluster of KILN_BACKEND=ray      |
| KILN_RAY_SHARED_HOME | nodes on this machine only | 1: every Ray node sees KILN_HOME (shared |
|               |                                  | disk); 0: none does, artifacts travel back |
"""

from __future__ import annotations

import functools
import getpass
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast, get_args

from kiln.errors import ConfigError

Backend = Literal["local", "ray", "kubernetes"]
_BACKENDS: tuple[str, ...] = get_args(Backend)
_STORE_SCHEMES = ("sqlite", "postgresql")


@dataclass(frozen=True, slots=True)
class Settings:
    """Where Kiln keeps its records and who it records as acting."""

    home: Path
    store_url: str
    backend: Backend = "local"
    actor: str = "unknown"
    ray_address: str | None = None  # KILN_RAY_ADDRESS; unset: this machine's Ray
    ray_shared_home: bool | None = None  # KILN_RAY_SHARED_HOME; None: nodes on this machine

    @property
    def blob_dir(self) -> Path:
        """Content-addressed blobs live here, whatever the metadata store is."""
        return self.home / "blobs"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the ``KILN_*`` variables; raise :class:`ConfigError` naming a bad one."""
        env = os.environ if environ is None else environ
        home = Path(env.get("KILN_HOME") or ".kiln").expanduser().absolute()
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
        actor = env.get("KILN_ACTOR") or _os_user()
        shared = env.get("KILN_RAY_SHARED_HOME") or None
        if shared not in (None, "0", "1"):
            raise ConfigError("KILN_RAY_SHARED_HOME", f"{shared!r} is not 0 or 1")
        return cls(
            home=home, store_url=store_url, backend=cast(Backend, backend), actor=actor,
            ray_address=env.get("KILN_RAY_ADDRESS") or None,
            ray_shared_home=None if shared is None else shared == "1",
        )  # fmt: skip


@functools.cache
def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. an arbitrary uid in a container
        return f"uid:{os.getuid()}"
