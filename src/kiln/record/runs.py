"""Recording a run by hand: ``with app.run(...) as run:`` plus ``kiln.log`` and ``kiln.save``."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import resource
import secrets
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from time import time as _now
from types import TracebackType
from typing import TYPE_CHECKING, Any

from kiln._hashing import sha256_file, sha256_tree
from kiln.config import Settings
from kiln.errors import NoActiveRunError, RunNotFoundError, ValidationError
from kiln.record._pickling import dumps
from kiln.record.model import Artifact, ArtifactKind, Direction, RunStatus
from kiln.record.output import FdTee, RunLog, StreamTees
from kiln.record.snapshot import capture_environment
from kiln.record.store.base import MetricRow
from kiln.record.store.rows import ArtifactRow, RunRow, RunUpdate
from kiln.record.values import (
    INT64_MAX,
    INT64_MIN,
    artifact_name,
    check_params,
    check_tags,
    metric_step,
    metric_value,
    result_json,
    summary_of,
    warn_unrecorded,
)

if TYPE_CHECKING:
    from concurrent.futures import Future

    from kiln.record.recorder import Recorder

_log = logging.getLogger("kiln")
_current: contextvars.ContextVar[ActiveRun | None] = contextvars.ContextVar(
    "kiln_current_run", default=None
)
_RSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux
_PKG_DIR = Path(__file__).resolve().parent.parent
# Frames in these files are Kiln's recording machinery, never the user's code.
_MACHINERY = (str(_PKG_DIR / "record"), str(_PKG_DIR / "app.py"))


# Watchers of runs (kiln.observe.sysmetrics): each is called as a run starts in this
# process and may return a function, called as the run ends, whose figures are added
# to the run's usage.
RunWatcher = Callable[["ActiveRun"], Callable[[], dict[str, Any]] | None]
_watchers: list[RunWatcher] = []
# What a watcher may return that is a field of the run, not of its usage.
TRACE_FIELDS = ("trace_id", "span_id")


def watch_runs(watcher: RunWatcher) -> None:
    """Call ``watcher`` as every run of this process starts (once per watcher)."""
    if watcher not in _watchers:
        _watchers.append(watcher)


def new_run_id() -> str:
    """32 lowercase hex characters; any unique prefix of it finds the run."""
    return secrets.token_hex(16)


class ActiveRun:
    """A run being recorded. Use it as a context manager; see :meth:`kiln.App.run`."""

    def __init__(
        self,
        settings: Settings,
        *,
        app: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        name: str | None = None,
        function: str | None = None,
        parent_id: str | None = None,
        module_path: Path | None = None,
        sys_metrics: bool = True,
    ) -> None:
        self.id = new_run_id()
        self.sys_metrics = sys_metrics  # sample how the run uses the machine (sys/...)
        self.app = app
        self.name = name
        self.status = RunStatus.RUNNING
        self.params = check_params(params)
        self.tags = check_tags(tags)
        self.result: Any = None
        self._settings = settings
        self._recorder: Recorder | None = None
        self._function = function
        self._parent_id = parent_id
        self._module_path = module_path
        self._last: dict[str, float] = {}
        self._volatile: set[str] = set()
        self._logged = False
        self._step = 0
        self._token: contextvars.Token[ActiveRun | None] | None = None
        self._peak_rss = 0
        self._maxrss_at_start = 0
        self._t0 = self._cpu0 = 0.0
        self._inputs = [v for v in (params or {}).values() if isinstance(v, Dataset | Artifact)]
        self._code: Future[None] | None = None
        self._stops: list[Callable[[], dict[str, Any]]] = []
        self._rusage0: resource.struct_rusage | None = None
        self.output: RunLog | None = None

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> ActiveRun:
        from kiln.record.recorder import recorder_for

        rec = self._recorder = recorder_for(self._settings)
        now = time.time()
        env = capture_environment(rec.blobs)

        rec.start(
            self,
            RunRow(
                id=self.id,
                app=self.app,
                name=self.name,
                function=self._function,
                status=RunStatus.RUNNING,
                actor=rec.settings.actor,
                host=socket.gethostname(),
                pid=os.getpid(),
                engine="inline",
                parent_id=self._parent_id,
                created_at=now,
                started_at=now,
                heartbeat_at=now,
                params=self.params,
                tags=self.tags,
                environment=asdict(env),
            ),
        )
        # git runs beside the user's code; the record gets it before the run closes
        self._code = rec.capture_code(self.id, self._module_path)
        for dataset in self._inputs:
            self.use(dataset)
        self.output = RunLog(self.id, rec.add_logs)
        StreamTees.enter(_output_of_current_run)
        self._start_clock()
        return self

    def _start_clock(self) -> None:
        """Become the current run and start measuring wall time, CPU time and memory."""
        self._rusage0 = resource.getrusage(resource.RUSAGE_SELF)
        self._maxrss_at_start = self._rusage0.ru_maxrss * _RSS_UNIT
        self._peak_rss = 0
        self.sample_memory()
        self._token = _current.set(self)
        self._t0, self._cpu0 = time.perf_counter(), _cpu_seconds()
        self._stops = [stop for watch in _watchers if (stop := watch(self)) is not None]

    def _stop_clock(self) -> dict[str, Any]:
        """Stop being the current run; return what it used."""
        usage: dict[str, Any] = {
            "wall_s": time.perf_counter() - self._t0,
            "cpu_s": _cpu_seconds() - self._cpu0,
        }
        self.sample_memory()
        usage["peak_rss_bytes"] = self._peak_rss
        if self._rusage0 is not None:  # this process's, from the kernel's own counts
            now = resource.getrusage(resource.RUSAGE_SELF)
            usage["major_faults"] = now.ru_majflt - self._rusage0.ru_majflt
            usage["disk_read_bytes"] = (now.ru_inblock - self._rusage0.ru_inblock) * 512
            usage["disk_write_bytes"] = (now.ru_oublock - self._rusage0.ru_oublock) * 512
        for stop in self._stops:
            try:
                usage.update(stop())
            except Exception as exc:  # a watcher's failure never fails the run
                _log.debug("kiln: a watcher of run %s failed: %s", self.id, exc)
        self._stops = []
        if usage.get("peak_rss_tree_bytes", 0) > usage["peak_rss_bytes"]:
            usage["peak_rss_bytes"] = usage["peak_rss_tree_bytes"]
        if self._token is not None:
            # closed from another context (atexit): there is nothing to restore
            with contextlib.suppress(ValueError):
                _current.reset(self._token)
            self._token = None
        return usage

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            self._finish(RunStatus.SUCCEEDED, None)
        else:
            self._finish(RunStatus.FAILED, "".join(traceback.format_exception(exc)))

    def set_result(self, result: Any) -> None:
        """The run's result. In a dict, numbers (0-d numpy and torch values included)
        become summary metrics. An entry that cannot be recorded is left out of the
        record with a :class:`kiln.errors.RecordingWarning` naming it."""
        self.result, problems = result_json(result)
        warn_unrecorded(problems)

    def abandon(self, reason: str) -> None:
        """Close a run that its code never closed, as failed with ``reason``."""
        if self.status is RunStatus.RUNNING:
            self._finish(RunStatus.FAILED, reason)

    def _finish(self, status: RunStatus, error: str | None) -> None:
        self.status = status  # before the watchers stop: a span ends with it
        usage = self._stop_clock()
        if self.output is not None:
            StreamTees.leave(self.output)
            self.output.close()
        trace = {k: usage.pop(k) for k in TRACE_FIELDS if k in usage}
        returned = summary_of(self.result)
        if returned:
            self._last.update(returned)
            self._logged = True
        if self._code is not None:
            self._code.result()
        self._rec().finish(
            self,
            RunUpdate(
                id=self.id,
                status=status,
                ended_at=time.time(),
                error=error,
                result=self.result,
                usage=usage,
                **trace,
            ),
        )

    def _rec(self) -> Recorder:
        if self._recorder is None:
            raise NoActiveRunError("recording")
        return self._recorder

    def sample_memory(self) -> None:
        """Track the run's peak resident memory (called at start, by the writer, at end)."""
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RSS_UNIT
        if maxrss > self._maxrss_at_start:  # the process set a new peak during this run
            self._peak_rss = max(self._peak_rss, maxrss)
        else:
            self._peak_rss = max(self._peak_rss, _current_rss())

    def record_points(self, rows: list[MetricRow]) -> None:
        """Record metric points that are not the run's own figures (``sys/...``): no
        summary, no step counting."""
        self._rec().add_points(rows)

    def take_summary(self) -> list[tuple[str, str, str, float]]:
        """The latest value per metric, if any were logged since the last call."""
        if not self._logged:
            return []
        self._logged = False  # before the copy, so a concurrent log is never missed
        latest = self._last.copy()  # the training thread may add keys meanwhile
        return [(self.id, self.app, k, v) for k, v in latest.items()]

    # -- recording -----------------------------------------------------------------

    def log(
        self, metrics: Mapping[str, Any], step: int | None = None, *, volatile: bool = False
    ) -> None:
        """Record metric values; see :func:`kiln.log`."""
        # The hot path of training loops: exact-type checks first, full checks after.
        if type(metrics) is not dict and not isinstance(metrics, Mapping):
            raise ValidationError("metrics", f"must be a dict, got {type(metrics).__name__}")
        if volatile is not False:
            self._declare_volatile(metrics, volatile)
        if step is None:
            step = self._step
        if type(step) is not int or not INT64_MIN <= step <= INT64_MAX:
            step = metric_step(step)
        self._step = step + 1
        now = _now()
        run_id = self.id
        rows: list[MetricRow] = []
        last = self._last  # the keys logged before, so checked before
        for key, value in metrics.items():
            if type(value) is not float or key not in last:
                value = metric_value(key, value)
            rows.append((run_id, key, step, now, value))
        for row in rows:
            last[row[1]] = row[4]  # type: ignore[assignment]
        self._logged = True
        self._rec().add_points(rows)

    def _declare_volatile(self, metrics: Mapping[str, Any], volatile: object) -> None:
        """Remember these keys as volatile for the run (on its record at the next flush)."""
        if volatile is not True:
            raise ValidationError(
                "volatile", f"{volatile!r} is not true or false", allowed="True, False"
            )
        new = {k for k in metrics if isinstance(k, str)} - self._volatile
        if new:  # written once per new key, not per call: log() is the hot path
            self._volatile |= new
            self._rec().enqueue(
                updates=[RunUpdate(id=self.id, volatile_metrics=sorted(self._volatile))]
            )

    def save(self, name: str, obj: Any) -> str:
        """Store an artifact; see :func:`kiln.save`. Returns its sha256."""
        name = artifact_name(name)
        blobs = self._rec().blobs
        rows: list[ArtifactRow] = []
        if isinstance(obj, str | os.PathLike):
            path = Path(obj)
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.is_file())
                names = [artifact_name(f"{name}/{f.relative_to(path).as_posix()}") for f in files]
                for f, rel in zip(files, names, strict=True):  # all checked before any is stored
                    sha, size = blobs.put_file(f)
                    rows.append(_artifact_row(self.id, rel, "out", "file", sha, size, str(f)))
                self._rec().enqueue(artifacts=rows)
                return sha256_tree(path)[0]
            if not path.is_file():
                raise ValidationError(
                    "obj",
                    f"no file at {str(path)!r}; pass an existing path, or bytes or an "
                    "object to store its value",
                )
            sha, size = blobs.put_file(path)
            rows.append(_artifact_row(self.id, name, "out", "file", sha, size, str(path)))
        else:
            kind: ArtifactKind
            if isinstance(obj, bytes | bytearray | memoryview):
                data, kind = bytes(obj), "file"
            else:
                try:
                    data, kind = dumps(obj), "pickle"  # equal objects, equal bytes (tensors too)
                except Exception as exc:
                    raise ValidationError(
                        "obj", f"a {type(obj).__name__} cannot be pickled: {exc}"
                    ) from None
            sha, size = blobs.put_bytes(data), len(data)
            rows.append(_artifact_row(self.id, name, "out", kind, sha, size, None))
        self._rec().enqueue(artifacts=rows)
        return sha

    def checkpoint(self, name: str = "checkpoint", default: Any = None) -> Any:
        """What this run last saved as ``name``, in this attempt or an earlier one (a
        preempted or failed one), or ``default`` if it saved nothing under that name."""
        name = artifact_name(name)
        recorder = self._rec()
        recorder.flush()
        try:
            record = recorder.store.get_run(self.id)
        except RunNotFoundError:  # its row is not written yet: its first attempt
            return default
        if not any(a.name == name and a.direction == "out" for a in record.artifacts):
            return default
        return record.load(name)

    def use(self, item: Dataset | Artifact) -> None:
        """Record a dataset, or another run's artifact, as an input of this run."""
        self._rec().enqueue(artifacts=[input_row(self.id, item)])

    def __repr__(self) -> str:
        return f"<ActiveRun {self.id} app={self.app!r} status={self.status}>"


