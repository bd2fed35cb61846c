"""Anything that names a run, made into its record: one resolver for every API taking a run.

A run can be named by its live handle (``kiln.Run`` from ``spawn()``, a ``kiln.Sweep``),
by its record (``kiln.RunRecord``) or by its id or a unique prefix of it. Every
public call that takes a run (``app.models.register``, ``kiln.get_run``,
``kiln.runs(parent=...)``, ``kiln.reproduce``) goes through :func:`resolve_run`, so
they all accept the same things and refuse anything else with the same error.
"""

from __future__ import annotations

from typing import Protocol, TypeAlias, runtime_checkable

from kiln.errors import ValidationError
from kiln.record.model import RunRecord, RunStatus
from kiln.record.store.base import Store

ALLOWED = ("a kiln.Run or kiln.Sweep", "the run of `with app.run() as run`", "a kiln.RunRecord",
           "a run id or a unique prefix of it")  # fmt: skip


@runtime_checkable
class RunHandle(Protocol):
    """A run this process started: its id at once, its record once written."""

    id: str

    def wait(self, timeout: float | None = None) -> object:
        """Block until the run ends."""

    def record(self) -> RunRecord:
        """The run's record as stored now (waits until its row is written)."""


RunLike: TypeAlias = RunHandle | RunRecord | str


def resolve_run(run: object, store: Store, *, field: str = "run", ended: bool = False) -> RunRecord:
    """The record of ``run``: a handle, a record, or an id (or unique id prefix).

    With ``ended``, a live handle is waited for until its run ends, so the record
    holds its result and artifacts (what registering a model needs). Raises
    :class:`~kiln.errors.ValidationError` naming ``field`` for anything else, and
    ``RunNotFoundError`` / ``AmbiguousIdError`` for an id that names no single run.
    """
    if isinstance(run, RunRecord):
        return run
    if isinstance(run, str):
        return store.get_run(run)
    if isinstance(run, RunHandle):
        if ended:
            run.wait()
        return run.record()
    from kiln.record.runs import ActiveRun

    if isinstance(run, ActiveRun):  # `with app.run() as run`: written when its block ends
        if ended and run.status is RunStatus.RUNNING:
            raise ValidationError(field, f"run {run.id[:8]} is still being recorded; use it "
                                  "after its `with` block ends")  # fmt: skip
        return store.get_run(run.id)
    shown = repr(run)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise ValidationError(field, f"{type(run).__name__} {shown} is not a run", allowed=ALLOWED)
