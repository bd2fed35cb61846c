"""The audit log: every mutating action, appended as a hash-chained event.

An event is (seq, time, actor, action, target, payload, payload_sha256, prev_hash,
hash) with ``hash = sha256(seq, time, actor, action, target, payload_sha256,
prev_hash)``. Changing, removing or reordering any event breaks the chain from
there on. The store appends events in the same transaction as the writes they
describe, so nothing is written without its event.

Actions: ``run.create``, ``run.end``, ``artifact.save`` (written with the data) and
``run.seal``: after a run ends, a digest of its metric points, summary and
artifacts, so that later edits to them are found by :func:`verify`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.record.store.rows import ArtifactRow, RunRow, RunUpdate

GENESIS = "0" * 64
TERMINAL = ("succeeded", "failed", "cancelled", "lost")


@dataclass(frozen=True, slots=True)
class Event:
    action: str
    target: str
    payload: Mapping[str, Any]
    time: float
    actor: str


@dataclass(frozen=True, slots=True)
class Problem:
    """Where verification failed, and why."""

    seq: int | None
    message: str


def canonical(payload: Any) -> str:
    """JSON with sorted keys and no spaces; non-finite numbers as strings."""
    return json.dumps(_finite(payload), sort_keys=True, separators=(",", ":"), default=str)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def chain_hash(
    seq: int, time: float, actor: str, action: str, target: str, payload_sha: str, prev: str
) -> str:
    line = f"{seq}\n{time!r}\n{actor}\n{action}\n{target}\n{payload_sha}\n{prev}"
    return hashlib.sha256(line.encode()).hexdigest()


def chain(events: Iterable[Event], last_seq: int, last_hash: str) -> list[dict[str, Any]]:
    """Rows for ``events``, numbered and chained after (last_seq, last_hash)."""
    rows = []
    seq, prev = last_seq, last_hash
    for e in events:
        seq += 1
        text = canonical(e.payload)
        payload_sha = sha256_text(text)
        digest = chain_hash(seq, e.time, e.actor, e.action, e.target, payload_sha, prev)
        rows.append({
            "seq": seq, "time": e.time, "actor": e.actor, "action": e.action,
            "target": e.target, "payload": text, "payload_sha256": payload_sha,
            "prev_hash": prev, "hash": digest,
        })  # fmt: skip
        prev = digest
    return rows


def events_for_writes(
    new_runs: list[RunRow],
    updates: list[RunUpdate],
    artifacts: list[ArtifactRow],
    *,
    actor: str,
    now: float,
    imported: bool = False,
) -> list[Event]:
    """The events a batch of writes implies: runs created, runs ended, artifacts saved.
    Imported runs are created by ``actor`` (who imported them), not by whom they claim."""
    events = []
    for row in new_runs:
        payload = row.model_dump(mode="json", include=_CREATED)
        who = actor if imported else row.actor or actor
        events.append(Event("run.create", row.id, payload, now, who))
        if row.status.terminal:  # created already ended (an env failure)
            events.append(Event("run.end", row.id, _end(row), now, who))
    for update in updates:
        if update.status is not None and update.status.terminal:
            events.append(Event("run.end", update.id, _end(update), now, actor))
    for art in artifacts:
        payload = art.model_dump(include={"name", "direction", "kind", "sha256", "size"})
        events.append(Event("artifact.save", art.run_id, payload, now, actor))
    return events


_CREATED = {"app", "function", "status", "params", "tags", "parent_id", "engine", "code"}


def _end(row: RunRow | RunUpdate) -> dict[str, Any]:
    return {
        "status": str(row.status),
        "result": row.result,
        "error_sha256": sha256_text(row.error) if row.error else None,
    }


# A run's own fields that cannot change once it has ended; tags (labels, such as a
# reproduction's verdict) and its heartbeat may.
SEALED_RUN_FIELDS = (
    "id", "app", "name", "function", "status", "actor", "host", "pid", "engine", "parent_id",
    "created_at", "started_at", "ended_at", "params", "result", "error", "code", "environment",
    "usage", "attempt", "resources", "volatile_metrics",
)  # fmt: skip
SEALED_PARTS = {
    "metrics": "its metrics", "summary": "its summary", "artifacts": "its artifacts",
    "run": "its record (params, status, actor, code, environment or result)",
    "logs": "its output (logs)",
}  # fmt: skip


def seal_payload(
    metrics: Iterable[tuple[str, int, float, float | None]],
    summary: Mapping[str, float | None],
    artifacts: Iterable[tuple[str, str, str, int]],
    run: Mapping[str, Any] | None = None,
    logs: Iterable[tuple[float, str, str]] = (),
) -> dict[str, Any]:
    """Digests of a run's data as stored: its metric points (by key, step, time),
    its summary, its artifacts and its own fields (:data:`SEALED_RUN_FIELDS`).
    Recomputed by :func:`verify` from the same rows. Its logs are (time, stream, text)
    chunks in their order."""
    digest = hashlib.sha256()
    count = 0
    for key, step, t, value in metrics:
        digest.update(f"{key}\t{step}\t{t!r}\t{value!r}\n".encode())
        count += 1
    return {
        "metric_points": count,
        "metrics_sha256": digest.hexdigest(),
        "summary_sha256": sha256_text(canonical(dict(sorted(summary.items())))),
        "artifacts_sha256": sha256_text(canonical(sorted(list(a) for a in artifacts))),
        "run_sha256": sha256_text(canonical(run or {})),
        "logs_sha256": sha256_text(canonical([list(chunk) for chunk in logs])),
    }


def _project_of(payload: str) -> str:
    """The project an event's payload names (outside the default project, the store
    adds it, so that it is hashed with the event)."""
    if '"project"' in payload:  # cheap: most payloads do not mention one
        found = json.loads(payload)
        if isinstance(found, dict) and isinstance(found.get("project"), str):
            return str(found["project"])
    return "default"


def verify_chain(rows: Iterator[tuple[Any, ...]]) -> Iterator[Problem]:
    """Check numbering, links, payload hashes and event hashes, in order; and, for rows
    that carry their project (a tenth column), that it is the one their payload names."""
    expected_seq, prev = 1, GENESIS
    for seq, time, actor, action, target, payload, payload_sha, prev_hash, digest, *rest in rows:
        if rest and rest[0] != _project_of(payload):
            yield Problem(seq, f"event {seq} ({action} {target}) was moved to project "
                          f"{rest[0]!r}")  # fmt: skip
            return
        if seq != expected_seq:
            yield Problem(expected_seq, f"event {expected_seq} is missing (next is {seq})")
            return
        if prev_hash != prev:
            yield Problem(seq, f"event {seq} does not follow event {seq - 1}: the chain is broken")
            return
        if sha256_text(payload) != payload_sha:
            yield Problem(seq, f"event {seq} ({action} {target}): its payload was changed")
            return
        if chain_hash(seq, time, actor, action, target, payload_sha, prev_hash) != digest:
            yield Problem(seq, f"event {seq} ({action} {target}) was changed")
            return
        prev = digest
        expected_seq += 1