class TaskRun(ActiveRun):
    """A run executing on an engine's worker.

    Its row already exists and the engine writes its state; inside, ``kiln.log``
    and ``kiln.save`` work as in a manual run. The store is opened only if the
    task records something, so a task that logs nothing costs no database work.
    """

    def __init__(
        self, settings: Settings, *, run_id: str, app: str, sys_metrics: bool = True
    ) -> None:
        super().__init__(settings, app=app, sys_metrics=sys_metrics)
        self.id = run_id
        self._usage: dict[str, Any] = {}
        self._tee: FdTee | None = None

    def __enter__(self) -> TaskRun:
        self.output = RunLog(self.id, lambda rows: self._rec().add_logs(rows))
        try:
            self._tee = FdTee.installed()
            self._tee.sink = self.output.add_bytes
        except OSError as exc:  # no descriptors to spare: the run goes on, unlogged
            self._tee = None
            print(f"kiln: the output of run {self.id} is not recorded: {exc}", file=sys.stderr)
        self._start_clock()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.status = RunStatus.SUCCEEDED if exc is None else RunStatus.FAILED
        self._usage = self._stop_clock()
        if self._tee is not None:
            self._tee.drain()
            self._tee.sink = None
        if self.output is not None:
            self.output.close()
        if self._recorder is not None:  # it logged or saved: make that durable now
            self._recorder.finish(self, None)

    def _rec(self) -> Recorder:
        if self._recorder is None:
            from kiln.record.recorder import recorder_for

            self._recorder = recorder_for(self._settings)
            self._recorder.attach(self)
        return self._recorder

    def usage_json(self) -> dict[str, Any]:
        return dict(self._usage)


