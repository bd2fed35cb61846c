"""Import optional dependencies on first use, naming the extra when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from kiln.errors import MissingDependencyError


def require(module: str, *, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``kiln[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and module.split(".")[0] != exc.name.split(".")[0]:
            raise  # the package is there but one of its own imports failed: show that
        raise MissingDependencyError(module.split(".")[0], extra) from exc
