"""``kiln demo``: record a small real experiment and show what was recorded.

Six runs of a scikit-learn SGD classifier on the digits data set that scikit-learn
ships, run as a parallel sweep on the local engine: each with its params,
per-epoch metrics, the data set's hash and the trained model as an artifact;
then the runs table and the best run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import track
from rich.text import Text

from kiln._demo import ALPHAS, LOSSES, app, prepare, train
from kiln.app import runs
from kiln.cli._render import console, fmt_value, runs_table
from kiln.cli.models import history_table
from kiln.config import Settings
from kiln.function import grid as kiln_grid
from kiln.record.runs import Dataset


def demo(
    epochs: Annotated[int, typer.Option(min=1, max=200, help="Training epochs per run.")] = 15,
    serve: Annotated[
        bool, typer.Option(help="Serve the promoted model, query it, explain one answer.")
    ] = True,
) -> None:
    """Train six classifiers as a parallel sweep, promote the best, serve it, trace it."""
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
    if serve:
        _serve_and_explain(settings, data.path)
    out.print(f"details: kiln runs show {best.id[:8]}")
    out.print(f"compare: kiln runs compare {' '.join(r.id[:8] for r in recorded[:3])}")
    out.print(f"the sweep: kiln runs ls --sweep {sweep.id[:8]}")


def _serve_and_explain(settings: Settings, data: Path) -> None:
    """Serve digits@production (from zero replicas), send a few requests, then show
    everything behind one answer, as ``kiln why TRACE_ID`` does."""
    from kiln._optional import require
    from kiln.errors import MissingDependencyError

    out = console()
    try:
        for module in ("uvicorn", "httpx", "pydantic", "prometheus_client", "opentelemetry.sdk"):
            require(module, extra="serve")
    except MissingDependencyError as exc:
        out.print(Text(f"\nserving skipped: {exc}", style="dim"))  # keeps "kiln[serve]" whole
        return
    import httpx

    from kiln._demo import Digits
    from kiln.cli.serve import print_why
    from kiln.errors import NotFoundError
    from kiln.observe.why import explain
    from kiln.record.recorder import recorder_for
    from kiln.serve.endpoint import Endpoint

    rows = [line.split(",") for line in data.read_text().splitlines()[:5]]
    endpoint: Endpoint[Any] = Digits  # type: ignore[assignment]  # mypy ignores class decorators
    handle = endpoint.serve(port=0, block=False)
    if handle is None:
        return
    with handle, httpx.Client(base_url=handle.url, timeout=60) as client:
        out.print(f"\nserving [bold]digits@production[/] at {handle.url} (min_replicas=0)")
        traces = []
        for i, row in enumerate(rows):
            started = time.perf_counter()
            response = client.post("/predict", json={"pixels": [float(v) for v in row[:-1]]})
            response.raise_for_status()
            took = time.perf_counter() - started
            note = " (cold start: the first request started the replica)" if i == 0 else ""
            out.print(f"  POST /predict -> {response.json()} (label {row[-1]}) "
                      f"in {took * 1000:.1f} ms{note}")  # fmt: skip
            traces.append(response.headers["x-kiln-trace-id"])
    store = recorder_for(settings).store
    deadline = time.monotonic() + 10
    while True:  # spans reach the store in batches, about half a second later
        try:
            info = explain(store, traces[-1])
            break
        except NotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    out.print(f"\n[bold]kiln why {traces[-1]}[/]")
    print_why(info)
    out.print()
