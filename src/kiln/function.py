"""Functions with declared resources, run and recorded by the engine.

Example::

    app = kiln.App("fraud")

    @app.function(cpu=1, memory="1Gi", gpu=0.5, timeout=600, retries=1)
    def train(lr: float, depth: int = 3) -> dict:
        ...
        return {"accuracy": acc}

    train.remote(lr=0.1)                                    # run it once, on the engine
    sweep = train.sweep(kiln.grid(lr=[0.1, 0.01], depth=[3, 5]))
    best = sweep.best("accuracy")
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import hashlib
import inspect
import io
import itertools
import os
import pickle
import socket
import sys
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, ParamSpec, TypeVar

import cloudpickle

from kiln._engine import Call, Engine, engine_for
from kiln._sweep import Sweep as Sweep  # re-exported: kiln.Sweep
from kiln._sweep import _Tally, check_spec
from kiln.compute.backends.base import Outcome, TaskSpec
from kiln.compute.paths import code_paths as _code_paths
from kiln.compute.resources import Resources, detect_inventory
from kiln.config import Settings, server_token
from kiln.errors import EnvError, RunFailed, ValidationError
from kiln.govern.sandbox import Sandbox, forced
from kiln.observe import runtrace
from kiln.record.model import Artifact, CodeSnapshot, RunRecord, RunStatus
from kiln.record.runs import ActiveRun, Dataset, input_row, new_run_id
from kiln.record.snapshot import capture_environment
from kiln.record.store.rows import RunRow
from kiln.record.values import result_json, to_json, warn_unrecorded

if TYPE_CHECKING:
    from kiln.app import App
    from kiln.envs.manager import Locked, Materialized
    from kiln.record.lineage import Lineage

P = ParamSpec("P")
R = TypeVar("R")
_HOST = socket.gethostname()


def grid(**axes: Iterable[Any]) -> list[dict[str, Any]]:
    """Every combination of the given values, as a list of keyword dicts.

    Example::

        kiln.grid(lr=[0.1, 0.01], depth=[3, 5])   # 4 dicts
    """
    values = {}
    for name, options in axes.items():
        if isinstance(options, str | bytes) or not isinstance(options, Iterable):
            raise ValidationError(f"grid.{name}", "must be a list of values")
        values[name] = list(options)
        if not values[name]:
            raise ValidationError(f"grid.{name}", "is empty")
    return [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]


class Run(Generic[R]):
    """A run on the engine. ``result()`` blocks; ``cancel()`` stops it."""

    def __init__(self, run_id: str, engine: Engine, future: concurrent.futures.Future[Outcome]):
        self.id = run_id
        self._engine = engine
        self._future = future

    @property
    def status(self) -> RunStatus:
        if self._future.done():
            return RunStatus(self._future.result().status)
        live = self._engine.status(self.id)
        return live if live is not None else self.record().status

    def result(self, timeout: float | None = None) -> R:
        """The function's return value. Raises :class:`kiln.errors.RunFailed` if it failed,
        was cancelled or timed out, and ``TimeoutError`` if ``timeout`` passes first."""
        try:
            outcome = self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"run {self.id} did not finish within {timeout}s") from None
        if outcome.status != "succeeded" or outcome.result is None:
            raise RunFailed(self.id, outcome.status, outcome.cause or "failed", outcome.error)
        value: R = cloudpickle.loads(outcome.result)
        warn_unrecorded(result_json(value)[1])  # what the engine left out of the record
        return value

    def wait(self, timeout: float | None = None) -> RunStatus:
        """Block until the run ends (or ``timeout`` passes); return its status."""
        concurrent.futures.wait([self._future], timeout)
        return self.status

    def cancel(self) -> None:
        """Stop the run: withdrawn if queued, its process tree killed if running."""
        self._engine.cancel(self.id)

    def record(self) -> RunRecord:
        """The run's record as stored now."""
        self._engine.wait_recorded(self.id)
        return self._engine.recorder.store.get_run(self.id)

    def lineage(self) -> Lineage:
        """The runs and artifacts upstream and downstream of this run, as recorded now."""
        return self.record().lineage()

    def __repr__(self) -> str:
        return f"<Run {self.id[:8]} {self.status}>"


