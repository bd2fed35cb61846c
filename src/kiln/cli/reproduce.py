"""``kiln reproduce RUN``: re-run a recorded run and compare."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from kiln.cli._render import console, fmt_value


def reproduce(
    run_id: Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")],
    allow_data_drift: Annotated[
        bool, typer.Option("--allow-data-drift", help="Run even if a dataset changed.")
    ] = False,
    rtol: Annotated[float, typer.Option(help="Relative tolerance for metrics.")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """Re-run a run with its recorded code, params, data and environment lock; compare."""
    from kiln.reproduce import reproduce as run_again

    result = run_again(run_id, allow_data_drift=allow_data_drift, rtol=rtol)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    out = console()
    out.print(f"reproduced {result.original[:8]} as {result.reproduction[:8]}")
    out.print(f"params: {'identical' if result.params_identical else '[red]different[/]'}")
    if result.data_drift:
        out.print(f"[yellow]data drift[/] in: {', '.join(result.data_drift)}")
    if result.environment_differs:
        out.print("[yellow]environment differs[/]: other installed packages than the original")
    table = Table(header_style="bold", show_edge=False)
    for col in ("metric", "original", "reproduced", "delta"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, (old, new, delta) in result.metrics.items():
        table.add_row(key, *("-" if v is None else fmt_value(v) for v in (old, new, delta)))
    for name, (old_sha, new_sha) in result.artifacts.items():
        same = "equal" if old_sha == new_sha else "[red]differs[/]"
        table.add_row(f"artifact {name}", (old_sha or "-")[:12], (new_sha or "-")[:12], same)
    out.print(table)
    style = {"identical": "green", "within tolerance": "yellow"}.get(result.verdict, "red")
    out.print(f"verdict: [bold {style}]{result.verdict}[/]")
