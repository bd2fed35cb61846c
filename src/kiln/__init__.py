"""Kiln: run experiments on shared hardware, record every run, promote and serve the best.

Example::

    import kiln

    app = kiln.App("demo")
    with app.run(params={"lr": 0.1}) as run:
        for step in range(3):
            kiln.log({"loss": 1 / (step + 1)}, step=step)
        kiln.save("notes.txt", b"hello")
    kiln.runs(app="demo", order_by="loss", limit=5)
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.app import App, get_run, runs
    from kiln.config import Settings
    from kiln.envs.spec import Env
    from kiln.errors import KilnError, Preempted, RunFailed
    from kiln.function import Function, MapResult, Run, Sweep, grid
    from kiln.govern.sandbox import Sandbox
    from kiln.record.model import Artifact, MetricPoint, RunRecord, RunStatus
    from kiln.record.runs import ActiveRun, Dataset, checkpoint, log, save
    from kiln.registry.selection import pareto

__version__ = "0.1.0"

# Every name loads when first used, so that `import kiln` (and with it every start of
# the `kiln` CLI, whose modules live in this package) costs next to nothing.
_LAZY = {"App": "kiln.app", "get_run": "kiln.app", "runs": "kiln.app",
         "Settings": "kiln.config", "KilnError": "kiln.errors", "RunFailed": "kiln.errors",
         "Preempted": "kiln.errors", "checkpoint": "kiln.record.runs",
         "Artifact": "kiln.record.model", "MetricPoint": "kiln.record.model",
         "RunRecord": "kiln.record.model", "RunStatus": "kiln.record.model",
         "ActiveRun": "kiln.record.runs", "Dataset": "kiln.record.runs",
         "log": "kiln.record.runs", "save": "kiln.record.runs",
         "Function": "kiln.function", "MapResult": "kiln.function", "Run": "kiln.function",
         "Sweep": "kiln.function", "grid": "kiln.function", "Env": "kiln.envs.spec",
         "pareto": "kiln.registry.selection", "Sandbox": "kiln.govern.sandbox"}  # fmt: skip


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups (kiln.log in a training loop) skip this hook
        return value
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")


__all__ = [
    "ActiveRun",
    "App",
    "Artifact",
    "Dataset",
    "Env",
    "Function",
    "KilnError",
    "MapResult",
    "MetricPoint",
    "Preempted",
    "Run",
    "RunFailed",
    "RunRecord",
    "RunStatus",
    "Sandbox",
    "Settings",
    "Sweep",
    "__version__",
    "checkpoint",
    "get_run",
    "grid",
    "log",
    "pareto",
    "runs",
    "save",
]
