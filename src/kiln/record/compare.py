"""How a reproduction compares with its original: params, summary metrics, artifact
hashes, and one verdict.

Used by ``kiln reproduce`` when it re-runs a run, and by a promotion policy whose
``reproduced`` gate sets its own terms (a tolerance, metrics to leave out), which
compares each recorded reproduction again.

Metrics the run declared volatile (``kiln.log(..., volatile=True)``: timings,
throughput) and metrics the caller names in ``ignore`` are shown, marked ignored,
and do not change the verdict. Artifacts are always compared by sha256.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from kiln.errors import ValidationError
from kiln.record.model import RunRecord

Verdict = Literal["identical", "within tolerance", "different", "failed"]
#: The verdicts under which a run counts as reproduced.
GOOD_VERDICTS: tuple[Verdict, ...] = ("identical", "within tolerance")


@dataclass
class Comparison:
    """How a reproduction compares with its original."""

    original: str
    reproduction: str
    params_identical: bool
    metrics: dict[str, tuple[float | None, float | None, float | None]]  # old, new, delta
    artifacts: dict[str, tuple[str | None, str | None]]  # name -> old sha, new sha
    data_drift: list[str] = field(default_factory=list)
    environment_differs: bool = False
    verdict: Verdict = "identical"
    rtol: float = 0.0
    # Shown in ``metrics`` but left out of the verdict: volatile, or asked to be ignored.
    ignored: tuple[str, ...] = ()

    @property
    def reproduced(self) -> bool:
        """Whether the verdict is identical or within tolerance."""
        return self.verdict in GOOD_VERDICTS

    def differences(self) -> list[str]:
        """What differs, besides ignored metrics: ``params``, metric names, ``artifact NAME``."""
        out = [] if self.params_identical else ["params"]
        out += [
            k for k, (o, n, _) in self.metrics.items() if k not in self.ignored and not _same(o, n)
        ]
        return out + [f"artifact {k}" for k, (o, n) in self.artifacts.items() if o != n]

    def to_dict(self) -> dict[str, Any]:
        return {
            "original": self.original,
            "reproduction": self.reproduction,
            "params_identical": self.params_identical,
            "metrics": {
                k: {"old": _j(o), "new": _j(n), "delta": _j(d), "ignored": k in self.ignored}
                for k, (o, n, d) in self.metrics.items()
            },
            "artifacts": {
                k: {"old": o, "new": n, "equal": o == n} for k, (o, n) in self.artifacts.items()
            },
            "data_drift": self.data_drift,
            "environment_differs": self.environment_differs,
            "rtol": self.rtol,
            "ignored_metrics": list(self.ignored),
            "differences": self.differences(),
            "verdict": self.verdict,
        }


def _j(value: float | None) -> float | str | None:
    return value if value is None or math.isfinite(value) else repr(value)


def check_rtol(rtol: object, field: str = "rtol") -> float:
    """A relative tolerance (a finite number >= 0), or an error naming ``field``."""
    if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not 0 <= rtol < math.inf:
        raise ValidationError(field, f"{rtol!r} is not a tolerance", allowed="a number >= 0")
    return float(rtol)


def check_metric_names(names: object, field: str) -> tuple[str, ...]:
    """Metric names to ignore: a list of non-empty strings, or an error naming ``field``."""
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise ValidationError(field, f"{names!r} is not a list of metric names")
    out = tuple(names)
    for name in out:
        if not isinstance(name, str) or not name:
            raise ValidationError(field, f"{name!r} is not a metric name")
    return out


def compare(
    original: RunRecord,
    new: RunRecord,
    *,
    rtol: float = 0.0,
    drift: list[str] | None = None,
    ignore: Iterable[str] = (),
) -> Comparison:
    """Params, summary metrics and artifact hashes of two runs, with a verdict.

    ``ignore`` names metrics to show but leave out of the verdict, besides those
    either run declared volatile.
    """
    rtol = check_rtol(rtol)
    ignored = set(check_metric_names(ignore, "ignore"))
    ignored |= {*original.volatile_metrics, *new.volatile_metrics}
    metrics: dict[str, tuple[float | None, float | None, float | None]] = {}
    exact = close = True
    for key in sorted(set(original.summary) | set(new.summary)):
        old, now = original.summary.get(key), new.summary.get(key)
        metrics[key] = (old, now, None if old is None or now is None else now - old)
        if key not in ignored:
            same = _same(old, now)
            exact &= same
            close &= same or (old is not None and now is not None and _close(old, now, rtol))
    outputs = {a.name: a.sha256 for a in original.artifacts if a.direction == "out"}
    new_outputs = {a.name: a.sha256 for a in new.artifacts if a.direction == "out"}
    artifacts = {n: (outputs.get(n), new_outputs.get(n)) for n in sorted(outputs | new_outputs)}
    params_identical = original.params == new.params
    verdict: Verdict
    if str(new.status) != "succeeded" and str(original.status) == "succeeded":
        verdict = "failed"
    elif exact and params_identical and all(o == n for o, n in artifacts.values()):
        verdict = "identical"
    elif close and params_identical and rtol > 0:  # a model within tolerance has other bytes
        verdict = "within tolerance"
    else:
        verdict = "different"
    return Comparison(
        original=original.id,
        reproduction=new.id,
        params_identical=params_identical,
        metrics=metrics,
        artifacts=artifacts,
        data_drift=drift or [],
        environment_differs=original.environment.packages_sha256 != new.environment.packages_sha256,
        verdict=verdict,
        rtol=rtol,
        ignored=tuple(sorted(ignored)),
    )


def _same(old: float | None, now: float | None) -> bool:
    return old == now or (
        old is not None and now is not None and math.isnan(old) and math.isnan(now)
    )


def _close(old: float, now: float, rtol: float) -> bool:
    return math.isclose(old, now, rel_tol=rtol)
