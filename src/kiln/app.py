"""The SDK entry points: :class:`App`, :func:`runs` and :func:`get_run`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from kiln.config import Settings
from kiln.errors import ValidationError
from kiln.observe import runtrace, sysmetrics
from kiln.record.model import RunRecord, RunStatus
from kiln.record.resolve import RunLike, resolve_run
from kiln.record.runs import ActiveRun, caller_module, watch_runs
from kiln.record.store.base import RunQuery
from kiln.record.values import check_name

if TYPE_CHECKING:
    from kiln._engine import Engine
    from kiln.function import Function
    from kiln.govern.sandbox import Sandbox
    from kiln.record.recorder import Recorder
    from kiln.registry.models import RegistryStore
    from kiln.serve.endpoint import Endpoint

watch_runs(sysmetrics.watch)  # every run of the SDK is sampled (unless it says not to)
watch_runs(runtrace.watch)  # and is a span, while tracing is on

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C")


class App:
    """An application: the namespace of its runs, in a project (a team's tenant on a
    server: ``project``, else ``KILN_PROJECT``, else the project of the server token;
    a store of one's own has the one project ``default``).

    Example::

        app = kiln.App("fraud")
        with app.run(params={"lr": 0.1}) as run:
            kiln.log({"loss": 0.4}, step=0)
            run.set_result({"accuracy": 0.93})
    """

    def __init__(
        self, name: str, *, project: str | None = None, settings: Settings | None = None
    ) -> None:
        self.name = check_name("app", name)
        self.project = None if project is None else check_name("project", project)
        self._settings = settings

    @property
    def settings(self) -> Settings:
        """Where its runs are recorded: ``settings``, else ``KILN_*``; in ``project`` if
        given (else ``KILN_PROJECT``, else the token's project on a server)."""
        found = self._settings if self._settings is not None else Settings.from_env()
        return found if self.project is None else dataclasses.replace(found, project=self.project)

    def _engine(self) -> Engine:
        """This process's engine for the app's settings: what its endpoints and batch
        jobs reserve replicas through (serving is handed it, never reaches for it)."""
        from kiln._engine import engine_for

        return engine_for(self.settings)

    def run(
        self,
        *,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        name: str | None = None,
        sys_metrics: bool = True,
    ) -> ActiveRun:
        """Open a run recorded by hand. An exception inside it marks it failed and propagates.

        ``params`` must be JSON-like (see :class:`kiln.errors.ValidationError` for what is
        allowed); a :class:`kiln.Dataset` among them is recorded as an input. What the
        run's code prints is recorded as its logs; ``sys_metrics=False`` turns off the
        sampling of how it uses the machine (``sys/...`` metrics).
        """
        if name is not None:
            check_name("name", name)
        if not isinstance(sys_metrics, bool):
            raise ValidationError("sys_metrics", f"{sys_metrics!r} is not True or False")
        return ActiveRun(
            self.settings,
            app=self.name,
            params=params,
            tags=tags,
            name=name,
            module_path=caller_module(),
            sys_metrics=sys_metrics,
        )

    def function(
        self,
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
    ) -> Callable[[Callable[P, R]], Function[P, R]]:
        """Declare what a function needs; Kiln runs and records every call of it.

        ``cpu`` cores (float), ``memory`` (``"512Mi"``, ``"4Gi"`` or bytes), ``gpu`` (0,
        a fraction below 1, or a whole count), ``timeout`` seconds, ``retries`` (with
        exponential backoff), ``priority`` (higher first). Bad values raise here. Each
        run records what it prints and, unless ``sys_metrics=False``, how it uses the
        machine (``sys/...`` metrics, sampled beside it).

        ``sandbox=True`` (or a :class:`kiln.Sandbox`) runs each call confined by the
        kernel: no network, its code and a scratch folder only, bounded processes and
        memory (see :mod:`kiln.govern.sandbox`); a machine that cannot give it refuses
        the run. Its result and saved objects must then be JSON-like (or bytes and
        files). Runs of an agent, or with ``KILN_SANDBOX=1``, are always sandboxed.

        Example::

            @app.function(cpu=2, memory="4Gi", gpu=0.5, timeout=600, retries=1)
            def train(lr: float) -> dict:
                ...
        """
        from kiln.function import Function

        def wrap(f: Callable[P, R]) -> Function[P, R]:
            return Function(
                self,
                f,
                cpu=cpu,
                memory=memory,
                gpu=gpu,
                timeout=timeout,
                retries=retries,
                env=env,
                priority=priority,
                sys_metrics=sys_metrics,
                sandbox=sandbox,
            )

        return wrap

    def endpoint(
        self,
        *,
        model: str,
        name: str | None = None,
        cpu: float = 1.0,
        memory: int | str = 0,
        gpu: float = 0,
        env: Any = None,
        min_replicas: int = 1,
        max_replicas: int = 1,
        target_concurrency: int = 8,
        idle_timeout: float = 60.0,
        traffic: Mapping[str, float] | None = None,
        kind: str = "chain",
        tracing: bool = True,
        span_attributes: Mapping[str, str | int | float | bool] | None = None,
    ) -> Callable[[type[C]], Endpoint[C]]:
        """Declare a class with ``load(self, model_path)`` and ``predict(self, ...)`` as an
        endpoint serving ``model`` (``"name@alias"``, followed as it moves, or ``"name:3"``).

        Each replica is a process with ``cpu``/``memory``/``gpu`` (admitted by the same
        scheduler as functions) and ``env``. Replicas scale between ``min_replicas``
        (0: scale to zero) and ``max_replicas`` to keep about ``target_concurrency``
        requests in flight each, and shrink after ``idle_timeout`` seconds with less.
        ``traffic={"name:7": 90, "name:8": 10}`` splits requests by weight. ``kind`` is
        the OpenInference span kind of its traces (``"llm"`` adds ``llm.*`` attributes,
        ``"embedding"`` the ``embedding.*`` ones); ``span_attributes`` are added to each
        of its spans (for instance ``{"llm.system": "openai"}`` for a model speaking
        OpenAI's API; ``llm.provider`` and ``llm.system`` are ``"kiln"`` otherwise).

        Example::

            @app.endpoint(model="fraud@production", min_replicas=0, max_replicas=4)
            class Fraud:
                def load(self, model_path: str) -> None: ...
                def predict(self, features: list[float]) -> dict: ...
        """
        from kiln.serve.endpoint import declare

        return declare(
            self, model=model, name=name, cpu=cpu, memory=memory, gpu=gpu, env=env,
            min_replicas=min_replicas, max_replicas=max_replicas,
            target_concurrency=target_concurrency, idle_timeout=idle_timeout,
            traffic=traffic, kind=kind, tracing=tracing, span_attributes=span_attributes,
        )  # fmt: skip

    @property
    def models(self) -> RegistryStore:
        """The model registry: ``register``, ``get``, ``promote``, ``rollback``, ``history``."""
        from kiln.record.recorder import recorder_for
        from kiln.registry.models import models_for

        settings = self.settings
        return models_for(recorder_for(settings).store, app=self.name, actor=settings.actor)

    def runs(self, **filters: Any) -> list[RunRecord]:
        """This app's runs; takes the filters of :func:`kiln.runs`."""
        return runs(app=self.name, settings=self.settings, **filters)

    def __repr__(self) -> str:
        return (
            f"App({self.name!r})"
            if self.project is None
            else (f"App({self.name!r}, project={self.project!r})")
        )


def runs(
    *,
    app: str | None = None,
    status: str | RunStatus | Iterable[str | RunStatus] | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    parent: RunLike | None = None,
    env_id: str | None = None,
    order_by: str = "-created",
    limit: int | None = 100,
    reproductions: bool = False,
    settings: Settings | None = None,
) -> list[RunRecord]:
    """Query recorded runs.

    ``order_by`` is ``created``, ``started``, ``ended``, ``name`` or ``status``, or the
    name of a summary metric; prefix ``-`` for descending. Runs without the metric
    come last; ties go to the run created first. ``params`` and ``tags`` filter on
    equality. ``parent`` is a sweep (its handle, record or id): a live ``kiln.Sweep``
    is waited for first, so its runs are listed with their results. Reproductions of
    other runs (``kiln reproduce``) are left out unless ``reproductions=True`` (or a
    ``reproduced_from`` tag is asked for).

    Example::

        best = kiln.runs(app="fraud", status="succeeded", order_by="-accuracy", limit=10)
    """
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValidationError("limit", f"{limit!r} is not a count", allowed="an int >= 0 or None")
    if not isinstance(order_by, str) or not order_by.lstrip("-+"):
        raise ValidationError("order_by", f"{order_by!r} names no field or metric")
    store = _reader(settings).store
    tag_filter = {k: str(v) for k, v in (tags or {}).items()}
    sweep = None if parent is None else resolve_run(parent, store, field="parent", ended=True)
    query = RunQuery(
        app=app,
        status=_statuses(status),
        params=dict(params or {}),
        tags=tag_filter,
        parent_id=None if sweep is None else sweep.id,
        env_id=env_id,
        order_by=order_by,
        limit=limit,
        reproductions=reproductions or "reproduced_from" in tag_filter,
    )
    return store.query_runs(query)


def get_run(run: RunLike, *, settings: Settings | None = None) -> RunRecord:
    """The record of a run: given its id or a unique prefix of it, its ``kiln.Run``
    handle (once its row is written) or a record (read again, as stored now)."""
    store = _reader(settings).store
    if isinstance(run, RunRecord):
        return store.get_run(run.id)
    return resolve_run(run, store, field="run")


def _reader(settings: Settings | None) -> Recorder:
    from kiln.record.recorder import recorder_for

    return recorder_for(settings or Settings.from_env(), create=False)


def _statuses(status: str | RunStatus | Iterable[str | RunStatus] | None) -> tuple[RunStatus, ...]:
    if status is None:
        return ()
    items = [status] if isinstance(status, str) else list(status)
    try:
        return tuple(RunStatus(s) for s in items)
    except ValueError:
        raise ValidationError(
            "status", f"{status!r} is not a run status", allowed=[s.value for s in RunStatus]
        ) from None
