"""``kiln reproduce RUN``: re-run a recorded run and compare.

The exit code says how it went, for scripts and CI:

====  ==============================================================
0     reproduced: identical, or within ``--rtol``
1     could not reproduce (the code, a dataset or the run is missing)
2     bad usage (an unknown option, say)
3     different: a metric, an artifact hash or a param differs
4     failed: the reproduction failed where the original succeeded
====  ==============================================================
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from kiln.cli._render import console, fmt_value

if TYPE_CHECKING:
    from kiln.record.compare import Comparison

EXIT_CODES = {"identical": 0, "within tolerance": 0, "different": 3, "failed": 4}


def reproduce(
    run_id: Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")],
    allow_data_drift: Annotated[
        bool, typer.Option("--allow-data-drift", help="Run even if a dataset changed.")
    ] = False,
    rtol: Annotated[float, typer.Option(min=0.0, help="Relative tolerance for metrics.")] = 0.0,
    ignore_metric: Annotated[
        list[str] | None,
        typer.Option(
            "--ignore-metric",
            help="A metric to show but leave out of the verdict (a timing, say); repeatable. "
            "Metrics the run logged with volatile=True are left out anyway.",
        ),
    ] = None,
    trust: Annotated[
        bool, typer.Option("--trust", help="Run the code of a run imported from a bundle.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """Re-run a run with its recorded code, params, data and environment lock; compare.

    Exit code: 0 reproduced (identical or within --rtol), 1 could not reproduce,
    2 bad usage, 3 different, 4 the reproduction failed.
    """
    from kiln.reproduce import reproduce as run_again

    result = run_again(
        run_id,
        allow_data_drift=allow_data_drift,
        rtol=rtol,
        ignore_metrics=ignore_metric or (),
        trust=trust,
    )
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print(result, ignore_metric or [])
    raise typer.Exit(EXIT_CODES[result.verdict])


def _print(result: Comparison, asked: list[str]) -> None:
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
        cells = ["-" if v is None else fmt_value(v) for v in (old, new, delta)]
        if key in result.ignored:  # shown, but not part of the verdict
            table.add_row(f"[dim]{escape(key)} (ignored)[/]", *(f"[dim]{c}[/]" for c in cells))
        else:
            table.add_row(escape(key), *cells)
    for name, (old_sha, new_sha) in result.artifacts.items():
        same = "equal" if old_sha == new_sha else "[red]differs[/]"
        table.add_row(
            f"artifact {escape(name)}", (old_sha or "-")[:12], (new_sha or "-")[:12], same
        )
    out.print(table)
    unknown = sorted(set(asked) - set(result.metrics))
    if unknown:
        out.print(
            f"[yellow]--ignore-metric[/]: no metric {escape(', '.join(unknown))} in either run"
        )
    style = {"identical": "green", "within tolerance": "yellow"}.get(result.verdict, "red")
    out.print(f"verdict: [bold {style}]{result.verdict}[/]")
    if result.verdict == "different":
        out.print(
            f"differs in: {escape(', '.join(result.differences()))} (a metric that is not part "
            "of the result, a timing say, can be left out: --ignore-metric NAME, or "
            "kiln.log(..., volatile=True) in the code)"
        )
