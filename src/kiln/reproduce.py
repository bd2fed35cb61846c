"""Re-run a recorded run exactly: its code, its params, its data, its environment lock.

The code comes from the recorded commit plus the stored patch (a temporary git
worktree) or, without git, from the stored module source. Datasets are hashed
again and must match, unless data drift is allowed. The new run is tagged
``reproduced_from`` and compared with the original: params, each summary metric,
each artifact's hash, and a verdict. Nondeterminism is reported, not hidden.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kiln.app import App
from kiln.config import Settings
from kiln.errors import KilnError, RunFailed, ValidationError
from kiln.function import Function
from kiln.record.model import Artifact, RunRecord
from kiln.record.resolve import RunLike, resolve_run
from kiln.record.runs import Dataset

Verdict = Literal["identical", "within tolerance", "different", "failed"]


class ReproduceError(KilnError):
    """A run cannot be reproduced; the message says what is missing or changed."""


_log = logging.getLogger("kiln")


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "original": self.original,
            "reproduction": self.reproduction,
            "params_identical": self.params_identical,
            "metrics": {
                k: {"old": _j(o), "new": _j(n), "delta": _j(d)}
                for k, (o, n, d) in self.metrics.items()
            },
            "artifacts": {
                k: {"old": o, "new": n, "equal": o == n} for k, (o, n) in self.artifacts.items()
            },
            "data_drift": self.data_drift,
            "environment_differs": self.environment_differs,
            "rtol": self.rtol,
            "verdict": self.verdict,
        }


def _j(value: float | None) -> float | str | None:
    return value if value is None or math.isfinite(value) else repr(value)


def reproduce(
    run_id: RunLike,
    *,
    settings: Settings | None = None,
    allow_data_drift: bool = False,
    rtol: float = 0.0,
) -> Comparison:
    """Re-run ``run_id`` and compare. Raises :class:`ReproduceError` if it cannot be re-run."""
    if not rtol >= 0:
        raise ValidationError("rtol", f"{rtol!r} is not a tolerance", allowed="a number >= 0")
    settings = settings or Settings.from_env()
    from kiln.record.recorder import recorder_for

    store = recorder_for(settings, create=False).store
    original = resolve_run(run_id, store, field="run_id", ended=True)  # a handle, record or id
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
        run = function._submit([((), kwargs)], tags={"reproduced_from": original.id})[0]
        with contextlib.suppress(RunFailed):  # compared below: a failure is a result too
            run.result()
    result = compare(original, run.record(), rtol=rtol, drift=drift)
    # The verdict goes on the reproduction's record: promotion policies look for it.
    from kiln.record.store.base import WriteBatch

    tags = {**run.record().tags, "reproduce_verdict": result.verdict}
    store.write(WriteBatch(updates=[{"id": run.id, "tags": tags}]))
    return result


def compare(
    original: RunRecord, new: RunRecord, *, rtol: float = 0.0, drift: list[str] | None = None
) -> Comparison:
    """Params, summary metrics and artifact hashes of two runs, with a verdict."""
    metrics: dict[str, tuple[float | None, float | None, float | None]] = {}
    close = exact = True
    for key in sorted(set(original.summary) | set(new.summary)):
        old, now = original.summary.get(key), new.summary.get(key)
        delta = None if old is None or now is None else now - old
        metrics[key] = (old, now, delta)
        same = old == now or (
            old is not None and now is not None and math.isnan(old) and math.isnan(now)
        )
        exact &= same
        close &= same or (
            old is not None and now is not None and math.isclose(old, now, rel_tol=rtol)
        )
    outputs = {a.name: a.sha256 for a in original.artifacts if a.direction == "out"}
    new_outputs = {a.name: a.sha256 for a in new.artifacts if a.direction == "out"}
    artifacts = {n: (outputs.get(n), new_outputs.get(n)) for n in sorted(outputs | new_outputs)}
    hashes_equal = all(o == n for o, n in artifacts.values())
    params_identical = original.params == new.params
    verdict: Verdict
    if str(new.status) != "succeeded" and str(original.status) == "succeeded":
        verdict = "failed"
    elif exact and hashes_equal and params_identical:
        verdict = "identical"
    elif close and params_identical and rtol > 0:
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
    )


def _arguments(
    record: RunRecord, store: Any, allow_data_drift: bool
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


def _artifact(store: Any, name: str, sha256: str) -> Artifact:
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
    sys.path.insert(0, str(module_file.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ReproduceError(
            f"the recorded code of run {record.id} does not import: {exc}"
        ) from exc
    finally:
        sys.path.remove(str(module_file.parent))
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ReproduceError(f"the recorded code has no {qualname!r}")
    if isinstance(obj, Function):
        return obj
    return App(record.app).function()(obj)


def _environment(record: RunRecord, settings: Settings) -> Any:
    env = record.environment
    if not env.env_id or not env.lock_sha256:
        return None  # it ran in the caller's interpreter; compared after the run
    from kiln.envs.manager import env_manager
    from kiln.record.recorder import recorder_for

    manager = env_manager(settings.home, recorder_for(settings).blobs)
    return manager.from_lock(env.env_id, env.lock_sha256)
