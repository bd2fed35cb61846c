"""Sweeps: many runs of one function under one parent record.

``Function.sweep`` returns a :class:`Sweep` at once, while its runs queue and run
(as ``spawn`` does); everything that reads its results (``wait``, ``results``,
``best``, ``table``, ``records``) waits for them first. The parent record ends
when its last run does: succeeded when every run did, cancelled when any run was
cancelled (Ctrl-C while waiting cancels the rest), failed otherwise.
``resume`` runs again, under the same parent, the runs that did not succeed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compute.backends.base import Outcome
from kiln.errors import NotFoundError, ValidationError
from kiln.observe import runtrace
from kiln.record.model import RunRecord, RunStatus
from kiln.record.store.base import RunQuery, Store, WriteBatch
from kiln.record.store.rows import RunUpdate

if TYPE_CHECKING:
    from rich.console import RenderableType

    from kiln._engine import Call, Engine
    from kiln.config import Settings
    from kiln.function import Function, Run
    from kiln.record.store.base import KilnStore

# How long an interrupted wait gives the cancelled runs to be recorded as such.
CANCEL_GRACE_S = 10.0
# How long wait() waits, once every run has ended, for the sweep's own end to be written.
RECORD_WAIT_S = 30.0
# The tag a resumed run carries: the id of the run it takes the place of.
RESUMES = "resumes"
_OUTCOMES = ("succeeded", "failed", "cancelled")


class _Tally:
    """Counts a sweep's runs as they end; the last one to end writes the sweep's end."""

    def __init__(
        self, engine: Engine, sweep_id: str, pending: int, succeeded: int = 0, span: Any = None
    ) -> None:
        self._engine = engine
        self._span = span  # the sweep's OpenTelemetry span, ended with it (runtrace)
        self._sweep_id = sweep_id
        self._pending = pending
        self._counts: Counter[str] = Counter(succeeded=succeeded)
        self._lock = threading.Lock()
        self.ended = threading.Event()
        if pending == 0:
            self.ended.set()

    def run_done(self, _call: Call, outcome: Outcome) -> None:
        """Engine callback (its writer thread), once a run's end is recorded."""
        status = outcome.status if outcome.status in ("succeeded", "cancelled") else "failed"
        with self._lock:
            self._counts[status] += 1
            self._pending -= 1
            last = self._pending == 0
        if last:
            try:
                end = self._end()
                self._engine.recorder.store.write(WriteBatch(updates=[end]))
            finally:
                if self._span is not None:
                    runtrace.end(self._span, ok=end.status is RunStatus.SUCCEEDED,
                                 error=end.error)  # fmt: skip
                self.ended.set()

    def _end(self) -> RunUpdate:
        counts = self._counts
        total = sum(counts.values())
        if counts["cancelled"]:
            status = RunStatus.CANCELLED
        elif counts["failed"]:
            status = RunStatus.FAILED
        else:
            status = RunStatus.SUCCEEDED
        missed = [f"{counts[s]} {s}" for s in _OUTCOMES[1:] if counts[s]]
        error = f"{' and '.join(missed)} of {total} runs" if missed else None
        return RunUpdate(
            id=self._sweep_id,
            status=status,
            ended_at=time.time(),
            result={"runs": total, **{s: counts[s] for s in ("succeeded", "failed", "cancelled")}},
            error=error,
        )


