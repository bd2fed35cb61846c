"""The ``kiln`` command line: one module per command group."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from kiln.cli import audit, bundle, demo, envs, gc, lineage, models, reproduce, run, runs, serve
from kiln.errors import KilnError

app = typer.Typer(
    name="kiln",
    help="Run experiments, record every run, promote and serve the best.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(runs.app, name="runs")
app.add_typer(envs.app, name="envs")
app.add_typer(audit.app, name="audit")
app.add_typer(models.app, name="models")
app.add_typer(serve.endpoints_app, name="endpoints")
app.add_typer(serve.traces_app, name="traces")
app.command("serve")(serve.serve)
app.command("batch")(serve.batch)
app.command("why")(serve.why)
app.command("demo")(demo.demo)
app.command("lineage")(lineage.lineage)
app.command("export")(bundle.export)
app.command("verify")(bundle.verify)
app.command("import")(bundle.import_)
app.command("reproduce")(reproduce.reproduce)
app.command("gc")(gc.gc)
app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
    run.run
)


def main() -> None:
    """Entry point: Kiln's own errors become one red line and exit code 1."""
    try:
        app()
    except KilnError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)
