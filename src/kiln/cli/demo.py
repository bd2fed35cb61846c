"""``kiln demo``: record a small real experiment and show what was recorded.

Six runs of a scikit-learn SGD classifier on the digits data set that scikit-learn
ships, run as a parallel sweep on the local engine: each with its params,
per-epoch metrics, the data set's hash and the trained model as an artifact;
then the runs table and the best run.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import track

from kiln._demo import ALPHAS, LOSSES, app, prepare, train
from kiln.app import runs
from kiln.cli._render import console, fmt_value, runs_table
from kiln.cli.models import history_table
from kiln.config import Settings
from kiln.function import grid as kiln_grid
from kiln.record.runs import Dataset


def demo(
    epochs: Annotated[int, typer.Option(min=1, max=200, help="Training epochs per run.")] = 15,
) -> None:
    """Train six classifiers as a parallel sweep; print the runs table and the best run."""
    out = console()
    settings = Settings.from_env()
    data = Dataset(prepare.remote(str(settings.home / "demo" / "digits.csv")))
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
    models = app.models
    version = models.register("digits", best, artifact="model.pkl")
    # The gate: good enough, and no worse than what production holds now.
    gate = {"metrics": {"val_accuracy": ">= 0.9", "train_accuracy": ">= current - 0.05"},
            "allow_dirty": True}  # fmt: skip
    models.set_policy("digits", "production", gate)
    models.promote("digits", version.version, alias="production",
                   reason=f"best val_accuracy of sweep {sweep.id[:8]}")  # fmt: skip
    out.print(
        f"\nregistered [bold]{version.ref}[/] and promoted it to digits@production through "
        "its gate (val_accuracy >= 0.9); the alias's history:"
    )
    out.print(history_table(models.history("digits", "production")[-5:]))
    out.print(f"details: kiln runs show {best.id[:8]}")
    out.print(f"compare: kiln runs compare {' '.join(r.id[:8] for r in recorded[:3])}")
    out.print(f"the sweep: kiln runs ls --sweep {sweep.id[:8]}")
