"""Re-run a recorded run exactly: its code, its params, its data, its environment lock.

The code comes from the recorded commit plus the stored patch (a temporary git
worktree) or, without git, from the stored module source. Datasets are hashed
again and must match, unless data drift is allowed. The new run is tagged
``reproduced_from`` and compared with the original: params, each summary metric,
each artifact's hash, and a verdict (:mod:`kiln.record.compare`). Nondeterminism is
reported, not hidden; metrics that are not part of the result (declared volatile,
or named in ``ignore_metrics``) are shown but left out of the verdict.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.app import App
from kiln.config import Settings
from kiln.errors import KilnError, RunFailed
from kiln.function import Function
from kiln.observe import runtrace
from kiln.record.compare import Comparison, Verdict, check_metric_names, check_rtol, compare
from kiln.record.model import Artifact, RunRecord
from kiln.record.resolve import RunLike, resolve_run
from kiln.record.runs import Dataset

if TYPE_CHECKING:
    from kiln.record.store.base import KilnStore

__all__ = ["Comparison", "ReproduceError", "Verdict", "compare", "reproduce"]


class ReproduceError(KilnError):
    """A run cannot be reproduced; the message says what is missing or changed."""


_log = logging.getLogger("kiln")


def reproduce(
    run_id: RunLike,
    *,
    settings: Settings | None = None,
    allow_data_drift: bool = False,
    rtol: float = 0.0,
    ignore_metrics: Iterable[str] = (),
    trust: bool = False,
) -> Comparison:
    """Re-run ``run_id`` and compare. Raises :class:`ReproduceError` if it cannot be re-run.

    Metrics in ``ignore_metrics``, and those the run declared volatile, are shown in
    the comparison but left out of its verdict. A run imported from a bundle runs
    someone else's code: it is refused unless ``trust`` is given.
    """
    rtol = check_rtol(rtol)
    ignore = check_metric_names(ignore_metrics, "ignore_metrics")
    settings = settings or Settings.from_env()
    from kiln.record.recorder import recorder_for

    store = recorder_for(settings, create=False).store
    original = resolve_run(run_id, store, field="run_id", ended=True)  # a handle, record or id
    imported = store.audit_events(action="run.import", target=original.id, limit=1)
    if imported and not trust:
        signed = json.loads(imported[0]["payload"]).get("signed_by")
        raise ReproduceError(
            f"run {original.id} came from a bundle (" + (f"signed by key {signed}" if signed
            else "unsigned") + "): reproducing it runs its code here; pass --trust "
            "(trust=True) if you trust that code"
        )  # fmt: skip
    if not original.function:
        raise ReproduceError(
            f"run {original.id} was recorded by hand (app.run), not by a function: "
            "only runs of kiln functions can be reproduced"
        )
    kwargs, drift = _arguments(original, store, allow_data_drift)
    with _source(original) as module_file:
        function = _load(original, module_file)
        function._locked_env = _environment(original, settings)
        # The same OMP_NUM_THREADS & co. as the original: thread counts change the
        # order of floating-point sums, so results too.
        function._threads = dict(original.environment.threads)
        span = runtrace.start(f"reproduce {original.id}", {"kiln.reproduce.of": original.id})
        with runtrace.current(span):  # the reproduction's run is its child
            run = function._submit([((), kwargs)], tags={"reproduced_from": original.id})[0]
        with contextlib.suppress(RunFailed):  # compared below: a failure is a result too
            run.result()
    result = compare(original, run.record(), rtol=rtol, drift=drift, ignore=ignore)
    if span is not None:
        span.set_attributes({runtrace.RUN_ID: run.id, "kiln.reproduce.verdict": result.verdict})
        runtrace.end(span, ok=True)
    # The verdict goes on the reproduction's record: promotion policies look for it,
    # with what it was reached under (a policy may insist on its own terms).
    from kiln.record.store.base import WriteBatch
    from kiln.record.store.rows import RunUpdate

    tags = {**run.record().tags, "reproduce_verdict": result.verdict}
    if ignore:
        tags["reproduce_ignored"] = ",".join(sorted(set(ignore)))
    if rtol:
        tags["reproduce_rtol"] = repr(rtol)
    store.write(WriteBatch(updates=[RunUpdate(id=run.id, tags=tags)]))
    return result


def _arguments(
    record: RunRecord, store: KilnStore, allow_data_drift: bool
) -> tuple[dict[str, Any], list[str]]:
    kwargs: dict[str, Any] = {}
    drift: list[str] = []
    for name, value in record.params.items():
        if isinstance(value, str) and value.startswith("<") and value.endswith("not recorded>"):
            raise ReproduceError(
                f"param {name!r} was not recorded ({value}): it cannot be given again"
            )
        if isinstance(value, dict) and set(value) == {"dataset", "sha256"}:
            path = Path(value["dataset"])
            if not path.exists():
                raise ReproduceError(f"dataset {name!r} is gone: no file at {path}")
            dataset = Dataset(path)
            if dataset.sha256 != value["sha256"]:
                if not allow_data_drift:
                    raise ReproduceError(
                        f"dataset {name!r} ({path}) changed since the run: sha256 "
                        f"{value['sha256'][:12]} then, {dataset.sha256[:12]} now "
                        "(--allow-data-drift to run anyway)"
                    )
                drift.append(name)
            kwargs[name] = dataset
        elif isinstance(value, dict) and set(value) == {"artifact", "sha256"}:
            kwargs[name] = _artifact(store, value["artifact"], value["sha256"])
        else:
            kwargs[name] = value
    return kwargs, drift


def _artifact(store: KilnStore, name: str, sha256: str) -> Artifact:
    graph = store.lineage(sha256)
    info = graph.artifacts.get(sha256)
    if info is None:
        raise ReproduceError(f"artifact {name!r} ({sha256[:12]}) is not in this store")
    return Artifact(name, "in", info["kind"], sha256, info["size"])


@contextlib.contextmanager
def _source(record: RunRecord) -> Iterator[Path]:
    """The recorded module file, from the fullest record of the code there is: a temporary
    git worktree at the recorded commit with the patch applied; in a repository with no
    commits, the patch alone (it holds the whole tree); else the stored module source."""
    code = record.code
    blobs = record._blobs
    if blobs is None or code.module_path is None:
        raise ReproduceError(f"run {record.id} has no recorded code")
    with tempfile.TemporaryDirectory(prefix="kiln-reproduce-") as tmp:
        if code.commit and code.repo_root and Path(code.repo_root).is_dir():
            worktree = Path(tmp) / "code"
            _git(code.repo_root, "worktree", "add", "--detach", str(worktree), code.commit)
            try:
                if code.patch_sha256:
                    patch = Path(tmp) / "changes.patch"
                    patch.write_bytes(blobs.read(code.patch_sha256))
                    _git(str(worktree), "apply", "--binary", str(patch))
                yield worktree / Path(code.module_path).relative_to(code.repo_root)
            finally:
                _git(code.repo_root, "worktree", "remove", "--force", str(worktree))
        elif tree := _tree_without_commits(record, Path(tmp)):
            yield tree
        elif code.source_blob:
            _log.warning("kiln: %s; reproducing from its recorded module source", _why(record))
            module = Path(tmp) / Path(code.module_path).name
            module.write_bytes(blobs.read(code.source_blob))
            yield module
        else:
            raise ReproduceError(
                f"run {record.id}'s code cannot be recovered: {_why(record)}, "
                "and its module source was not stored"
            )


def _tree_without_commits(record: RunRecord, tmp: Path) -> Path | None:
    """The module in the tree as it was, rebuilt from the patch of a repository that had
    no commits (a patch against the empty tree); None if there is no such patch."""
    code, blobs = record.code, record._blobs
    if code.commit or not code.patch_sha256 or not code.repo_root or blobs is None:
        return None
    tree = tmp / "code"
    tree.mkdir()
    patch = tmp / "changes.patch"
    patch.write_bytes(blobs.read(code.patch_sha256))
    try:
        _git(str(tree), "init", "-q")
        _git(str(tree), "apply", "--binary", str(patch))
    except (ReproduceError, OSError) as exc:
        _log.warning("kiln: the patch of run %s does not apply (%s)", record.id, exc)
        return None
    module = tree / Path(code.module_path or "").relative_to(code.repo_root)
    if not module.is_file():
        return None
    _log.warning(
        "kiln: %s; reproducing from its recorded patch (the whole tree as it was, "
        "untracked files left out of the patch excepted)", _why(record)
    )  # fmt: skip
    return module


def _why(record: RunRecord) -> str:
    """What is missing to check out a run's code at its commit."""
    code = record.code
    if code.repo_root is None:
        return f"run {record.id} was recorded outside a git repository"
    if code.commit is None:
        return f"run {record.id} was recorded in a repository with no commits ({code.repo_root})"
    return f"run {record.id}'s repository {code.repo_root} is gone"