def _cpu_seconds() -> float:
    """CPU time of this process and of the child processes it has waited for."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class Dataset:
    """A file or directory a run reads, recorded with its sha256.

    Created inside a run, or passed as a param, it is recorded as that run's input::

        with app.run(params={"data": kiln.Dataset("train.csv")}) as run:
            ...
    """

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None) -> None:
        self.path = Path(path).expanduser().absolute()
        if self.path.is_dir():
            self.sha256, self.size = sha256_tree(self.path)
        elif self.path.is_file():
            self.sha256, self.size = sha256_file(self.path)
        else:
            raise ValidationError("path", f"no file or directory at {str(self.path)!r}")
        self.name = name or str(self.path)
        run = _current.get()
        if run is not None:
            run.use(self)

    def __kiln_json__(self) -> dict[str, Any]:
        return {"dataset": str(self.path), "sha256": self.sha256}

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, sha256={self.sha256[:12]}…)"


def _output_of_current_run() -> RunLog | None:
    """Where text written in this context goes: the current run's log, else (a thread
    that carries no context) the newest run open in the process; none for Kiln's own
    threads. An ended run's log takes nothing more."""
    run = _current.get()
    if run is None:
        if threading.current_thread().name.startswith("kiln-"):
            return None
        from kiln.record.recorder import _recorders

        open_runs = [r for rec in list(_recorders.values()) for r in list(rec.active.values())]
        if not open_runs:
            return None
        run = max(open_runs, key=lambda r: r._t0)
    return run.output