class Sweep:
    """A group of runs under one parent record: what ``Function.sweep`` returns.

    It returns at once; the runs queue and run in the background. ``wait()`` blocks
    until they end (with a progress bar on a terminal), and every method that reads
    results (``results``, ``best``, ``table``, ``records``) waits first. Ctrl-C while
    waiting cancels the runs still queued or running, records the sweep as
    cancelled and re-raises ``KeyboardInterrupt``; ``resume()`` runs the rest later.

    Example::

        sweep = train.sweep(kiln.grid(lr=[0.1, 0.01], depth=[3, 5]), data=ds)
        sweep.wait()                                 # progress: done / failed
        best = sweep.best("accuracy")                # a RunRecord
        front = kiln.pareto(sweep.records(), maximize=["accuracy"], minimize=["latency"])
    """

    def __init__(
        self,
        sweep_id: str,
        runs: list[Run[Any]],
        engine: Engine,
        *,
        function: Function[..., Any] | None = None,
        calls: list[dict[str, Any]] | None = None,
        tally: _Tally | None = None,
    ) -> None:
        self.id = sweep_id
        self.runs = runs
        self._engine = engine
        self._function = function
        self._calls = calls  # each run's keyword arguments, for resume()
        self._tally = tally

    # -- waiting and stopping ----------------------------------------------------------

    def wait(self, timeout: float | None = None) -> Sweep:
        """Block until every run has ended and the sweep's record says so, or ``timeout``
        seconds pass. On a terminal a progress bar counts the runs done and failed.

        Ctrl-C (``KeyboardInterrupt``) cancels the runs still queued or running, marks
        the sweep cancelled, and is re-raised; ``resume()`` re-runs what did not succeed.
        """
        futures = [r._future for r in self.runs]
        try:
            with _progress(self.id, futures):
                done, _ = concurrent.futures.wait(futures, timeout)
                if len(done) == len(futures) and self._tally is not None:
                    # Bounded: if the store refused a run's end, nobody writes the sweep's.
                    self._tally.ended.wait(
                        RECORD_WAIT_S if timeout is None else min(timeout, RECORD_WAIT_S)
                    )
        except KeyboardInterrupt:
            self._interrupted()
            raise
        return self

    def cancel(self) -> None:
        """Stop the sweep: queued runs are withdrawn, running ones killed. The sweep is
        recorded as cancelled once they have ended (``wait()`` for that)."""
        for run in self.runs:
            if not run._future.done():
                run.cancel()

    def _interrupted(self) -> None:
        self.cancel()
        # Give the cancellations a moment to be recorded, so the sweep is left
        # "cancelled" rather than "running"; a second Ctrl-C stops waiting.
        with contextlib.suppress(KeyboardInterrupt):
            concurrent.futures.wait([r._future for r in self.runs], CANCEL_GRACE_S)
            if self._tally is not None:
                self._tally.ended.wait(CANCEL_GRACE_S)
        done = sum(1 for r in self.runs if r._future.done() and not r._future.cancelled()
                   and r._future.result().status == "succeeded")  # fmt: skip
        print(
            f"kiln: interrupted: sweep {self.id[:8]} cancelled ({done} of {len(self.runs)} runs "
            f"succeeded); sweep.resume() or `kiln runs resume {self.id[:8]}` re-runs the rest",
            file=sys.stderr,
        )

    # -- results -----------------------------------------------------------------------

    def results(self, *, return_exceptions: bool = False) -> list[Any]:
        """Every run's result, in order. A failure raises, unless ``return_exceptions``."""
        from kiln.errors import RunFailed

        self.wait()
        out = []
        for run in self.runs:
            try:
                out.append(run.result())
            except RunFailed as exc:
                if not return_exceptions:
                    raise
                out.append(exc)
        return out

    def records(self) -> list[RunRecord]:
        """The records of the sweep's runs (each as it ended), in grid order, once all
        have ended: what ``kiln.pareto`` and friends take."""
        self.wait()
        found = self._store.query_runs(_children(self.id, "created"))
        by_id = {r.id: r for r in found}
        return [by_id[run.id] for run in self.runs if run.id in by_id]

    def best(self, metric: str, mode: str = "max") -> RunRecord:
        """The succeeded run with the highest (``mode="max"``) or lowest summary ``metric``.

        Waits for the sweep first. Ties go to the run created first, which is the one
        earlier in the grid (a resumed run counts from when it was resumed), then to
        the smaller id: the same sweep always gives the same answer. Runs with no value
        (or NaN) for ``metric`` are never chosen.
        """
        if mode not in ("max", "min"):
            raise ValidationError("mode", f"{mode!r} is not a mode", allowed=["max", "min"])
        self.wait()
        order = f"-{metric}" if mode == "max" else metric
        query = _children(self.id, order, limit=1, status=(RunStatus.SUCCEEDED,))
        found = self._store.query_runs(query)
        if not found or metric not in found[0].summary:
            raise NotFoundError(f"no succeeded run of sweep {self.id} has the metric {metric!r}")
        return found[0]

    def table(self) -> list[dict[str, Any]]:
        """One row per run (id, status, params, summary metrics), in grid order.
        ``pandas.DataFrame(sweep.table())`` makes a frame of it."""
        return [
            {"id": rec.id, "status": str(rec.status), **rec.params, **rec.summary}
            for rec in self.records()
        ]

    def record(self) -> RunRecord:
        """The sweep's own (parent) record as stored now."""
        return self._store.get_run(self.id)

    # -- resuming ----------------------------------------------------------------------

    def resume(self) -> Sweep:
        """Run again, with the same arguments and under the same sweep, every run that
        did not succeed (failed, cancelled, timed out or lost). Returns at once, like
        ``Function.sweep``; ``self.runs`` then holds the new runs in place of the old.

        The runs that did not succeed stay in the record; each new run is tagged
        ``resumes`` with the id of the run it takes the place of. Raises if runs of
        the sweep are still queued or running (``wait()`` or ``cancel()`` first).
        """
        if self._function is None or self._calls is None:
            raise ValidationError("sweep", f"sweep {self.id} was not started by a kiln function")
        self.wait()
        todo = [i for i, run in enumerate(self.runs) if run.status is not RunStatus.SUCCEEDED]
        new = _resubmit(
            self._function,
            self.id,
            replaces=[self.runs[i].id for i in todo],
            calls=[self._calls[i] for i in todo],
            succeeded=len(self.runs) - len(todo),
        )
        for i, run in zip(todo, new.runs, strict=True):
            self.runs[i] = run
        self._tally = new._tally
        return self

    @property
    def _store(self) -> Store:
        return self._engine.recorder.store

    def __rich__(self) -> RenderableType:
        from rich.table import Table

        rows = self.table()
        table = Table(title=f"sweep {self.id[:8]}", header_style="bold")
        columns = list(dict.fromkeys(k for row in rows for k in row))
        for col in columns:
            table.add_column(col, justify="left" if col in ("id", "status") else "right")
        for row in rows:
            table.add_row(*(_cell(row.get(c)) for c in columns))
        return table

    def __repr__(self) -> str:
        return f"<Sweep {self.id[:8]} of {len(self.runs)} runs>"