def _git(cwd: str, *args: str) -> None:
    proc = subprocess.run(["git", "-C", cwd, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ReproduceError(f"git {args[0]} failed: {proc.stderr.strip()}")


def _load(record: RunRecord, module_file: Path) -> Function[..., Any]:
    """The recorded function, from the recorded source, under a fresh module name (so a
    version of the module already imported here is not used); shipped by value."""
    _, _, qualname = (record.function or "").partition(":")
    name = f"kiln_reproduce_{record.id[:12]}"
    spec = importlib.util.spec_from_file_location(name, module_file)
    if spec is None or spec.loader is None:
        raise ReproduceError(f"cannot load {module_file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    root = str(_import_root(record, module_file))
    sys.path.insert(0, root)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ReproduceError(
            f"the recorded code of run {record.id} does not import: {exc}"
        ) from exc
    finally:
        sys.path.remove(root)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ReproduceError(f"the recorded code has no {qualname!r}")
    if isinstance(obj, Function):
        return obj
    return App(record.app).function()(obj)


def _import_root(record: RunRecord, module_file: Path) -> Path:
    """The folder the recorded module was imported from: for ``pkg.model`` the one above
    ``pkg/``, so ``from pkg.helper import K`` finds the recorded ``pkg``, not today's."""
    module = (record.function or "").partition(":")[0]
    depth = module.count(".") if module and module != "__main__" else 0
    if module_file.name == "__init__.py":
        depth += 1
    return module_file.parents[depth] if depth < len(module_file.parents) else module_file.parent


def _environment(record: RunRecord, settings: Settings) -> Any:
    env = record.environment
    if not env.env_id or not env.lock_sha256:
        return None  # it ran in the caller's interpreter; compared after the run
    from kiln.envs.manager import env_manager
    from kiln.record.recorder import recorder_for

    manager = env_manager(settings.home, recorder_for(settings).blobs)
    return manager.from_lock(env.env_id, env.lock_sha256)
