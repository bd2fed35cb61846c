"""``kiln demo``: record a small real experiment and show what was recorded.

Six runs of a scikit-learn SGD classifier on the digits data set that scikit-learn
ships, run as a parallel sweep on the local engine: each with its params,
per-epoch metrics, the data set's hash and the trained model as an artifact;
then the runs table and the best run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import track

from kiln._optional import require
from kiln.app import App, runs
from kiln.cli._render import console, fmt_value, runs_table
from kiln.config import Settings
from kiln.function import grid as kiln_grid
from kiln.record.runs import Dataset, log, save

LOSSES = ("log_loss", "hinge", "modified_huber")
ALPHAS = (1e-4, 1e-2)


demo_app = App("demo")


@demo_app.function(cpu=1, memory="256Mi", timeout=600)
def train(loss: str, alpha: float, epochs: int, data: Dataset) -> dict[str, Any]:
    """Train one SGD classifier on the digits CSV, logging accuracy every epoch."""
    return _train(data.path, loss=loss, alpha=alpha, epochs=epochs)


def demo(
    epochs: Annotated[int, typer.Option(min=1, max=200, help="Training epochs per run.")] = 15,
) -> None:
    """Train six classifiers as a parallel sweep; print the runs table and the best run."""
    require("sklearn", extra="demo")
    out = console()
    settings = Settings.from_env()
    data = Dataset(_write_digits(settings.home / "demo" / "digits.csv"))
    grid = kiln_grid(loss=list(LOSSES), alpha=list(ALPHAS), epochs=[epochs], data=[data])
    sweep = train.sweep(grid)
    for run in track(sweep.runs, description="training", console=out, transient=True):
        run.wait()
    recorded = runs(parent=sweep.id, order_by="-val_accuracy", limit=None, settings=settings)
    out.print(
        f"\n[bold]sweep {sweep.id[:8]}: {len(recorded)} runs recorded[/] in {settings.store_url}\n"
    )
    out.print(runs_table(recorded, metrics=["val_accuracy", "train_accuracy"]))
    best = sweep.best("val_accuracy")
    shown = ", ".join(f"{k}={fmt_value(v)}" for k, v in best.params.items() if k != "data")
    accuracy = fmt_value(best.summary["val_accuracy"])
    out.print(f"\n[bold green]best run[/] {best.id}  val_accuracy={accuracy}  ({shown})")
    out.print(f"details: kiln runs show {best.id[:8]}")
    out.print(f"compare: kiln runs compare {' '.join(r.id[:8] for r in recorded[:3])}")
    out.print(f"the sweep: kiln runs ls --sweep {sweep.id[:8]}")


def _write_digits(path: Path) -> Path:
    """Write scikit-learn's bundled digits data to CSV (once), so it can be hashed as a file."""
    if not path.exists():
        from sklearn.datasets import load_digits

        digits = load_digits()
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            ",".join([*(f"{x:g}" for x in row), str(label)])
            for row, label in zip(digits.data, digits.target, strict=True)
        ]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)
    return path


def _train(path: Path, *, loss: str, alpha: float, epochs: int) -> dict[str, Any]:
    import numpy as np
    from sklearn.linear_model import SGDClassifier
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    table = np.loadtxt(path, delimiter=",")
    x, y = table[:, :-1], table[:, -1].astype(int)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    scaler = StandardScaler().fit(x_train)
    x_train, x_val = scaler.transform(x_train), scaler.transform(x_val)
    model = SGDClassifier(loss=loss, alpha=alpha, random_state=0)
    classes = np.unique(y)
    for epoch in range(epochs):
        model.partial_fit(x_train, y_train, classes=classes)
        log(
            {
                "train_accuracy": model.score(x_train, y_train),
                "val_accuracy": model.score(x_val, y_val),
            },
            step=epoch,
        )
    save("model.pkl", {"scaler": scaler, "model": model})
    return {"val_accuracy": float(model.score(x_val, y_val)), "epochs": epochs}