def _resubmit(
    function: Function[..., Any],
    sweep_id: str,
    *,
    replaces: list[str],
    calls: list[dict[str, Any]],
    succeeded: int,
) -> Sweep:
    """Submit ``calls`` again under the existing sweep, reopened until they end."""
    from kiln._engine import engine_for

    engine = engine_for(function.app.settings)
    tally = _Tally(engine, sweep_id, len(calls), succeeded=succeeded)
    if calls:
        reopen = RunUpdate(id=sweep_id, status=RunStatus.RUNNING, ended_at=None, error=None,
                           result=None)  # fmt: skip
        engine.recorder.store.write(WriteBatch(updates=[reopen]))
        try:
            runs = function._submit(
                [((), kw) for kw in calls],
                parent_id=sweep_id,
                on_done=tally.run_done,
                each_tags=[{RESUMES: old} for old in replaces],
            )
        except BaseException as exc:  # nothing was started: the sweep is closed again
            failed = RunUpdate(id=sweep_id, status=RunStatus.FAILED, ended_at=time.time(),
                               error=f"resuming failed: {exc}")  # fmt: skip
            engine.recorder.store.write(WriteBatch(updates=[failed]))
            raise
    else:
        runs = []
    return Sweep(sweep_id, runs, engine, function=function, calls=calls, tally=tally)


def resume_sweep(sweep_id: str, settings: Settings) -> tuple[Sweep | None, int]:
    """Resume a recorded sweep from its record (``kiln runs resume``): the function is
    imported from its recorded ``module:qualname`` (the code as it is now, found from
    the recorded module's folder), the arguments are read back from each run's params.

    Returns the sweep, holding only the re-submitted runs (None when every run had
    succeeded: nothing is done), and how many runs the sweep has in all.
    """
    from kiln.record.recorder import recorder_for

    store = recorder_for(settings, create=False).store
    sweep = store.get_run(sweep_id)
    if sweep.tags.get("kind") != "sweep":
        raise ValidationError("SWEEP", f"run {sweep.id} is not a sweep")
    current = _current_runs(store.query_runs(_children(sweep.id, "created")))
    busy = [r.id for r in current if not r.status.terminal]
    if busy:
        raise ValidationError(
            "SWEEP", f"sweep {sweep.id} still has {len(busy)} runs queued or running "
            f"(first: {busy[0]}); wait for them or cancel them first",
        )  # fmt: skip
    todo = [r for r in current if r.status is not RunStatus.SUCCEEDED]
    if not todo:
        return None, len(current)
    function = _import_function(todo[0])
    calls = [_arguments(r, store) for r in todo]
    resumed = _resubmit(
        function, sweep.id, replaces=[r.id for r in todo], calls=calls,
        succeeded=len(current) - len(todo),
    )  # fmt: skip
    return resumed, len(current)


