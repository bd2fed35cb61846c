"""Runs one task inside an engine worker, as a recorded run. Never raises.

The worker process imports this by name (``kiln._runner:run_task``), so the
compute layer stays free of the record.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cloudpickle

from kiln import _sandboxed
from kiln.compute import _threads
from kiln.compute.backends.base import TaskSpec
from kiln.config import Settings
from kiln.errors import SandboxError
from kiln.govern import sandbox
from kiln.observe import runtrace, sysmetrics
from kiln.record.recorder import recorder_for
from kiln.record.runs import TaskRun, watch_runs
from kiln.record.snapshot import capture_environment

RUNNER = "kiln._runner:run_task"
watch_runs(sysmetrics.watch)
watch_runs(runtrace.watch)
_environment: dict[str, Any] | None = None  # the last environment sent back


def run_task(
    task: TaskSpec,
    fn: Callable[..., Any] | None,
    on_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run ``fn`` with the task's arguments as the task's run; the reply says how it
    ended. ``on_start`` is called just before ``fn``: a timeout counts from there. A
    sandboxed task (``fn`` None) runs in a confined child instead (kiln._sandboxed)."""
    settings = Settings(
        home=Path(task.store["home"]),
        store_url=task.store["store_url"],
        actor=task.store.get("actor", "unknown"),
        server_url=task.store.get("server_url"),
        project=task.store.get("project"),
        token=task.store.get("token"),
    )
    reply: dict[str, Any] = {"run_id": task.run_id, "attempt": task.attempt}
    threads = _threads.in_effect()  # as the task starts (its code may change them)
    sys_metrics = task.store.get("sys_metrics") != "off"
    run = TaskRun(settings, run_id=task.run_id, app=task.app, sys_metrics=sys_metrics)
    try:
        with runtrace.remote_parent(task.store.get("traceparent")), run:
            result = _call(task, fn, run, on_start, reply)
        reply["result"] = cloudpickle.dumps(result)
        reply["status"] = "succeeded"
    except _sandboxed.Failed as exc:  # the child's own account (text, never pickled)
        reply["status"] = "failed"
        reply["error"], reply["cause"] = exc.error, exc.cause
    except BaseException as exc:  # the user's error travels back; the worker carries on
        reply["status"] = "failed"
        reply["error"] = "".join(traceback.format_exception(exc))
        reply["cause"] = "".join(traceback.format_exception_only(exc)).strip()
    reply["usage"] = run.usage_json()
    # Sent with the worker's first reply and when it changes (engines keep the last).
    global _environment
    if _environment is None or _environment["threads"] != threads:
        environment = asdict(capture_environment(recorder_for(settings).blobs))
        _environment = reply["environment"] = {**environment, "threads": threads}
    return reply


def _call(
    task: TaskSpec,
    fn: Callable[..., Any] | None,
    run: TaskRun,
    on_start: Callable[[], None] | None,
    reply: dict[str, Any],
) -> Any:
    if task.sandbox is None and fn is not None:
        args, kwargs = cloudpickle.loads(task.args_payload)
        if on_start is not None:
            on_start()
        return fn(*args, **kwargs)
    detected = sandbox.detect()
    reply["sandbox"] = {"layers": [], "bubblewrap": detected.bubblewrap}
    if task.sandbox is None:
        raise _sandboxed.Failed("the task has no function and no sandbox")
    try:
        detected.check(sandbox.Sandbox.from_json(task.sandbox))
    except SandboxError as exc:  # refused before anything of the task is loaded
        raise _sandboxed.Failed(f"SandboxError: {exc}") from None
    return _sandboxed.call(task, run, on_start, reply["sandbox"])
