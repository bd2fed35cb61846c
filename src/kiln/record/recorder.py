"""One recorder per process and store: the store connection, the blob store and the
background writer that turns ``kiln.log`` calls into batched inserts.

``kiln.log`` only appends tuples to an in-memory list. The writer thread flushes
that list in one transaction when it grows past ``FLUSH_POINTS`` or every
``FLUSH_INTERVAL_S``, whichever comes first, and on run end and at interpreter
exit. A process killed outright therefore loses at most one interval of points.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.config import Settings, make_home
from kiln.errors import StoreRefusedError, StoreUnavailableError
from kiln.record.model import LIVE_STATUSES, RunStatus
from kiln.record.snapshot import CodeCapture
from kiln.record.store.base import WRITE_PARTS, LogRow, MetricRow, RunQuery, Store, WriteBatch
from kiln.record.store.rows import ArtifactRow, RunRow, RunUpdate

if TYPE_CHECKING:
    from kiln.record.runs import ActiveRun

FLUSH_INTERVAL_S = 1.0
START_LINGER_S = 0.02  # a run's start waits this long for more to send with it (a server)
FLUSH_POINTS = 50_000
# A run owned by a process on another host is lost once its heartbeat is this old.
LOST_AFTER_S = 300.0
_log = logging.getLogger("kiln")
_WHAT = {
    "new_runs": "the run's row", "metrics": "a metric point", "summaries": "a summary value",
    "artifacts": "an artifact row", "updates": "an update of the run", "seal": "its seal",
    "warnings": "a warning", "logs": "a chunk of its output",
}  # fmt: skip


class Recorder:
    """Owns the store for one process and writes everything recorded into it."""

    def __init__(self, settings: Settings, *, create: bool = True) -> None:
        self.settings = settings
        from kiln.record.store import open_store

        if create:
            make_home(settings.home)
        self.store = open_store(settings, create=create)
        self.blobs = self.store.blob_store
        try:
            mark_lost_runs(self.store)
        except StoreUnavailableError as e:
            if not getattr(self.store, "remote", False):
                raise
            # A server that is down: runs still start and record into the spool.
            _log.warning("kiln: %s; runs left open by dead processes are closed later", e)
        self.code = CodeCapture(self.blobs, exclude=(settings.home, settings.cache))
        self.active: dict[str, ActiveRun] = {}
        self._points: list[MetricRow] = []
        self._pending = WriteBatch()
        self._to_seal: list[str] = []  # ended runs, sealed in the audit log off the hot path
        self._send_by: float | None = None  # a run's start is due out by then (monotonic)
        # guards _points, _pending and active; re-entrant: a signal handler may print
        self._lock = threading.RLock()
        self._flush_lock = threading.Lock()  # one flush at a time
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._code_pool: ThreadPoolExecutor | None = None

    # -- called by runs ------------------------------------------------------------

    def add_points(self, rows: list[MetricRow]) -> None:
        with self._lock:
            self._points.extend(rows)
            full = len(self._points) >= FLUSH_POINTS
        if full:
            self._wake.set()

    def add_logs(self, rows: list[LogRow]) -> None:
        with self._lock:
            self._pending.logs.extend(rows)

    def enqueue(
        self,
        *,
        artifacts: list[ArtifactRow] | None = None,
        updates: list[RunUpdate] | None = None,
        summaries: list[tuple[str, str, str, float]] | None = None,
    ) -> None:
        with self._lock:
            self._pending.artifacts.extend(artifacts or ())
            self._pending.updates.extend(updates or ())
            self._pending.summaries.extend(summaries or ())

    def start(self, run: ActiveRun, row: RunRow) -> None:
        """Write the run's row now, so other processes see it running at once. To a
        server, the writer sends it at once, off the caller's path (a run that ends
        first goes in the same batch as its end: one round trip instead of two)."""
        if getattr(self.store, "remote", False):
            with self._lock:
                self._pending.new_runs.append(row)
                self.active[run.id] = run
                if self._send_by is None:
                    self._send_by = time.monotonic() + START_LINGER_S
            self._ensure_thread()
            self._wake.set()  # to wait until _send_by, not the whole interval
            return
        self.store.write(WriteBatch(new_runs=[row]))
        with self._lock:
            self.active[run.id] = run
        self._ensure_thread()

    def capture_code(self, run_id: str, module_path: Path | None) -> Future[None]:
        """Snapshot the code in the background and queue it onto the run's row."""
        with self._lock:
            if self._code_pool is None:
                self._code_pool = ThreadPoolExecutor(2, thread_name_prefix="kiln-code")
            pool = self._code_pool

        def job() -> None:
            snapshot = self.code.capture(module_path)
            self.enqueue(updates=[RunUpdate(id=run_id, code=asdict(snapshot))])

        return pool.submit(job)

    def attach(self, run: ActiveRun) -> None:
        """Record for a run whose row another process (the engine) wrote."""
        with self._lock:
            self.active[run.id] = run
        self._ensure_thread()

    def finish(self, run: ActiveRun, update: RunUpdate | None) -> None:
        """Write the run's last points and final state (if given) in one transaction."""
        with self._lock:
            self.active.pop(run.id, None)
            if update is not None:
                self._pending.updates.append(update)
            self._pending.summaries.extend(run.take_summary())
        self.flush()
        if update is not None:  # the run has ended here (a worker's runs end in the engine)
            self.seal_later([run.id])

    def seal_later(self, run_ids: list[str]) -> None:
        """Seal these ended runs in the audit log at the next background flush."""
        with self._lock:
            self._to_seal.extend(run_ids)
        self._ensure_thread()

    # -- flushing ------------------------------------------------------------------

    def flush(self, *, seal: bool = False) -> None:
        """Make everything recorded so far durable (and, with ``seal``, seal ended runs).
        Raises if the store refuses it."""
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, WriteBatch()
                batch.metrics, self._points = self._points, []
                self._send_by = None
                if seal:
                    batch.seal, self._to_seal = self._to_seal, []
                for run in self.active.values():
                    batch.summaries.extend(run.take_summary())
            self._write(batch)

    def _write(self, batch: WriteBatch) -> None:
        """Write ``batch``. Rows the store refuses for what they hold are found by
        bisection and dropped, with a warning on their run; every other row is stored.
        If the store itself fails, what is not yet written is queued again, in order."""
        todo = [batch]  # a stack: the next piece to write is last
        while todo:
            piece = todo.pop()
            try:
                self.store.write(piece)
            except StoreRefusedError as exc:
                halves = piece.halves()
                if halves is None:
                    self._drop(piece, exc)
                else:
                    todo += reversed(halves)
            except BaseException:
                for rest in (*todo, piece):  # each goes in front of the one before
                    self._requeue(rest)
                raise

    def _drop(self, row: WriteBatch, exc: StoreRefusedError) -> None:
        """Give up on one row the store refuses, and say so on its run."""
        part = next(p for p in WRITE_PARTS if getattr(row, p))
        value = getattr(row, part)[0]
        if isinstance(value, ArtifactRow):
            run_id = value.run_id
        elif isinstance(value, RunRow | RunUpdate):
            run_id = value.id
        else:
            run_id = value if isinstance(value, str) else value[0]
        message = f"{_WHAT[part]} was not stored: {str(exc).split(': ', 1)[-1]}"
        _log.warning("kiln: run %s: %s", run_id, message)
        if part not in ("new_runs", "warnings"):  # else there is no run, or no way, to tell
            with self._lock:
                self._pending.warnings.append((run_id, message))

    def _requeue(self, batch: WriteBatch) -> None:
        # Put the batch back in front of whatever arrived meanwhile, so a later
        # flush retries it in order and nothing recorded is dropped.
        with self._lock:
            self._points[:0] = batch.metrics
            p = self._pending
            p.new_runs[:0], p.artifacts[:0] = batch.new_runs, batch.artifacts
            p.updates[:0], p.summaries[:0] = batch.updates, batch.summaries
            p.warnings[:0], p.logs[:0] = batch.warnings, batch.logs
            self._to_seal[:0] = batch.seal

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="kiln-writer", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(self._next_flush_s())
            self._wake.clear()
            if self._closed:
                return
            with self._lock:
                due = self._send_by
                lingering = due is not None and time.monotonic() < due
                if lingering and len(self._points) < FLUSH_POINTS:
                    continue
            now = time.time()
            with self._lock:
                runs = list(self.active.values())
            for run in runs:
                run.sample_memory()
            if runs:
                self.enqueue(updates=[RunUpdate(id=r.id, heartbeat_at=now) for r in runs])
            try:
                self.flush(seal=True)
            except Exception as exc:  # keep the points; the next flush retries
                _log.warning("kiln: flushing to %s failed, will retry: %s", self.store.url, exc)

    def _next_flush_s(self) -> float:
        with self._lock:
            due = self._send_by
        return FLUSH_INTERVAL_S if due is None else max(0.0, due - time.monotonic())

    def close(self) -> None:
        """Finish open runs as failed, flush, stop the writer and close the store."""
        with self._lock:
            still_open = list(self.active.values())
        for run in still_open:
            run.abandon("the process exited while the run was open")
        self._closed = True
        self._wake.set()
        if self._code_pool is not None:
            self._code_pool.shutdown(wait=True)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            self.flush(seal=True)
        finally:
            self.store.close()


