"""Promotion policies: gates a version must pass before an alias moves to it.

A policy is a dict::

    {
        "metrics": {"accuracy": ">= 0.9", "latency_ms": "< 50",
                    "f1": ">= current + 0.01"},   # better than the alias's holder by 0.01
        "allow_dirty": False,   # default: the run's code must be committed, no changes
        "reproduced": True,     # a reproduction with verdict identical or within tolerance
    }

``reproduced`` is ``True`` (a reproduction that ``kiln reproduce`` judged identical
or within tolerance, on the terms it was run with) or a dict that sets the terms
itself: ``{"rtol": 1e-6, "ignore_metrics": ["time_s"]}``. Then each reproduction
is compared with the original again under those terms; metrics the run declared
volatile are always left out.

Every failing gate is reported, with the values compared.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import KilnError, ValidationError
from kiln.record.compare import GOOD_VERDICTS, check_metric_names, check_rtol, compare
from kiln.record.model import RunRecord

_GATE = re.compile(
    r"^\s*(>=|<=|==|>|<)\s*(?:(current)\s*(?:([+-])\s*(\d+(?:\.\d+)?(?:e-?\d+)?))?|(-?\d+(?:\.\d+)?(?:e-?\d+)?))\s*$"
)
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt, "<": operator.lt,
}  # fmt: skip
_KEYS = ("metrics", "allow_dirty", "reproduced", "approvals")
_REPRODUCED_KEYS = ("rtol", "ignore_metrics")


class PolicyError(KilnError):
    """A promotion failed its policy; ``failures`` names every failing gate."""

    def __init__(
        self, target: str, failures: list[str], *, outcome: str = "is not promoted"
    ) -> None:
        self.failures = failures
        super().__init__(f"{target} {outcome}: " + "; ".join(failures))


@dataclass(frozen=True, slots=True)
class Gate:
    metric: str
    op: str
    threshold: float | None  # a number, or None for "current ± offset"
    offset: float = 0.0
    text: str = ""

    def check(self, value: float | None, current: float | None) -> str | None:
        """None if it passes, else why not."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return f"{self.metric} is missing"
        if self.threshold is None:
            if current is None:
                return None  # nothing holds the alias yet: nothing to be better than
            target = current + self.offset
            if not _OPS[self.op](value, target):
                return (
                    f"{self.metric}: {value:g} is not {self.text} (current holder has {current:g})"
                )
            return None
        if not _OPS[self.op](value, self.threshold):
            return f"{self.metric}: {value:g} is not {self.text}"
        return None


@dataclass(frozen=True, slots=True)
class Reproduced:
    """The ``reproduced`` gate. ``terms`` False: the verdict ``kiln reproduce`` recorded
    counts; True: each reproduction is compared again with ``rtol`` and ``ignore_metrics``."""

    terms: bool = False
    rtol: float = 0.0
    ignore_metrics: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: object) -> Reproduced | None:
        """``True``, ``False`` or ``{"rtol": ..., "ignore_metrics": [...]}``."""
        if isinstance(spec, bool):
            return cls() if spec else None
        allowed = "true, false, or {'rtol': 1e-6, 'ignore_metrics': ['time_s']}"
        if not isinstance(spec, Mapping):
            raise ValidationError("policy.reproduced", f"{spec!r} is not a rule", allowed=allowed)
        for key in spec:
            if key not in _REPRODUCED_KEYS:
                raise ValidationError(
                    f"policy.reproduced.{key}", "is not a reproduced key", allowed=_REPRODUCED_KEYS
                )
        rtol = check_rtol(spec.get("rtol", 0.0), "policy.reproduced.rtol")
        names = spec.get("ignore_metrics", [])
        if not isinstance(names, list | tuple):
            raise ValidationError(
                "policy.reproduced.ignore_metrics", f"{names!r} is not a list of metric names"
            )
        ignore = check_metric_names(names, "policy.reproduced.ignore_metrics")
        return cls(True, rtol, ignore)

    def verdicts(self, original: RunRecord, copies: Sequence[RunRecord]) -> list[str]:
        """The verdict of each finished reproduction of ``original``, on this gate's terms."""
        done = [c for c in copies if "reproduce_verdict" in c.tags]  # its comparison ended
        if not self.terms:
            return [c.tags["reproduce_verdict"] for c in done]
        return [
            compare(original, c, rtol=self.rtol, ignore=self.ignore_metrics).verdict for c in done
        ]

    def describe(self) -> str:
        if not self.terms:
            return "identical or within tolerance"
        terms = [f"rtol {self.rtol:g}"] if self.rtol else []
        if self.ignore_metrics:
            terms.append(f"ignoring {', '.join(self.ignore_metrics)}")
        return "identical or within tolerance" + (f" ({'; '.join(terms)})" if terms else "")


