"""A Kubernetes Job's one process: ``python -m kiln._k8s_task`` (see kiln.compute.kube).

It reads its task from the team server's blob store by the sha256 in ``KILN_TASK``
(and checks the bytes are that hash), builds the task's env from its recorded lock
if it has one (with uv, in ``KILN_ENVS``: a volume that keeps it for the next pod, if
one is mounted), runs the function as the local engine's workers do, recording
through ``KILN_SERVER`` with ``KILN_TOKEN``, and ends by storing its reply (result,
error, usage) and writing a short account to the termination log, where the driver
reads it from the pod's status::

    {"kiln": 1, "status": "succeeded", "cause": null, "reply": "<sha256>"}

The function's timeout is held here, from its call (the Job's deadline also counts
the pod's start); SIGTERM (a preemption, or the pod deleted) raises kiln.Preempted
in the function. The exit status is 0 only when the function succeeded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from kiln.compute.kube import TERMINATION_LOG

_IN_ENV = "KILN_K8S_IN_ENV"


def main() -> int:
    from kiln.record.store.http import HttpStore

    server, sha = os.environ["KILN_SERVER"], os.environ["KILN_TASK"]
    home = Path(os.environ.get("KILN_HOME") or "/var/kiln/home")
    store = HttpStore(server, cache=home / "cache", token=os.environ.get("KILN_TOKEN"),
                      project=os.environ.get("KILN_PROJECT"))  # fmt: skip
    try:
        data = store.blob_store.read(sha)
        if hashlib.sha256(data).hexdigest() != sha:
            return _account(store, {"status": "failed",
                                    "cause": f"the task read is not {sha}"})  # fmt: skip
        import cloudpickle

        task = cloudpickle.loads(data)
        if task.requirements and not os.environ.get(_IN_ENV):
            return _in_env(store, home, task.requirements)
        return _run(store, task, home)
    finally:
        store.close()


def _in_env(store: Any, home: Path, requirements: str) -> int:
    """Build the task's env from its lock (once per lock in KILN_ENVS, as the local
    engine builds one in its cache), and run this module again in it."""
    from kiln.envs.manager import env_manager

    cache = Path(os.environ.get("KILN_ENVS") or "/var/kiln/envs")
    built = env_manager(home, store.blob_store, cache).from_requirements(requirements)
    os.environ[_IN_ENV] = "1"
    python = str(built.python)
    os.execv(python, [python, "-m", "kiln._k8s_task"])  # noqa: S606  the task's own env
    return 1  # not reached


def _run(store: Any, task: Any, home: Path) -> int:
    from kiln._runner import run_task
    from kiln.compute import _threads
    from kiln.compute._worker import _Functions, _load_failure, _preempted

    server = os.environ["KILN_SERVER"]  # the record: the store is the server's
    store_settings = {**task.store, "home": str(home), "token": os.environ.get("KILN_TOKEN"),
                      "server_url": server, "store_url": server}  # fmt: skip
    if os.environ.get("KILN_PROJECT"):
        store_settings["project"] = os.environ["KILN_PROJECT"]
    task = type(task)(**{**_fields(task), "store": store_settings})
    sys.path.insert(0, str(Path.cwd()))  # the image's code, for functions shipped by reference
    signal.signal(signal.SIGTERM, _preempted)
    _threads.apply(task.threads)
    try:
        fn = _Functions().get(task.fn_key, task.fn_payload)
    except BaseException as exc:
        return _account(store, _load_failure(task, exc))
    on_start = None
    if task.timeout_s is not None:
        timeout = task.timeout_s

        def on_start() -> None:
            def expire() -> None:
                cause = f"timed out after {timeout:g}s"
                _account(store, {"status": "failed", "cause": cause, "error": cause})
                os._exit(1)

            timer = threading.Timer(timeout, expire)
            timer.daemon = True
            timer.start()

    return _account(store, run_task(task, fn, on_start))


def _fields(task: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(task, f.name) for f in dataclasses.fields(task)}


def _account(store: Any, reply: dict[str, Any]) -> int:
    """Store the reply, write the account the driver reads, and the exit status."""
    result = reply.get("result")
    envelope = {
        "status": reply.get("status", "failed"),
        "cause": reply.get("cause"),
        "error": reply.get("error"),
        "usage": reply.get("usage") or {},
        "environment": reply.get("environment"),
        "result": base64.b64encode(result).decode() if result is not None else None,
    }
    sha = store.blob_store.put_bytes(json.dumps(envelope).encode())
    # Short and ASCII whatever the task said (the kubelet keeps 4096 bytes): the cause
    # and the rest are in the reply.
    account = {"kiln": 1, "status": envelope["status"], "reply": sha}
    path = Path(os.environ.get("KILN_TERMINATION_LOG") or TERMINATION_LOG)
    path.write_text(json.dumps(account))
    return 0 if envelope["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