class MapResult(Iterator[Any]):
    """Results of ``Function.map`` in input order, with a progress bar on a terminal."""

    def __init__(self, runs: list[Run[Any]], *, return_exceptions: bool) -> None:
        self.runs = runs
        self._return_exceptions = return_exceptions
        self._iter: Iterator[Any] | None = None

    def __iter__(self) -> MapResult:
        return self

    def __next__(self) -> Any:
        if self._iter is None:
            self._iter = self._results()
        return next(self._iter)

    def __len__(self) -> int:
        return len(self.runs)

    def _results(self) -> Iterator[Any]:
        progress = None
        if sys.stderr.isatty() and self.runs:
            from rich.progress import Progress

            progress = Progress(transient=True)
            task = progress.add_task(f"{len(self.runs)} runs", total=len(self.runs))
            progress.start()
            for run in self.runs:
                run._future.add_done_callback(lambda _f: progress.advance(task))
        try:
            for run in self.runs:
                try:
                    yield run.result()
                except RunFailed as exc:
                    if not self._return_exceptions:
                        raise
                    yield exc
        finally:
            if progress is not None:
                progress.stop()


class Function(Generic[P, R]):
    """A Python function that Kiln runs and records. Made by :meth:`kiln.App.function`.

    Calling it directly runs the plain function, unrecorded; ``local``, ``remote``,
    ``spawn``, ``map`` and ``sweep`` record every execution as a run whose params
    are the function's arguments.
    """

    def __init__(
        self,
        app: App,
        fn: Callable[P, R],
        *,
        cpu: float = 1.0,
        memory: int | str = 0,
        gpu: float = 0,
        timeout: float | None = None,
        retries: int = 0,
        env: Any = None,
        priority: int = 0,
        sys_metrics: bool = True,
        sandbox: bool | Sandbox | None = None,
    ) -> None:
        if not callable(fn):
            raise ValidationError("fn", f"{fn!r} is not a function")
        self.app = app
        self.fn = fn
        self.resources = Resources.parse(cpu=cpu, memory=memory, gpu=gpu)
        # This machine's inventory; a cluster's is checked at submit. (Read lightly: a
        # bad setting is reported when the function is called, not at import.)
        given = app._settings
        backend = given.backend if given else os.environ.get("KILN_BACKEND") or "local"
        if backend == "local":
            detect_inventory().check(self.resources)
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
        ):
            raise ValidationError("timeout", f"{timeout!r} is not a number of seconds above 0")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValidationError("retries", f"{retries!r} is not a count", allowed="an int >= 0")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValidationError("priority", f"{priority!r} is not an int")
        if not isinstance(sys_metrics, bool):
            raise ValidationError("sys_metrics", f"{sys_metrics!r} is not True or False")
        self.sys_metrics = sys_metrics
        if sandbox is True:
            sandbox = Sandbox()
        elif sandbox is False:
            sandbox = None
        if sandbox is not None and not isinstance(sandbox, Sandbox):
            raise ValidationError("sandbox", f"{sandbox!r} is not a kiln.Sandbox",
                                  allowed="None, True, False or kiln.Sandbox(...)")  # fmt: skip
        self.sandbox: Sandbox | None = sandbox
        from kiln.envs.spec import Env

        if env is not None and not isinstance(env, Env):
            raise ValidationError("env", f"{env!r} is not a kiln.Env")
        self.timeout_s = None if timeout is None else float(timeout)
        self.retries = retries
        self.env: Env | None = env
        self.priority = priority
        self.name = f"{fn.__module__}:{fn.__qualname__}"
        self._signature = inspect.signature(fn)
        self._payload: tuple[str, bytes] | None = None
        self._locked_env: Materialized | None = None  # set by kiln.reproduce: a built env
        self._threads: dict[str, str] = {}  # set by kiln.reproduce: the recorded threads
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    # -- calls -----------------------------------------------------------------------

    def local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run in this process, recorded as a run. Exceptions propagate as raised."""
        params, _ = self._params(args, kwargs)
        module = inspect.getsourcefile(self.fn)
        with ActiveRun(
            self.app.settings,
            app=self.app.name,
            params=params,
            function=self.name,
            module_path=Path(module) if module else None,
            sys_metrics=self.sys_metrics,
        ) as run:
            result = self.fn(*args, **kwargs)
            run.set_result(result)
        return result

    def remote(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run on the engine, wait, and return the result (or raise RunFailed)."""
        # The run's record is written while it runs: the caller waits for the result
        # (and so for the record) anyway.
        return self._submit([(args, kwargs)], wait=False)[0].result()

    def spawn(self, *args: P.args, **kwargs: P.kwargs) -> Run[R]:
        """Start a run on the engine and return its handle at once."""
        return self._submit([(args, kwargs)])[0]

    def map(self, *iterables: Iterable[Any], return_exceptions: bool = False) -> MapResult:
        """Run once per item (several iterables are zipped, as with ``map``), in parallel.

        Iterating the result yields results in input order; a failed item raises
        :class:`kiln.errors.RunFailed` naming its run, or is yielded as that error
        with ``return_exceptions=True``.
        """
        if not iterables:
            raise ValidationError("iterables", "map needs at least one iterable")
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
            (tuple(items), {}) for items in zip(*iterables, strict=False)
        ]
        # Records are written while the runs run; a handle's record() waits for its row.
        return MapResult(self._submit(calls, wait=False), return_exceptions=return_exceptions)

    def sweep(self, spec: Sequence[Mapping[str, Any]], /, **fixed: Any) -> Sweep:
        """Run once per dict of keyword arguments (``kiln.grid`` makes them), under one
        parent record; ``fixed`` keyword arguments go to every run (a dataset, say).

        Returns at once, while the runs queue and run; ``sweep.wait()`` blocks until
        they end, and ``best``, ``table``, ``results`` and ``records`` wait first.

        Example::

            sweep = train.sweep(kiln.grid(lr=[0.1, 0.01], depth=[3, 5]), data=ds)
            best = sweep.wait().best("accuracy")
        """
        calls = check_spec(spec, fixed)
        sweep_id = new_run_id()
        engine = engine_for(self.app.settings)
        span = runtrace.start(f"sweep {self.name}", {runtrace.RUN_ID: sweep_id,
                                                     "kiln.sweep.runs": len(calls)})  # fmt: skip
        tally = _Tally(engine, sweep_id, len(calls), span=span)
        parent = self._row(self.app.settings, sweep_id, {"runs": len(calls)}, None, time.time())
        parent.status, parent.started_at = RunStatus.RUNNING, parent.created_at
        parent.tags, parent.resources = {"kind": "sweep"}, None
        if span is not None:
            parent.trace_id, parent.span_id = runtrace.ids(span).values()
        with runtrace.current(span):  # the sweep's span is its runs' parent
            runs = self._submit([((), kw) for kw in calls], parent=parent, on_done=tally.run_done)
        return Sweep(sweep_id, runs, engine, function=self, calls=calls, tally=tally)

    # -- internals -------------------------------------------------------------------

    def _params(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[dict[str, Any], list[Dataset | Artifact]]:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ValidationError("arguments", f"{self.name}: {exc}") from None
        bound.apply_defaults()
        params: dict[str, Any] = {}
        datasets: list[Dataset | Artifact] = []
        for name, value in bound.arguments.items():
            if isinstance(value, Dataset | Artifact):
                datasets.append(value)
            try:
                params[name] = to_json(value, f"params.{name}")
            except ValidationError:
                params[name] = (
                    f"<{type(value).__module__}.{type(value).__qualname__}, not recorded>"
                )
        return params, datasets

    def _function_payload(self, *, by_value: bool = False) -> tuple[str, bytes]:
        """The function as a worker loads it: by reference where its module can be
        imported there, else by value. On Kubernetes always by value: a pod's image need
        not hold the caller's code (only what the function imports)."""
        by_reference_cached = self._payload is not None and self._payload[0] == self.name
        if self._payload is None or (by_value and by_reference_cached):
            module, qualname = self.fn.__module__, self.fn.__qualname__
            by_reference = (not by_value and self.env is None and module != "__main__"
                            and "<locals>" not in qualname)  # fmt: skip
            if by_reference and _importable(module):
                self._payload = (self.name, cloudpickle.dumps(("ref", module, qualname)))
            else:
                # __main__, a notebook, a closure, or a function with its own env: by value.
                # In an env, the function's module may import what the env does not have.
                data = _by_value(self.fn)
                self._payload = (hashlib.sha256(data).hexdigest(), data)
        return self._payload

    def _row(
        self,
        settings: Settings,
        run_id: str,
        params: dict[str, Any],
        parent_id: str | None,
        now: float,
    ) -> RunRow:
        engine = engine_for(settings)
        return RunRow(
            id=run_id,
            app=self.app.name,
            function=self.name,
            status=RunStatus.QUEUED,
            actor=settings.actor,
            host=_HOST,
            pid=os.getpid(),
            engine=settings.backend,
            parent_id=parent_id,
            created_at=now,
            heartbeat_at=now,
            params=params,
            code=_code_snapshot(engine, self.fn),
            environment=_environment(engine),
            resources={
                "requested": self.resources.to_json(),
                "limits": {"timeout_s": self.timeout_s, "retries": self.retries},
                "env": None if self.env is None else self.env.__kiln_json__(),
            },
        )

    def _submit(
        self,
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
        *,
        parent: RunRow | None = None,
        parent_id: str | None = None,
        on_done: Callable[[Call, Outcome], None] | None = None,
        tags: dict[str, str] | None = None,
        each_tags: Sequence[Mapping[str, str]] | None = None,
        wait: bool = True,
    ) -> list[Run[R]]:
        """Record and start one run per call: under ``parent`` (a new sweep row, written
        first) or ``parent_id`` (an existing one), tagged ``tags`` plus its ``each_tags``."""
        checked = [(args, kwargs, *self._params(args, kwargs)) for args, kwargs in calls]
        settings = self.app.settings
        engine = engine_for(settings)
        engine.inventory.check(self.resources)
        env = self._environment(engine, checked, parent)
        built = env if env is not None and not hasattr(env, "requirements") else None
        fn_key, fn_payload = self._function_payload(by_value=settings.backend == "kubernetes")
        sandbox = self._sandbox(settings)
        store = {
            "home": str(settings.home),
            "store_url": settings.store_url,
            "actor": settings.actor,
            **({"server_url": settings.server_url} if settings.server_url else {}),
            **({"project": settings.project} if settings.project else {}),
            **({} if self.sys_metrics else {"sys_metrics": "off"}),
        }
        if settings.server_url and (settings.token or settings.backend != "local"):
            # Ray's workers do not inherit this process's environment, nor does a local
            # worker a token given in the settings: the task carries it (within the
            # cluster, or the machine, as its arguments do).
            token = settings.token or server_token(settings.server_url)
            if token:
                store["token"] = token
        parent_span = runtrace.traceparent()  # the sweep's, or the run this is called in
        if parent_span is not None:
            store["traceparent"] = parent_span
        sys_path, cwd = _code_paths(), str(Path.cwd())
        now = time.time()
        parent_id = parent.id if parent else parent_id
        own_tags = list(each_tags) if each_tags is not None else [{}] * len(checked)
        prepared = []
        for i, (args, kwargs, params, datasets) in enumerate(checked):
            run_id = new_run_id()
            spec = TaskSpec(
                run_id=run_id,
                app=self.app.name,
                fn_key=fn_key,
                fn_payload=fn_payload,
                args_payload=cloudpickle.dumps((args, kwargs)),
                resources=self.resources,
                priority=self.priority,
                timeout_s=self.timeout_s,
                store=store,
                sys_path=sys_path,
                cwd=cwd,
                python=str(built.python) if built else None,
                env_lock=str(built.lock_file) if built else None,
                requirements=getattr(env, "requirements", None),
                threads=self._threads,
                sandbox=sandbox,
            )
            # Created a microsecond apart, in call order: "created first" is a stable
            # tie-break (Sweep.best) and lists show a sweep in grid order.
            row = self._row(settings, run_id, params, parent_id, now + i * 1e-6)
            row.tags = {**(tags or {}), **own_tags[i]}
            if sandbox is not None:  # as asked; the layers given come with its end
                row.resources = {**(row.resources or {}), "sandbox": sandbox}
            call = Call(row, spec, retries=self.retries)
            if env is not None:
                call.environment = {"env_id": env.env_id, "lock_sha256": env.lock_sha256}
                row.environment = {**(row.environment or {}), **call.environment}
            call.inputs = [input_row(run_id, d) for d in datasets]
            if on_done is not None:
                call.on_done.append(on_done)
            prepared.append(call)
        engine.submit(prepared, parent=parent, wait=wait)
        return [Run(c.spec.run_id, engine, c.future) for c in prepared]

    def _sandbox(self, settings: Settings) -> dict[str, Any] | None:
        """The sandbox of this call's runs, plain: the function's own, else the default
        one when the engine must sandbox every run (KILN_SANDBOX=1, an agent's token)."""
        if self.sandbox is not None:
            return self.sandbox.to_json()
        token = settings.token or (server_token(settings.server_url) if settings.server_url
                                   else None)  # fmt: skip
        if forced(settings.sandbox, settings.server_url, token):
            return Sandbox().to_json()
        return None

    def _environment(
        self, engine: Engine, checked: list[Any], parent: RunRow | None
    ) -> Materialized | Locked | None:
        """The env for this function, or None; a failure is recorded, then raised.

        The local engine runs a built env; Ray builds its own on each node from the
        same lock, so only the lock is made here.
        """
        on_ray = engine.settings.backend != "local"  # Ray's nodes, Kubernetes' pods
        if self._locked_env is not None:
            built = self._locked_env
            if on_ray:
                from kiln.envs.manager import Locked

                lock = engine.recorder.blobs.read(built.lock_sha256).decode()
                return Locked(built.env_id, built.lock_sha256, lock)
            return built
        if self.env is None:
            return None
        from kiln.envs.manager import env_manager

        manager = env_manager(engine.settings.home, engine.recorder.blobs)
        try:
            with _status(f"preparing environment ({len(self.env.packages)} packages)"):
                if not on_ray:
                    return manager.ensure(self.env)
                return manager.lock(self.env)
        except EnvError as exc:
            self._record_env_failure(engine, checked, parent, exc)
            raise

    def _record_env_failure(
        self, engine: Engine, checked: list[Any], parent: RunRow | None, exc: EnvError
    ) -> None:
        from kiln.record.store.base import WriteBatch
        from kiln.record.store.rows import cut_text

        now = time.time()
        batch = WriteBatch(new_runs=[parent] if parent else [])
        for _args, _kwargs, params, _datasets in checked:
            parent_id = parent.id if parent else None
            row = self._row(self.app.settings, new_run_id(), params, parent_id, now)
            row.status, row.ended_at, row.error = RunStatus.FAILED, now, cut_text(str(exc))
            row.resources = {**(row.resources or {}), "stage": "environment"}
            batch.new_runs.append(row)
            exc.run_ids.append(row.id)
        if parent:
            parent.status, parent.ended_at, parent.error = RunStatus.FAILED, now, cut_text(str(exc))
        engine.recorder.store.write(batch)

    def __repr__(self) -> str:
        return f"<kiln.Function {self.name} app={self.app.name!r}>"


class Offered:
    """A function offered to callers of the MCP tools (``kiln server --function``): what
    :class:`kiln.server.operations.Offered` asks of it, each run recording with the
    caller's settings (its token, its project, its sandbox)."""

    def __init__(self, fn: Function[..., Any]) -> None:
        self.fn = fn

    def shape(self) -> dict[str, Any]:
        fn, r = self.fn, self.fn.resources
        return {
            "function": fn.name, "params": list(fn._signature.parameters),
            "doc": inspect.getdoc(fn.fn), "cpu": r.cpu, "memory_bytes": r.memory_bytes,
            "gpu": r.gpu, "timeout_s": fn.timeout_s, "sandboxed": fn.sandbox is not None,
        }  # fmt: skip

    def check(self, kwargs: Mapping[str, Any]) -> None:
        self.fn._params((), dict(kwargs))

    def _bound(self, settings: Settings) -> Function[..., Any]:
        import copy

        from kiln.app import App

        bound = copy.copy(self.fn)
        bound.app = App(self.fn.app.name, settings=settings)
        return bound

    def spawn(self, settings: Settings, kwargs: Mapping[str, Any]) -> str:
        return self._bound(settings).spawn(**kwargs).id

    def sweep(
        self, settings: Settings, spec: list[dict[str, Any]], fixed: Mapping[str, Any]
    ) -> tuple[str, list[str]]:
        done = self._bound(settings).sweep(spec, **fixed)
        return done.id, [r.id for r in done.runs]


@contextlib.contextmanager
def _status(message: str) -> Iterator[None]:
    """A spinner on a terminal while something slow happens; nothing otherwise."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield


def _by_value(fn: Callable[..., Any]) -> bytes:
    module = sys.modules.get(fn.__module__)
    if module is None or module.__name__ in ("__main__", "builtins"):
        return _dumps_keeping_files(fn)
    cloudpickle.register_pickle_by_value(module)
    try:
        return _dumps_keeping_files(fn)
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def _dumps_keeping_files(fn: Callable[..., Any]) -> bytes:
    """cloudpickle, but code objects keep their file name.

    cloudpickle names the file of every function it ships by value
    ``<dynamic-code>`` (for payloads that do not depend on where the code lives),
    so a remote traceback could not say where the error is. A run's payload is
    keyed by its own hash anyway; the real file name costs nothing here.
    """
    buffer = io.BytesIO()
    _FilePickler(buffer, protocol=pickle.DEFAULT_PROTOCOL).dump(fn)
    return buffer.getvalue()


def _code_reduce(code: types.CodeType) -> tuple[Any, tuple[Any, ...]]:
    rebuild, args = _CLOUDPICKLE_CODE_REDUCE(code)
    return rebuild, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)


_CLOUDPICKLE_CODE_REDUCE = cloudpickle.Pickler.dispatch_table[types.CodeType]


class _FilePickler(cloudpickle.Pickler):  # type: ignore[misc]
    dispatch_table: ClassVar[Mapping[type, Any]] = collections.ChainMap(
        {types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table
    )


@functools.lru_cache(maxsize=256)
def _importable(module: str) -> bool:
    """Whether a worker can import ``module`` by name: its top-level package must be
    found on sys.path (a module loaded from a file under a made-up name is not)."""
    import importlib.machinery

    try:
        return importlib.machinery.PathFinder.find_spec(module.partition(".")[0]) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _environment(engine: Engine) -> dict[str, Any]:
    """The driver's environment (a worker reports its own when the run ends)."""
    return asdict(capture_environment(engine.recorder.blobs))


def _code_snapshot(engine: Engine, fn: Callable[..., Any]) -> dict[str, Any]:
    """The code of ``fn``'s module (CodeCapture reuses a snapshot for two seconds)."""
    try:
        source = inspect.getsourcefile(fn)
    except TypeError:
        source = None
    return _as_dict(engine.recorder.code.capture(Path(source) if source else None))


@functools.lru_cache(maxsize=64)
def _as_dict(snapshot: CodeSnapshot) -> dict[str, Any]:
    return asdict(snapshot)