@dataclass(frozen=True, slots=True)
class Policy:
    gates: tuple[Gate, ...] = ()
    allow_dirty: bool = False
    reproduced: Reproduced | None = None  # None: no reproduction needed
    approvals: int = 0  # how many approvals a promotion needs
    # Who may give them; empty: anyone who may approve (on a team server, the approver
    # role of the project), never the requester.
    approvers: tuple[str, ...] = ()
    spec: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: Mapping[str, Any]) -> Policy:
        """Validate a policy dict; errors name the key and what is allowed."""
        if not isinstance(spec, Mapping):
            raise ValidationError("policy", "must be a dict", allowed=_KEYS)
        unknown = set(spec) - set(_KEYS)
        if unknown:
            raise ValidationError(
                f"policy.{sorted(unknown)[0]}", "is not a policy key", allowed=_KEYS
            )
        gates = []
        for metric, texts in dict(spec.get("metrics") or {}).items():
            for text in texts if isinstance(texts, list) else [texts]:  # one gate, or several
                gates.append(_gate(metric, text))
        if "allow_dirty" in spec and not isinstance(spec["allow_dirty"], bool):
            raise ValidationError(
                "policy.allow_dirty", f"{spec['allow_dirty']!r} is not true or false"
            )
        reproduced = Reproduced.parse(spec.get("reproduced", False))
        count, approvers = _approvals(spec.get("approvals"))
        return cls(tuple(gates), bool(spec.get("allow_dirty", False)),
                   reproduced, count, approvers, dict(spec))  # fmt: skip

    def check(
        self,
        metrics: Mapping[str, Any],
        current_metrics: Mapping[str, Any] | None,
        *,
        dirty: bool | None,
        reproduced_verdicts: list[str],
    ) -> list[str]:
        """Every failing gate, or an empty list. ``dirty`` is None when the code is not in git."""
        failures = []
        for gate in self.gates:
            current = None if current_metrics is None else _number(current_metrics.get(gate.metric))
            problem = gate.check(_number(metrics.get(gate.metric)), current)
            if problem:
                failures.append(problem)
        if not self.allow_dirty:
            if dirty is None:
                failures.append("the run's code is not in git, so it cannot be shown clean "
                                "(set allow_dirty: true to permit it)")  # fmt: skip
            elif dirty:
                failures.append(
                    "the run had uncommitted changes (set allow_dirty: true to permit it)"
                )
        if self.reproduced and not any(v in GOOD_VERDICTS for v in reproduced_verdicts):
            seen = ", ".join(reproduced_verdicts) or "none"
            failures.append(
                f"no reproduction with verdict {self.reproduced.describe()} (seen: {seen})"
            )
        return failures

    def reproduction_verdicts(self, original: RunRecord, copies: Sequence[RunRecord]) -> list[str]:
        """What :meth:`check` takes as ``reproduced_verdicts``: the verdicts of the
        reproductions of ``original``, on the terms of this policy's ``reproduced``."""
        return [] if self.reproduced is None else self.reproduced.verdicts(original, copies)


