"""Tables and values shared by the commands that show runs."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from kiln.record.recorder import Recorder

from kiln.record.model import MetricPoint, RunRecord, RunStatus

STATUS_STYLE = {
    RunStatus.QUEUED: "dim",
    RunStatus.RUNNING: "cyan",
    RunStatus.SUCCEEDED: "green",
    RunStatus.FAILED: "red",
    RunStatus.CANCELLED: "yellow",
    RunStatus.LOST: "magenta",
    RunStatus.PREEMPTED: "yellow",
}


def status_text(status: RunStatus) -> str:
    return f"[{STATUS_STYLE[status]}]{status}[/]"


def fmt_value(value: Any) -> str:
    """Numbers to 4 significant digits, but whole digits from 10,000 up (30000, never
    3e+04); everything else as compact JSON."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if 1e4 <= abs(value) < 1e15:  # an exponent only for the very large and very small
            return f"{value:.0f}"
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) == {"dataset", "sha256"}:
        return f"{Path(value['dataset']).name}@{value['sha256'][:8]}"
    return json.dumps(value, separators=(",", ":"))


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m"


def fmt_time(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().strftime("%m-%d %H:%M:%S")


def runs_table(records: list[RunRecord], *, metrics: list[str] | None = None) -> Table:
    """One row per run: id, app, status, when, how long, params and chosen summary metrics."""
    if metrics is None:
        seen: dict[str, None] = {}
        for r in records:
            seen.update(dict.fromkeys(r.summary))
        metrics = list(seen)[:4]
    show_app = len({r.app for r in records}) > 1
    show_name = any(r.name for r in records)
    table = Table(header_style="bold", show_edge=False, pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=8)
    if show_app:
        table.add_column("app", no_wrap=True)
    if show_name:
        table.add_column("name", no_wrap=True)
    for col in ("status", "created", "duration"):
        table.add_column(col, no_wrap=True, min_width=len(col))
    for m in metrics:
        table.add_column(plain(m), justify="right", no_wrap=True, min_width=min(len(m), 16))
    table.add_column("params", overflow="fold", min_width=16, ratio=1)
    for r in records:
        table.add_row(  # names and params are the user's: plain text, never markup
            r.id[:8],
            *([plain(r.app)] if show_app else []),
            *([plain(r.name or "")] if show_name else []),
            status_text(r.status),
            fmt_time(r.created_at),
            fmt_duration(r.duration_s),
            *(fmt_value(r.summary[m]) if m in r.summary else "" for m in metrics),
            plain(" ".join(f"{k}={fmt_value(v)}" for k, v in r.params.items())),
        )
    return table


SPARKS = "▁▂▃▄▅▆▇█"
HISTORY_ROWS = 40


def sparkline(values: list[float], width: int = 40) -> str:
    """``values`` drawn as one line of block characters, at most ``width`` of them."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    if len(values) > width:  # the last value of each of `width` equal slices
        values = [values[min(len(values) - 1, (i + 1) * len(values) // width - 1)]
                  for i in range(width)]  # fmt: skip
    low, high = min(finite), max(finite)
    span = (high - low) or 1.0
    top = len(SPARKS) - 1
    return "".join(SPARKS[round((v - low) / span * top)] if math.isfinite(v) else " "
                   for v in values)  # fmt: skip


def metrics_view(run_id: str, histories: dict[str, list[MetricPoint]]) -> Group:
    """Each metric as a sparkline with its first, last, min and max; then the values by
    step (at most HISTORY_ROWS steps, evenly spread, the first and the last always)."""
    if not histories:
        return Group(Text(f"run {run_id[:8]} logged no metrics"))
    summary = Table(header_style="bold", show_edge=False)
    for col in ("metric", "points", "first", "last", "min", "max", "history"):
        summary.add_column(col, justify="left" if col in ("metric", "history") else "right")
    for key, points in histories.items():
        values = [p.value for p in points]
        figures = (values[0], values[-1], min(values), max(values))
        summary.add_row(Text(key), str(len(points)), *map(fmt_value, figures), sparkline(values))
    by_step: dict[int, dict[str, float]] = {}
    for key, points in histories.items():
        for p in points:  # a step logged twice shows its last value
            by_step.setdefault(p.step, {})[key] = p.value
    steps = sorted(by_step)
    shown = steps
    if len(steps) > HISTORY_ROWS:
        picks = {round(i * (len(steps) - 1) / (HISTORY_ROWS - 1)) for i in range(HISTORY_ROWS)}
        shown = [steps[i] for i in sorted(picks)]
    table = Table(header_style="bold", show_edge=False)
    table.add_column("step", justify="right")
    for key in histories:
        table.add_column(Text(key), justify="right")
    for step in shown:
        at = by_step[step]
        table.add_row(str(step), *(fmt_value(at[k]) if k in at else "" for k in histories))
    parts: list[Any] = [summary, Text(""), table]
    if shown is not steps:
        note = f"{len(shown)} of {len(steps)} steps shown, evenly spread; --json has every point"
        parts.append(Text(note, style="dim"))
    return Group(*parts)


def console() -> Console:
    """A console for command output: on a terminal its width, piped a wide fixed one.

    Nothing is highlighted: rich's highlighter colours digits inside hashes and ids.
    Text from users and errors goes through :func:`plain`, never into markup.
    """
    out = Console(highlight=False)
    return out if out.is_terminal else Console(width=160, highlight=False)


def plain(value: object) -> Text:
    """``value`` as text that is shown as it is: ``kiln[parquet]`` keeps its brackets."""
    return Text(str(value))


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, option: str) -> float:
    """``30m``, ``12h``, ``7d``, ``2w`` as seconds; a ValidationError naming ``option``."""
    from kiln.errors import ValidationError

    match = _DURATION.match(text)
    if match is None:
        raise ValidationError(option, f"{text!r} is not a duration",
                              allowed="a number with s, m, h, d or w, e.g. 7d")  # fmt: skip
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def reader() -> Recorder:
    """This process's recorder for the configured store; a missing store is an error."""
    from kiln.config import Settings
    from kiln.record.recorder import recorder_for

    return recorder_for(Settings.from_env(), create=False)
