"""Every error Kiln raises on purpose derives from :class:`KilnError`.

The tree::

    KilnError
    ├── ConfigError            a setting (environment variable or argument) is invalid
    ├── ValidationError        a value passed to the API is invalid; names the field
    ├── MissingDependencyError an optional extra is not installed; names the extra
    ├── NotFoundError          a run (or other record) id matches nothing
    │   └── RunNotFoundError
    ├── AmbiguousIdError       an id prefix matches more than one record
    ├── NoActiveRunError       kiln.log / kiln.save called outside a run
    ├── RunFailed              a run on an engine failed, timed out, was cancelled or lost
    ├── EnvError               a declared environment cannot be resolved or built
    ├── DependencyError        a record cannot be removed: others depend on it
    ├── SandboxError           the machine cannot give the sandbox asked for; names the layer
    └── StoreError             the metadata store or blob store cannot be used
        ├── StoreUnavailableError  cannot connect (server down, wrong URL, missing file)
        ├── StoreCorruptError      the store exists but is not a usable Kiln store
        └── StoreRefusedError      a write was refused for what it holds, not for the store

One warning, :class:`RecordingWarning`, says that part of a value (an entry of a
run's result) was left out of the record; the caller still gets the value.

Each error carries the context needed to act on it as attributes (``field``,
``allowed``, ``run_id``, ``url``) and a message that says what to do.
"""

from __future__ import annotations

from collections.abc import Iterable


class KilnError(Exception):
    """Root of every error Kiln raises on purpose."""


class ConfigError(KilnError):
    """A setting, from the environment or an argument, is invalid."""

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {message}")


class ValidationError(KilnError, ValueError):
    """A value passed to Kiln is invalid. ``field`` names it; ``allowed`` says what would do."""

    def __init__(self, field: str, message: str, *, allowed: str | Iterable[str] | None = None):
        self.field = field
        if allowed is not None and not isinstance(allowed, str):
            allowed = ", ".join(allowed)
        self.allowed = allowed
        text = f"{field}: {message}"
        if allowed:
            text += f" (allowed: {allowed})"
        super().__init__(text)


class MissingDependencyError(KilnError, ImportError):
    """An optional dependency is missing; the message names the extra that provides it."""

    def __init__(self, package: str, extra: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            f"{package} is not installed; it comes with the '{extra}' extra: "
            f"pip install 'kiln[{extra}]'"
        )


class AccessDeniedError(KilnError, PermissionError):
    """A team server refused the caller: no valid token (401), or a role without the
    permission (403). ``status`` says which."""

    status: int = 401


class NotFoundError(KilnError, LookupError):
    """A record looked up by id does not exist."""


class RunNotFoundError(NotFoundError):
    """No run has this id (or id prefix)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"no run with id {run_id!r}; `kiln runs ls` lists the recorded runs")


class AmbiguousIdError(KilnError, LookupError):
    """An id prefix matches more than one record."""

    def __init__(self, prefix: str, matches: list[str], *, kind: str = "runs") -> None:
        self.prefix = prefix
        self.matches = matches
        shown = ", ".join(matches[:5])
        super().__init__(f"id prefix {prefix!r} matches several {kind} ({shown}); give more of it")


class NoActiveRunError(KilnError, RuntimeError):
    """``kiln.log`` or ``kiln.save`` was called with no run open."""

    def __init__(self, call: str) -> None:
        super().__init__(
            f"{call} was called outside a run; open one with `with app.run(...):` "
            "or call it from a Kiln function"
        )


class RunFailed(KilnError):
    """A run did not succeed. ``run_id``, ``status`` and the remote ``traceback`` say why."""

    def __init__(self, run_id: str, status: str, cause: str, traceback: str | None = None):
        self.run_id = run_id
        self.status = status
        self.cause = cause
        self.traceback = traceback
        super().__init__(f"run {run_id} {status}: {cause}")

    def __str__(self) -> str:
        text = super().__str__()
        if self.traceback:
            text += "\n\nremote traceback:\n" + self.traceback.rstrip()
        return text


class Preempted(KeyboardInterrupt):
    """Raised in a running function when its run is preempted: its quota went to work
    that ranks above it (see ``kiln explain``). The function has a grace period to save
    a checkpoint with ``kiln.save`` before it is killed; the run waits, and its next
    attempt reads the checkpoint back with ``kiln.checkpoint()``. A ``KeyboardInterrupt``
    (what Ray raises in a task it stops), so ``except Exception`` does not swallow it."""


class EnvError(KilnError):
    """A declared environment could not be resolved or built; ``detail`` is uv's own account.

    ``run_ids`` are the runs recorded as failed at the environment stage because of it.
    """

    def __init__(self, message: str, detail: str = "", run_ids: list[str] | None = None):
        self.detail = detail.strip()
        self.run_ids = run_ids or []
        super().__init__(message + (f"\n{self.detail}" if self.detail else ""))


class DependencyError(KilnError):
    """A record cannot be removed while others depend on it; ``dependants`` names them."""

    def __init__(self, what: str, dependants: list[str]) -> None:
        self.dependants = dependants
        shown = "; ".join(dependants[:10]) + ("; …" if len(dependants) > 10 else "")
        super().__init__(f"{what} cannot be removed: {shown}")


class SandboxError(KilnError):
    """A sandbox was asked for that this machine cannot give: ``layer`` names the missing
    protection and ``reason`` says why. The run is refused, never run unprotected."""

    def __init__(self, layer: str, reason: str) -> None:
        self.layer = layer
        self.reason = reason
        super().__init__(f"the sandbox cannot be given here: {layer}: {reason}")


class StoreError(KilnError):
    """The metadata store or the blob store cannot be used."""

    def __init__(self, url: str, message: str) -> None:
        self.url = url
        super().__init__(f"store {url}: {message}")


class StoreUnavailableError(StoreError):
    """The store cannot be reached or does not exist."""


class StoreCorruptError(StoreError):
    """The store exists but is not a usable Kiln store."""


class StoreRefusedError(StoreError):
    """A write was refused for the data it holds (a value out of a column's range, a
    constraint); written again it would be refused again, unlike a store that is down."""


class RecordingWarning(UserWarning):
    """Part of a run's result cannot be recorded (say, a tensor with many elements).

    Issued at the call that gives back the result; the entry is left out of the
    record (its place holds ``"<type, not recorded>"``) and the caller still gets it.
    """
