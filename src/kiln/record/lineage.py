"""Lineage: which runs made what, and which runs used it.

Runs and artifacts (datasets included) are the nodes; artifacts are named by their
sha256. A run *consumed* what it read and *produced* what it saved, so a file one
run saves and another reads, whether passed as a ``kiln.Artifact`` or hashed
again as a ``kiln.Dataset``, links the two runs by its hash alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Edge = tuple[str, str, Literal["consumed", "produced"]]  # (from, to, kind)


@dataclass
class Lineage:
    """The graph around ``root`` (a run id or an artifact sha256), up and down."""

    root: str
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> app, function, status
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # sha -> name, kind, size
    edges: list[Edge] = field(default_factory=list)

    def upstream(self, node: str) -> list[str]:
        """What ``node`` came from: a run's inputs, an artifact's producers."""
        return sorted({src for src, dst, _ in self.edges if dst == node})

    def downstream(self, node: str) -> list[str]:
        """What came from ``node``: a run's outputs, an artifact's consumers."""
        return sorted({dst for src, dst, _ in self.edges if src == node})

    def label(self, node: str) -> str:
        if node in self.runs:
            r = self.runs[node]
            what = r.get("name") or r.get("function") or "manual run"
            return f"run {node[:8]} {r.get('app')}/{what} ({r.get('status')})"
        a = self.artifacts[node]
        name = a["name"].rsplit("/", 1)[-1] if a["kind"] == "dataset" else a["name"]
        return f"{a['kind']} {name} sha256:{node[:12]} ({a['size']:,} B)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "runs": self.runs,
            "artifacts": self.artifacts,
            "edges": [{"from": s, "to": d, "kind": k} for s, d, k in self.edges],
        }

    def to_dot(self) -> str:
        """Graphviz: runs as boxes, artifacts as ellipses, edges in the direction data flows."""
        lines = ["digraph lineage {", "  rankdir=LR;"]
        for run_id in self.runs:
            lines.append(f'  "{run_id}" [shape=box, label="{self.label(run_id)}"];')
        for sha in self.artifacts:
            lines.append(f'  "{sha}" [shape=ellipse, label="{self.label(sha)}"];')
        for src, dst, kind in self.edges:
            lines.append(f'  "{src}" -> "{dst}" [label="{kind}"];')
        lines.append("}")
        return "\n".join(lines) + "\n"
