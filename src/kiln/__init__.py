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

from kiln.app import App, get_run, runs
from kiln.config import Settings
from kiln.errors import KilnError
from kiln.record.model import Artifact, MetricPoint, RunRecord, RunStatus
from kiln.record.runs import ActiveRun, Dataset, log, save

__version__ = "0.1.0"

__all__ = [
    "ActiveRun",
    "App",
    "Artifact",
    "Dataset",
    "KilnError",
    "MetricPoint",
    "RunRecord",
    "RunStatus",
    "Settings",
    "__version__",
    "get_run",
    "log",
    "runs",
    "save",
]
