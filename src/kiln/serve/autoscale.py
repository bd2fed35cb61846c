"""How many replicas a pool of one model version should have: a pure policy.

Demand is the number of requests in flight (queued at the front door or being
answered). The pool needs ``ceil(demand / target_concurrency)`` replicas:

- up at once: when the peak demand since the last decision needs more replicas
  than the pool has, it gets them (up to ``max_replicas``) in one step;
- down slowly: the pool shrinks only to the most it needed over the last
  ``idle_timeout`` seconds, so a short lull does not throw warm replicas away;
- to zero: with ``min_replicas=0``, a pool that saw no request for
  ``idle_timeout`` seconds stops its last replica; the next request waits for a
  cold start rather than failing.

It reads no clock: the caller passes ``now``, so tests drive it with any times.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Autoscaler:
    min_replicas: int
    max_replicas: int
    target_concurrency: int
    idle_timeout: float
    since: float = 0.0  # when observing began: nothing shrinks before a whole window
    _needs: deque[tuple[float, int]] = field(default_factory=deque)  # (time, replicas needed)

    def desired(self, *, current: int, peak_inflight: int, now: float) -> int:
        """The replica count for a pool of ``current`` that saw ``peak_inflight`` requests
        in flight at once since the last call."""
        need = math.ceil(peak_inflight / self.target_concurrency)
        self._needs.append((now, need))
        while self._needs[0][0] < now - self.idle_timeout:
            self._needs.popleft()
        if need > current:
            return self._clamp(need)
        window = max(n for _, n in self._needs)
        if window < current and now - self.since >= self.idle_timeout:
            return self._clamp(window)
        return self._clamp(current)

    def _clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))