def _gate(metric: str, text: object) -> Gate:
    match = _GATE.match(str(text))
    if match is None:
        raise ValidationError(
            f"policy.metrics.{metric}",
            f"{text!r} is not a gate",
            allowed="'>= 0.9', '< 50', '> current', '>= current + 0.01', or a list of them",
        )
    op, current, sign, offset, number = match.groups()
    if current:
        delta = float(offset or 0) * (-1 if sign == "-" else 1)
        return Gate(metric, op, None, delta, str(text).strip())
    return Gate(metric, op, float(number), 0.0, str(text).strip())


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _approvals(spec: Any) -> tuple[int, tuple[str, ...]]:
    if spec is None:
        return 0, ()
    allowed = "{'count': N, 'approvers': ['alice', 'bob']}"
    if not isinstance(spec, Mapping) or set(spec) - {"count", "approvers"}:
        raise ValidationError(
            "policy.approvals", f"{spec!r} is not an approvals rule", allowed=allowed
        )
    count, approvers = spec.get("count", 1), spec.get("approvers", [])
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValidationError("policy.approvals.count", f"{count!r} is not a count >= 1")
    if not isinstance(approvers, list) or not all(isinstance(a, str) and a for a in approvers):
        raise ValidationError("policy.approvals.approvers", "must be a list of identities")
    if approvers and len(set(approvers)) < count:
        raise ValidationError(
            "policy.approvals",
            f"{count} approvals need at least {count} approvers, not {len(set(approvers))}",
        )
    return count, tuple(approvers)


def weakenings(old: Policy | None, new: Policy | None) -> list[str]:
    """How ``new`` is less strict than ``old``: every gate, rule or approver it drops or
    loosens. Empty when ``new`` asks at least what ``old`` asks."""
    if old is None:
        return []
    if new is None:
        return ["removes the policy"]
    out = [f"drops or loosens the gate {g.metric} {g.text}" for g in old.gates
           if not any(_as_strict(g, n) for n in new.gates)]  # fmt: skip
    if new.allow_dirty and not old.allow_dirty:
        out.append("allows uncommitted code (allow_dirty)")
    if old.reproduced is not None and new.reproduced != old.reproduced:
        out.append(f"changes the reproduced rule ({old.reproduced.describe()})")
    if new.approvals < old.approvals:
        out.append(f"needs {new.approvals} approval(s), not {old.approvals}")
    if old.approvals and old.approvers and not new.approvers:
        out.append("lets anyone with the approver role approve")
    added = sorted(set(new.approvers) - set(old.approvers)) if old.approvers else []
    if added:
        out.append(f"lets {', '.join(added)} approve")
    return out


def _as_strict(old: Gate, new: Gate) -> bool:
    """Whether gate ``new`` passes only what ``old`` passes (same metric and kind)."""
    if (new.metric, new.op, new.threshold is None) != (old.metric, old.op, old.threshold is None):
        return False
    a = old.offset if old.threshold is None else old.threshold
    b = new.offset if new.threshold is None else new.threshold
    if old.op in (">=", ">"):
        return b >= a
    if old.op in ("<=", "<"):
        return b <= a
    return b == a


def combine(stored: Policy | None, given: Policy | None, target: str) -> Policy | None:
    """The policy a promotion with a per-call ``given`` policy must pass: the stored one
    and every gate ``given`` adds. ``given`` may only add: a rule of it that would let
    through what the stored one stops is a :class:`PolicyError`."""
    if stored is None or given is None:
        return given or stored
    spec = {k: v for k, v in stored.spec.items() if k != "metrics"}
    for key in ("allow_dirty", "reproduced", "approvals"):
        if key in given.spec:
            spec[key] = given.spec[key]
    metrics: dict[str, list[str]] = {}
    for gate in (*stored.gates, *given.gates):  # each gate of either applies
        if gate.text not in metrics.setdefault(gate.metric, []):
            metrics[gate.metric].append(gate.text)
    spec["metrics"] = metrics
    merged = Policy.parse(spec)
    conflicts = weakenings(stored, merged)
    if conflicts:
        raise PolicyError(
            target,
            [f"a policy for one call may only add to the stored one: it {c}" for c in conflicts],
        )
    return merged
