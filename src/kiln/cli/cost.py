"""``kiln cost``: what ended runs held (CPU-, memory- and GPU-hours) and, with a price
table (``KILN_PRICES``), what they cost, grouped by project, user, app or sweep."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from kiln.cli._render import console, parse_duration, plain
from kiln.observe.cost import Prices, Usage, gpu_type, held
from kiln.record.model import RunRecord

By = Literal["project", "user", "app", "sweep"]


def cost(
    by: Annotated[str, typer.Option("--by", help="Group by project, user, app or sweep.")] = "app",
    since: Annotated[
        str | None, typer.Option("--since", help="Runs created in the last 30m, 12h, 7d, 2w.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON for scripts and agents.")
    ] = False,
) -> None:
    """What ended runs held and cost, grouped by project, user, app or sweep."""
    from kiln.app import runs
    from kiln.config import DEFAULT_PROJECT, Settings
    from kiln.errors import ValidationError

    if by not in ("project", "user", "app", "sweep"):
        raise ValidationError("--by", f"{by!r} is not a grouping",
                              allowed="project, user, app, sweep")  # fmt: skip
    cutoff = None if since is None else time.time() - parse_duration(since, "--since")
    prices = Prices.from_env()
    settings = Settings.from_env()
    found = [r for r in runs(limit=None, reproductions=True, settings=settings)
             if r.status.terminal and (cutoff is None or r.created_at >= cutoff)]  # fmt: skip
    rows = totals(found, by, settings.project or DEFAULT_PROJECT, prices)  # type: ignore[arg-type]
    if as_json:
        typer.echo(json.dumps({"by": by, "since": since, "priced": prices is not None,
                               "groups": rows}, indent=2))  # fmt: skip
        return
    out = console()
    if not rows:
        out.print("no ended runs" + (f" in the last {since}" if since else ""))
        return
    table = Table(show_edge=False, header_style="bold")
    for column in (by, "runs", "CPU-hours", "memory GB-hours", "GPU-hours", "cost"):
        table.add_column(column, justify="left" if column == by else "right")
    for row in rows:
        dollars = "-" if row["cost"] is None else f"${_figure(row['cost'])}"
        hours = [_figure(row[k]) for k in ("cpu_hours", "memory_gb_hours", "gpu_hours")]
        table.add_row(plain(str(row[by])), f"{row['runs']:,}", *hours, dollars)
    out.print(table)
    if prices is None:
        out.print(plain("no prices: set KILN_PRICES (e.g. '{\"cpu_hour\": 0.04, "
                        "\"gpu_hour\": {\"H100\": 2.9}}') for dollars"), style="dim")  # fmt: skip


def totals(
    records: list[RunRecord], by: By, project: str, prices: Prices | None
) -> list[dict[str, Any]]:
    """Per group: runs, resource-hours held and (with ``prices``) dollars; costliest
    first (most CPU-hours without prices)."""
    groups: dict[str, Usage] = defaultdict(Usage)
    dollars: dict[str, float] = defaultdict(float)
    for r in records:
        key = {"project": project, "user": r.actor or "-", "app": r.app,
               "sweep": r.parent_id or "(no sweep)"}[by]  # fmt: skip
        used = held(r)
        groups[key] = groups[key] + used
        if prices is not None:
            dollars[key] += prices.cost(used, gpu_type(r))
    rows: list[dict[str, Any]] = [{by: key, "runs": u.requests, "cpu_hours": u.cpu_seconds / 3600,
             "memory_gb_hours": u.memory_gb_seconds / 3600, "gpu_hours": u.gpu_seconds / 3600,
             "cost": None if prices is None else round(dollars[key], 6)}
            for key, u in groups.items() if u.requests]  # fmt: skip
    rows.sort(key=lambda row: (-(row["cost"] or 0.0), -row["cpu_hours"], str(row[by])))
    return rows


def _figure(value: float) -> str:
    """Two decimals, or three significant digits for what two decimals would show as 0."""
    return f"{value:,.2f}" if value == 0 or value >= 0.01 else f"{value:.3g}"
