"""From one inference back to everything behind it: ``kiln why TRACE_ID``.

A span names the immutable model version and run that answered. From there the
store gives: the version (who registered it, its artifact), every promotion that
put it under the alias that routed the answer (who, when, why, under which policy:
the audit event of the move keeps the policy that was checked), and the run
(params, metrics, code commit and patch, datasets with their hashes, environment
and its lock).

The alias that routed the answer is the one of the reference its endpoint served
(``fraud@production``, kept on the span as ``kiln.endpoint.model``). Promotions of
the same version to other aliases (``staging``, ``shadow``) did not put it behind
this answer and are left out. An endpoint pinned to a version (``fraud:3``) was
routed by no alias: the promotions shown are those to the aliases it holds now.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from kiln.errors import NotFoundError, ValidationError
from kiln.observe.tracing import ROUTED_BY
from kiln.record.store.base import KilnStore
from kiln.registry.refs import parse_ref

if TYPE_CHECKING:
    from kiln.registry.models import ModelVersion, RegistryStore

_HEX = frozenset("0123456789abcdef")


def list_spans(
    store: KilnStore,
    *,
    endpoint: str | None = None,
    run_id: str | None = None,
    errors_only: bool = False,
    limit: int | None = 50,
) -> list[dict[str, Any]]:
    """Recorded spans, newest first."""
    return store.list_spans(endpoint=endpoint, run_id=run_id, errors_only=errors_only,
                            limit=limit)  # fmt: skip


def find_trace(store: KilnStore, trace_id: str) -> list[dict[str, Any]]:
    """The spans of one trace, by its id or a unique prefix of it (8 characters or more)."""
    return store.find_trace(trace_id)


def _split_ref(ref: str) -> tuple[str, str | None]:
    """(trace id or prefix, span id or None) from what ``kiln why`` was given."""
    parts = ref.strip().lower().split("-")
    if len(parts) == 4 and len(parts[0]) == 2:  # a whole traceparent: version-trace-span-flags
        parts = parts[1:3]
    if len(parts) == 2 and len(parts[1]) == 16 and set(parts[1]) <= _HEX:
        return parts[0], parts[1]
    return ref, None


def explain(store: KilnStore, trace_id: str) -> dict[str, Any]:
    """Everything behind one inference, as one JSON-able dict (see the module docstring).

    ``trace_id`` is a trace id (or a unique prefix of 8 or more), or the ``traceparent``
    an answer carried (``00-TRACE-SPAN-FLAGS``, or ``TRACE-SPAN``), which names the
    answer's own span: a caller that sends its trace context along makes several
    answers share one trace id, and then only the span says which one is meant."""
    from kiln.registry.models import models_for

    ref, span_id = _split_ref(trace_id)
    trace = find_trace(store, ref)
    answers = [s for s in trace if s["model_name"] or s["endpoint"]] or trace
    if span_id is not None:
        span = next((s for s in trace if s["span_id"] == span_id), None)
        if span is None:
            raise NotFoundError(f"trace {trace[0]['trace_id']} has no span {span_id}")
    elif len(answers) > 1:
        listed = "; ".join(
            f"{s['trace_id']}-{s['span_id']} ({s['name']}, {s['model_name']}:{s['model_version']})"
            for s in answers[:5]
        )
        raise ValidationError(
            "TRACE_ID", f"trace {trace[0]['trace_id']} holds {len(answers)} answers (a caller "
            "sent its trace along); name one by the traceparent it carried, TRACE-SPAN",
            allowed=listed,
        )  # fmt: skip
    else:
        span = answers[0]
    attrs = span["attributes"]
    out: dict[str, Any] = {
        "trace_id": span["trace_id"],
        "span_id": span["span_id"],
        "error": attrs.get("kiln.error"),
        "http_status": attrs.get("http.response.status_code"),
        "span": span["name"],
        "endpoint": span["endpoint"],
        "status": span["status"],
        "at_ns": span["start_ns"],
        "latency_ms": span["duration_ns"] / 1e6,
        "input": attrs.get("input.value"),
        "output": attrs.get("output.value"),
        "kind": attrs.get("openinference.span.kind"),
        "cpu_seconds": attrs.get("kiln.cpu_seconds"),
        "llm": {k: v for k, v in attrs.items() if k.startswith("llm.")},
    }
    name, version = span["model_name"], span["model_version"]
    if name is None or version is None:
        return out
    models = models_for(store, app="", actor="")
    mv = models.get(f"{name}:{version}")
    out["model"] = {
        "ref": mv.ref, "artifact": mv.artifact, "artifact_sha256": mv.artifact_sha256,
        "registered_by": mv.created_by, "registered_at": mv.created_at, "metrics": mv.metrics,
    }  # fmt: skip
    routed_by = attrs.get(ROUTED_BY) or _endpoint_model(store, span["endpoint"])
    out["routed_by"] = routed_by
    out["promotions"] = _promotions(store, models, name, version,
                                    _aliases(models, routed_by, mv))  # fmt: skip
    run = store.get_run(mv.run_id)
    out["run"] = {
        "id": run.id,
        "app": run.app,
        "function": run.function,
        "status": str(run.status),
        "actor": run.actor,
        "created": run.created_at,
        "params": run.params,
        "metrics": run.summary,
        "code": asdict(run.code),
        "inputs": [
            {"name": a.name, "kind": a.kind, "sha256": a.sha256, "size": a.size}
            for a in run.artifacts
            if a.direction == "in"
        ],
        "environment": {
            "python": run.environment.python,
            "env_id": run.environment.env_id,
            "lock_sha256": run.environment.lock_sha256,
            "packages_sha256": run.environment.packages_sha256,
        },
    }
    return out


def _endpoint_model(store: KilnStore, endpoint: str | None) -> str | None:
    """The reference ``endpoint`` serves (for spans older than ``kiln.endpoint.model``)."""
    found = store.endpoint(endpoint) if endpoint else None
    return None if found is None else found.model


def _aliases(models: RegistryStore, routed_by: str | None, mv: ModelVersion) -> set[str]:
    """The aliases whose promotions explain an answer of ``mv``: the one that routed
    it, or, when no alias did, those that hold ``mv`` now."""
    if routed_by:
        name, _, alias = parse_ref(routed_by)
        if alias is not None and name == mv.name:
            return {alias}
    return {alias for alias, version in models.aliases(mv.name).items() if version == mv.version}


def _promotions(
    store: KilnStore, models: RegistryStore, name: str, version: int, relevant: set[str]
) -> list[dict[str, Any]]:
    """Each move of a ``relevant`` alias onto ``version``, with the policy its audit
    event recorded."""
    moves = [m for m in models.history(name) if m.alias in relevant and m.to_version == version]
    out = []
    for move in moves:
        target = f"{name}@{move.alias}"
        policy = None
        for event in store.audit_events(target=target, limit=None):
            payload = event["payload"] or {}
            if isinstance(payload, str):
                payload = json.loads(payload)
            if payload.get("to") == version and abs(event["time"] - move.at) < 1.0:
                policy = payload.get("policy")
                action = event["action"]
                break
        else:
            action = "alias.move"
        out.append({
            "alias": move.alias, "from_version": move.from_version, "by": move.actor,
            "at": move.at, "reason": move.reason, "action": action, "policy": policy,
        })  # fmt: skip
    return out
