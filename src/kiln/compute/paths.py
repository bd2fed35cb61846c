"""Where a worker finds the caller's code."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def code_paths() -> tuple[str, ...]:
    """The caller's code folders: sys.path without the interpreter's own and installed
    packages, which a worker in another environment must not see."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    out = []
    for entry in sys.path:
        path = entry or str(Path.cwd())
        if "site-packages" in path or path.endswith(".zip"):
            continue
        if any(path == p or path.startswith(p + os.sep) for p in prefixes):
            continue
        out.append(path)
    return tuple(out)
