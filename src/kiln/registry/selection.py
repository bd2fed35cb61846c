"""Choosing among runs: the Pareto front of several objectives."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from kiln.errors import ValidationError
from kiln.record.model import RunRecord


def pareto(
    runs: Iterable[RunRecord],
    *,
    maximize: Sequence[str] = (),
    minimize: Sequence[str] = (),
) -> list[RunRecord]:
    """The runs no other run beats on every objective (better on one, no worse on the rest).

    Runs missing an objective, or holding NaN for it, are left out. Example::

        front = kiln.pareto(kiln.runs(app="fraud", limit=None),
                            maximize=["accuracy"], minimize=["latency_ms"])
    """
    if isinstance(maximize, str) or isinstance(minimize, str):
        raise ValidationError("maximize", "give a list of metric names, not a string")
    if not maximize and not minimize:
        raise ValidationError("maximize", "name at least one metric to maximize or minimize")
    keys = [(m, 1.0) for m in maximize] + [(m, -1.0) for m in minimize]
    scored = []
    for run in runs:
        values = [run.summary.get(m) for m, _ in keys]
        if all(v is not None and not math.isnan(v) for v in values):
            scored.append((run, [sign * v for (_, sign), v in zip(keys, values, strict=True)]))  # type: ignore[operator]
    front = []
    for run, score in scored:
        dominated = any(
            all(o >= s for o, s in zip(other, score, strict=True))
            and any(o > s for o, s in zip(other, score, strict=True))
            for _, other in scored
        )
        if not dominated:
            front.append(run)
    return front