def mark_lost_runs(store: Store) -> int:
    """Close, as lost, the open runs whose owning process is gone. Returns how many.

    On this host a run's owner is gone when its pid no longer exists; elsewhere when
    its heartbeat is older than ``LOST_AFTER_S``.
    """
    host, now = socket.gethostname(), time.time()
    updates: list[RunUpdate] = []
    query = RunQuery(status=LIVE_STATUSES, limit=None)
    for run in store.query_runs(query):
        if run.host == host and run.pid is not None:
            if pid_alive(run.pid):
                continue
            cause = f"lost: its process (pid {run.pid} on {host}) ended without closing it"
        elif run.heartbeat_at is not None and now - run.heartbeat_at > LOST_AFTER_S:
            cause = f"lost: no heartbeat from {run.host} since {run.heartbeat_at:.0f}"
        else:
            continue
        ended = run.heartbeat_at or run.created_at
        updates.append(RunUpdate(id=run.id, status=RunStatus.LOST, error=cause, ended_at=ended))
    if updates:
        store.write(WriteBatch(updates=updates))
    return len(updates)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


_recorders: dict[tuple[str, str, str | None, str | None], Recorder] = {}
_registry_lock = threading.Lock()


def recorder_for(settings: Settings, *, create: bool = True) -> Recorder:
    """The process's recorder for this store, opened on first use."""
    # A task's own token (on Ray) is part of the key: two drivers' tasks on one worker
    # never record through each other's.
    key = (settings.record_url, str(settings.home), settings.project, settings.token)
    with _registry_lock:
        rec = _recorders.get(key)
        if rec is None:
            rec = Recorder(settings, create=create)
            _recorders[key] = rec
        return rec


def close_all() -> None:
    """Flush and close every recorder of this process (runs at interpreter exit)."""
    with _registry_lock:
        recs = list(_recorders.values())
        _recorders.clear()
    for rec in recs:
        try:
            rec.close()
        except Exception as exc:
            _log.warning("kiln: closing %s failed: %s", rec.store.url, exc)


def _forget_in_child() -> None:
    # A forked child inherits the parent's recorders but not their writer threads;
    # it must open its own connections rather than share the parent's.
    _recorders.clear()


atexit.register(close_all)
os.register_at_fork(after_in_child=_forget_in_child)
