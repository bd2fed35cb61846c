"""``kiln.Env``: what a function's environment must contain."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

from kiln.errors import ValidationError

_PYTHON = re.compile(r"^\d+\.\d+(\.\d+)?$")
_REQUIREMENTS = ("requirements.txt", "*.txt", "*.in", "pyproject.toml", "uv.lock")


@dataclass(frozen=True, slots=True)
class Env:
    """A declared environment. Kiln resolves it once with uv, locks it, builds it once.

    ``packages`` are PEP 508 requirements; ``requirements`` a requirements file, or a
    project's ``pyproject.toml`` or ``uv.lock``; ``python`` a version such as ``"3.11"``
    (None: the caller's interpreter); ``index`` a package index URL (None: uv's default).

    Example::

        env = kiln.Env(packages=["scikit-learn>=1.4", "pandas"])

        @app.function(env=env)
        def train() -> dict: ...
    """

    packages: tuple[str, ...] = ()
    python: str | None = None
    requirements: Path | None = None
    index: str | None = None

    def __init__(
        self,
        packages: list[str] | tuple[str, ...] = (),
        python: str | None = None,
        requirements: str | Path | None = None,
        index: str | None = None,
    ) -> None:
        if isinstance(packages, str):
            raise ValidationError("packages", "must be a list of requirement strings, not a str")
        normalized = []
        for i, text in enumerate(packages):
            if not isinstance(text, str):
                raise ValidationError(f"packages[{i}]", f"{text!r} is not a requirement string")
            try:
                normalized.append(str(Requirement(text)))
            except InvalidRequirement as exc:
                raise ValidationError(
                    f"packages[{i}]",
                    f"{text!r} is not a valid requirement: {exc}",
                    allowed="PEP 508, e.g. 'numpy>=2', 'requests[socks]==2.32.3'",
                ) from None
        if python is not None and (not isinstance(python, str) or not _PYTHON.match(python)):
            raise ValidationError(
                "python", f"{python!r} is not a version", allowed="'3.11', '3.12.4' or None"
            )
        path = None
        if requirements is not None:
            path = Path(requirements).expanduser().absolute()
            if not path.is_file():
                raise ValidationError("requirements", f"no file at {str(path)!r}")
            if not any(path.match(p) for p in _REQUIREMENTS):
                raise ValidationError(
                    "requirements",
                    f"{path.name!r} is not a requirements file",
                    allowed=_REQUIREMENTS,
                )
        if index is not None and (not isinstance(index, str) or "://" not in index):
            raise ValidationError("index", f"{index!r} is not a URL")
        if not normalized and path is None:
            raise ValidationError("packages", "an Env needs packages or a requirements file")
        object.__setattr__(self, "packages", tuple(sorted(set(normalized), key=str.lower)))
        object.__setattr__(self, "python", python)
        object.__setattr__(self, "requirements", path)
        object.__setattr__(self, "index", index)

    def declaration_key(self, interpreter: str) -> str:
        """sha256 of everything that decides the lock: the same key resolves to the same lock
        (until the index changes), so it is cached and a repeat request skips the resolver."""
        body: dict[str, Any] = {
            "packages": list(self.packages),
            "python": self.python,
            "interpreter": interpreter,
            "index": self.index,
            "requirements": None,
        }
        if self.requirements is not None:
            body["requirements"] = {
                "name": self.requirements.name,
                "sha256": hashlib.sha256(self.requirements.read_bytes()).hexdigest(),
            }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def __kiln_json__(self) -> dict[str, object]:
        return {
            "packages": list(self.packages),
            "python": self.python,
            "requirements": str(self.requirements) if self.requirements else None,
            "index": self.index,
        }
