"""Tables and values shared by the commands that show runs."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from kiln.record.recorder import Recorder

from kiln.record.model import RunRecord, RunStatus

STATUS_STYLE = {
    RunStatus.QUEUED: "dim",
    RunStatus.RUNNING: "cyan",
    RunStatus.SUCCEEDED: "green",
    RunStatus.FAILED: "red",
    RunStatus.CANCELLED: "yellow",
    RunStatus.LOST: "magenta",
}


def status_text(status: RunStatus) -> str:
    return f"[{STATUS_STYLE[status]}]{status}[/]"


def fmt_value(value: Any) -> str:
    """Numbers to 4 significant digits; everything else as compact JSON."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
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
        table.add_column(m, justify="right", no_wrap=True, min_width=min(len(m), 16))
    table.add_column("params", overflow="fold", min_width=16, ratio=1)
    for r in records:
        table.add_row(
            r.id[:8],
            *([r.app] if show_app else []),
            *([r.name or ""] if show_name else []),
            status_text(r.status),
            fmt_time(r.created_at),
            fmt_duration(r.duration_s),
            *(fmt_value(r.summary[m]) if m in r.summary else "" for m in metrics),
            " ".join(f"{k}={fmt_value(v)}" for k, v in r.params.items()),
        )
    return table


def console() -> Console:
    """A console for command output: on a terminal its width, piped a wide fixed one."""
    out = Console()
    return out if out.is_terminal else Console(width=160)


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