def _current_runs(children: Sequence[RunRecord]) -> list[RunRecord]:
    """A sweep's runs, less those another run has since taken the place of (resumed)."""
    replaced = {r.tags.get(RESUMES) for r in children}
    return [r for r in children if r.id not in replaced]


def _arguments(record: RunRecord, store: KilnStore) -> dict[str, Any]:
    from kiln.reproduce import ReproduceError
    from kiln.reproduce import _arguments as recorded_arguments

    try:
        kwargs, _ = recorded_arguments(record, store, allow_data_drift=False)
    except ReproduceError as exc:
        raise ValidationError("SWEEP", f"run {record.id} cannot be resumed: {exc}") from None
    return kwargs


def _import_function(record: RunRecord) -> Function[..., Any]:
    """The recorded function, as its code is now: imported by module name, or loaded
    from the recorded file for a script (``__main__``). Only a kiln function is resumed."""
    from kiln.function import Function

    module_name, _, qualname = (record.function or "").partition(":")
    if not module_name or not qualname:
        raise ValidationError("SWEEP", f"run {record.id} records no function to run again")
    module_path = record.code.module_path
    root = _import_root(module_name, module_path)
    if root is not None and root not in sys.path:
        sys.path.insert(0, root)  # so the workers find the module too (see _code_paths)
    if module_name == "__main__":
        obj = _from_file(record, module_path)
    else:
        try:
            obj = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValidationError(
                "SWEEP", f"cannot import {module_name!r} to resume {record.function}: {exc}"
            ) from None
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
    if not isinstance(obj, Function):
        raise ValidationError("SWEEP", f"{record.function} is no longer a kiln function")
    function: Function[..., Any] = obj
    return function


def _from_file(record: RunRecord, module_path: str | None) -> Any:
    """A script's function, loaded from the file as it is now (not run as __main__)."""
    from kiln.reproduce import ReproduceError, _load

    if module_path is None or not Path(module_path).is_file():
        raise ValidationError(
            "SWEEP", f"{record.function} was defined in a script that is gone ({module_path})"
        )
    try:
        function = _load(record, Path(module_path))
    except ReproduceError as exc:
        raise ValidationError("SWEEP", str(exc)) from None
    function.name = record.function or function.name  # the same function, recorded as such
    return function


def _import_root(module_name: str, module_path: str | None) -> str | None:
    """The folder from which ``module_name`` imports, given the file it was loaded from."""
    if module_path is None:
        return None
    path = Path(module_path)
    depth = 0 if module_name == "__main__" else module_name.count(".")
    if path.name == "__init__.py":
        depth += 1
    return str(path.parents[depth]) if depth < len(path.parents) else None


def _children(
    sweep_id: str,
    order_by: str,
    *,
    limit: int | None = None,
    status: tuple[RunStatus, ...] = (),
) -> RunQuery:
    return RunQuery(parent_id=sweep_id, status=status, order_by=order_by, limit=limit)


@contextlib.contextmanager
def _progress(sweep_id: str, futures: list[concurrent.futures.Future[Outcome]]) -> Iterator[None]:
    """A progress bar on a terminal (stderr) counting runs done and failed; else nothing."""
    if not sys.stderr.isatty() or all(f.done() for f in futures):
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("sweep {task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("done, {task.fields[failed]} failed"), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    )  # fmt: skip
    task = progress.add_task(sweep_id[:8], total=len(futures), failed=0)
    failed = [0]
    lock = threading.Lock()

    def advance(future: concurrent.futures.Future[Outcome]) -> None:
        ok = future.exception() is None and future.result().status == "succeeded"
        with lock:
            failed[0] += not ok
            progress.update(task, advance=1, failed=failed[0])

    with progress:
        for future in futures:
            future.add_done_callback(advance)
        yield


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and len(value) == 32:
        return value[:8]
    return str(value)


def check_spec(spec: Sequence[Mapping[str, Any]], fixed: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The keyword arguments of each run: ``fixed`` plus one item of ``spec`` each."""
    if isinstance(spec, Mapping) or not isinstance(spec, Sequence) or not spec:
        raise ValidationError("spec", "must be a non-empty list of dicts (see kiln.grid)")
    calls = []
    for i, item in enumerate(spec):
        if not isinstance(item, Mapping):
            raise ValidationError(f"spec[{i}]", f"{item!r} is not a dict of arguments")
        clash = sorted(set(item) & set(fixed))
        if clash:
            raise ValidationError(
                f"spec[{i}].{clash[0]}",
                "is also given as a fixed argument of the sweep; give it in one place",
            )
        calls.append({**fixed, **item})
    return calls