def current_run(call: str) -> ActiveRun:
    """The run open in this context, or the only run open in this process (worker threads)."""
    run = _current.get()
    if run is not None:
        return run
    from kiln.record.recorder import _recorders

    open_runs = [r for rec in list(_recorders.values()) for r in list(rec.active.values())]
    if len(open_runs) == 1:
        return open_runs[0]
    raise NoActiveRunError(call)


def log(metrics: Mapping[str, Any], step: int | None = None, *, volatile: bool = False) -> None:
    """Record metrics of the current run.

    ``step`` defaults to one past the previous call's step. Values are numbers
    (numpy and torch 0-d values and one-element arrays included); NaN and
    infinities are kept as such. The call only appends to a buffer: a background
    writer makes it durable within about a second.

    ``volatile=True`` says these metrics are not part of the result (a timing, a
    throughput): they are recorded as usual, and ``kiln reproduce`` shows them but
    leaves them out of its verdict. The mark holds for the run, also for a key of
    the same name in the returned result.

    Example::

        for epoch in range(10):
            kiln.log({"loss": loss, "accuracy": acc}, step=epoch)
        kiln.log({"train_time_s": time.perf_counter() - t0}, volatile=True)
    """
    (_current.get() or current_run("kiln.log")).log(metrics, step, volatile=volatile)


