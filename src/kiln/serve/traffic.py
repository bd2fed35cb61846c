"""Splitting requests between model versions by weight.

Smooth weighted round robin (as nginx does it): each pick adds every version's
weight to its credit, takes the version with the most credit and charges it the
total. The split is exact over every window of ``sum(weights)`` picks and never
sends long runs to one version, so a 10% canary sees every tenth request, not
bursts, and a test of the split needs no statistics.
"""

from __future__ import annotations

from collections.abc import Mapping


class Split:
    def __init__(self, weights: Mapping[int, float]) -> None:
        self.weights = {v: float(w) for v, w in weights.items() if w > 0}
        if not self.weights:
            raise ValueError("a split needs a version with a weight above 0")
        self._total = sum(self.weights.values())
        self._credit = dict.fromkeys(self.weights, 0.0)
        self._only = next(iter(self.weights)) if len(self.weights) == 1 else None

    def pick(self) -> int:
        if self._only is not None:
            return self._only
        credit = self._credit
        best, best_credit = 0, float("-inf")
        for version, weight in self.weights.items():
            c = credit[version] + weight
            credit[version] = c
            if c > best_credit:
                best, best_credit = version, c
        credit[best] -= self._total
        return best

    def percentages(self) -> dict[int, float]:
        return {v: 100.0 * w / self._total for v, w in self.weights.items()}