def save(name: str, obj: Any) -> str:
    """Store an artifact of the current run, by content; returns its sha256.

    ``obj`` is a path (a file, or a directory stored file by file), bytes, or any
    picklable object (``run.load(name)`` gives it back).
    """
    return current_run("kiln.save").save(name, obj)


def checkpoint(name: str = "checkpoint", default: Any = None) -> Any:
    """The last object the current run saved as ``name`` with :func:`save`, in any of
    its attempts, or ``default``: how a function resumes after it was preempted.

    Example::

        state = kiln.checkpoint(default={"epoch": 0})
        for epoch in range(state["epoch"], 10):
            train_one_epoch()
            kiln.save("checkpoint", {"epoch": epoch + 1})
    """
    return current_run("kiln.checkpoint").checkpoint(name, default)


def caller_module() -> Path | None:
    """The source file of the nearest caller outside Kiln itself."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_MACHINERY) and not filename.endswith("contextlib.py"):
            path = Path(filename)
            return path if path.is_file() else None
        frame = frame.f_back  # type: ignore[assignment]
    return None


def input_row(run_id: str, item: Dataset | Artifact) -> ArtifactRow:
    """The artifacts-table row recording ``item`` as an input of ``run_id``."""
    if isinstance(item, Dataset):
        return _artifact_row(
            run_id, item.name, "in", "dataset", item.sha256, item.size, str(item.path)
        )
    return _artifact_row(run_id, item.name, "in", item.kind, item.sha256, item.size, item.uri)


def _artifact_row(
    run_id: str,
    name: str,
    direction: Direction,
    kind: ArtifactKind,
    sha: str,
    size: int,
    uri: str | None,
) -> ArtifactRow:
    return ArtifactRow(
        run_id=run_id, name=name, direction=direction, kind=kind, sha256=sha, size=size, uri=uri
    )


def _current_rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:  # noqa: PTH123  cheaper than psutil here
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
