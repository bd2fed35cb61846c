"""Endpoints declared in Python: a class with ``load`` and ``predict``, and what it needs.

Example::

    @app.endpoint(model="fraud@production", cpu=1, min_replicas=0, max_replicas=4,
                  target_concurrency=8)
    class Fraud:
        def load(self, model_path: str) -> None:
            self.model = pickle.loads(Path(model_path).read_bytes())

        def predict(self, features: list[float]) -> dict:
            return {"fraud": float(self.model.predict_proba([features])[0, 1])}

``kiln serve app.py:Fraud`` serves it over HTTP; ``Fraud.batch(rows)`` and
``kiln batch app.py:Fraud --input rows.jsonl --output out.jsonl`` run it over data.
A class that can answer many rows at once (a vectorized model, a GPU batch) adds
``predict_batch(self, rows: list[dict]) -> list``: batch jobs then call it once per
shard with every valid row (``predict``'s arguments, validated as for ``predict``)
and expect one answer per row, in order.
Every bad argument is refused here, at declaration.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from kiln.compute.resources import Resources
from kiln.errors import ValidationError
from kiln.record.values import check_name
from kiln.registry.refs import parse_ref
from kiln.registry.traffic import parse_traffic

if TYPE_CHECKING:
    from kiln.app import App
    from kiln.envs.spec import Env
    from kiln.serve.batch import BatchResult
    from kiln.serve.on_ray import RayEndpoint
    from kiln.serve.server import ServerHandle

C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """What an endpoint serves and what each replica needs."""

    name: str
    app: str
    model: str  # "name@alias" (followed) or "name:3" (pinned)
    resources: Resources
    min_replicas: int = 1
    max_replicas: int = 1
    target_concurrency: int = 8
    idle_timeout: float = 60.0  # seconds under the target before scaling down
    traffic: dict[str, float] | None = None  # {"name:7": 90, "name:8": 10}
    kind: str = "chain"
    env: Env | None = None
    tracing: bool = True
    span_attributes: dict[str, str | int | float | bool] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return parse_ref(self.model)[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "resources": self.resources.to_json(),
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_concurrency": self.target_concurrency,
            "idle_timeout": self.idle_timeout,
            "traffic": self.traffic,
            "kind": self.kind,
            "span_attributes": self.span_attributes,
            "env": None if self.env is None else self.env.__kiln_json__(),
        }


@dataclass(frozen=True, slots=True)
class Source:
    """Where a replica finds the class: a module importable from ``sys_path``."""

    module: str
    qualname: str
    sys_path: tuple[str, ...] = field(default_factory=tuple)


class Endpoint(Generic[C]):
    """A declared endpoint. Calling it makes a plain instance of the class (for tests)."""

    def __init__(self, app: App, cls: type[C], spec: EndpointSpec) -> None:
        self.app = app
        self.cls = cls
        self.spec = spec
        self.name = spec.name
        self.__doc__ = cls.__doc__
        self.predict_signature = predict_signature(cls)

    def __call__(self, *args: Any, **kwargs: Any) -> C:
        return self.cls(*args, **kwargs)

    @property
    def source(self) -> Source:
        from kiln.compute.paths import code_paths

        module = self.cls.__module__
        if module == "__main__":
            main = sys.modules["__main__"]
            path = getattr(main, "__file__", None)
            if path is None:
                raise ValidationError(
                    "endpoint", f"{self.cls.__qualname__} is defined in an interactive session; "
                    "define it in a module so replicas can import it",
                )  # fmt: skip
            folder = str(Path(path).resolve().parent)
            return Source(Path(path).stem, self.cls.__qualname__, (folder, *code_paths()))
        return Source(module, self.cls.__qualname__, code_paths())

    def serve(
        self, *, host: str = "127.0.0.1", port: int = 8000, block: bool = True,
        backend: str | None = None,
    ) -> ServerHandle | RayEndpoint | None:  # fmt: skip
        """Serve over HTTP. ``block=False`` starts it in a background thread and returns
        a handle with ``url`` and ``stop()``. ``backend="ray"`` (default: ``KILN_BACKEND``)
        deploys it on Ray Serve instead of local replica processes."""
        from kiln.config import Settings

        engine = backend or Settings.from_env().backend
        if engine == "ray":
            from kiln.serve.on_ray import serve_on_ray

            return serve_on_ray(self, host=host, port=port, block=block)
        if engine == "kubernetes":
            from kiln.serve.on_kubernetes import serve_on_kubernetes

            serve_on_kubernetes(self, block=block)
            return None
        if engine != "local":
            raise ValidationError(
                "backend", f"{engine!r} cannot serve", allowed="local, ray, kubernetes"
            )
        from kiln.serve.server import serve

        return serve(self, host=host, port=port, block=block)

    def pinned(self, model: str | None = None, replicas: int | None = None) -> Endpoint[C]:
        """This endpoint serving ``model`` (a ``name:N`` or ``name@alias`` of the same
        model) instead of its own reference, with exactly ``replicas`` replicas."""
        spec = self.spec
        if model is not None:
            name = parse_ref(model)[0]
            if name != spec.model_name:
                raise ValidationError("model", f"{model!r} is not a version of {spec.model_name}")
            spec = dataclasses.replace(spec, model=model, traffic=None)
        if replicas is not None:
            spec = dataclasses.replace(spec, min_replicas=replicas, max_replicas=replicas)
        return Endpoint(self.app, self.cls, spec)

    def batch(
        self,
        inputs: Sequence[Mapping[str, Any]] | str | Path,
        *,
        output: str | Path | None = None,
        shard_size: int = 1000,
        replicas: int | None = None,
        progress: bool = False,
    ) -> BatchResult:
        """Run ``predict`` over ``inputs`` (rows, or a .jsonl/.csv/.parquet file) on
        replicas, checkpointing each shard so that a killed job resumes where it was.
        The job is recorded as a run linked to the model version."""
        from kiln.serve.batch import run_batch

        return run_batch(
            self, inputs, output=output, shard_size=shard_size, replicas=replicas,
            progress=progress,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"<kiln.Endpoint {self.name} model={self.spec.model!r}>"


def declare(
    app: App,
    *,
    model: str,
    name: str | None,
    cpu: float,
    memory: int | str,
    gpu: float,
    env: Any,
    min_replicas: int,
    max_replicas: int,
    target_concurrency: int,
    idle_timeout: float,
    traffic: Mapping[str, float] | None,
    kind: str,
    tracing: bool,
    span_attributes: Mapping[str, Any] | None = None,
) -> Callable[[type[C]], Endpoint[C]]:
    """Check every argument of ``app.endpoint(...)``; return the class decorator."""
    from kiln.envs.spec import Env

    if not isinstance(model, str):
        raise ValidationError("model", f"{model!r} is not a model reference",
                              allowed="'name@alias' or 'name:VERSION'")  # fmt: skip
    model_name, _, _ = parse_ref(model)
    resources = Resources.parse(cpu=cpu, memory=memory, gpu=gpu)
    _count("min_replicas", min_replicas, low=0)
    _count("max_replicas", max_replicas, low=1)
    if max_replicas < min_replicas:
        raise ValidationError(
            "max_replicas", f"{max_replicas} is below min_replicas={min_replicas}"
        )
    _count("target_concurrency", target_concurrency, low=1)
    if not isinstance(idle_timeout, int | float) or not idle_timeout > 0:
        raise ValidationError("idle_timeout", f"{idle_timeout!r} is not a duration",
                              allowed="seconds > 0")  # fmt: skip
    kinds = span_kinds()
    if kind not in kinds:
        raise ValidationError("kind", f"{kind!r} is not an OpenInference span kind",
                              allowed=", ".join(kinds))  # fmt: skip
    attributes = _span_attributes(span_attributes)
    if env is not None and not isinstance(env, Env):
        raise ValidationError("env", f"{env!r} is not a kiln.Env")
    split = None if traffic is None else parse_traffic(traffic, model_name)

    def wrap(cls: type[C]) -> Endpoint[C]:
        if not inspect.isclass(cls):
            raise ValidationError("endpoint", f"{cls!r} is not a class; decorate a class "
                                  "with load(self, model_path) and predict(self, ...)")  # fmt: skip
        spec = EndpointSpec(
            name=check_name("name", name or cls.__name__.lower()),
            app=app.name,
            model=model,
            resources=resources,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            target_concurrency=target_concurrency,
            idle_timeout=float(idle_timeout),
            traffic=split,
            kind=kind,
            env=env,
            tracing=tracing,
            span_attributes=attributes,
        )
        return Endpoint(app, cls, spec)

    return wrap


def span_kinds() -> tuple[str, ...]:
    """OpenInference's span kinds, lower-cased, from its conventions package."""
    from kiln._optional import require

    require("openinference.semconv", extra="serve")
    from openinference.semconv.trace import OpenInferenceSpanKindValues

    return tuple(k.value.lower() for k in OpenInferenceSpanKindValues)


_RESERVED = ("kiln.", "openinference.span.kind", "input.", "output.", "http.", "url.",
             "server.", "error.")  # fmt: skip


def _span_attributes(attributes: Mapping[str, Any] | None) -> dict[str, str | int | float | bool]:
    """Extra span attributes: names not Kiln's own or set per request, plain values."""
    if attributes is None:
        return {}
    if not isinstance(attributes, Mapping):
        raise ValidationError("span_attributes", f"{attributes!r} is not a mapping",
                              allowed="{'name': str | int | float | bool}")  # fmt: skip
    out: dict[str, str | int | float | bool] = {}
    for name, value in attributes.items():
        if not isinstance(name, str) or not name or name.startswith(_RESERVED):
            raise ValidationError(
                "span_attributes", f"{name!r} cannot be set: Kiln sets it, per request",
                allowed=f"a non-empty name not starting with {', '.join(_RESERVED)}",
            )  # fmt: skip
        if not isinstance(value, str | int | float | bool):
            raise ValidationError("span_attributes", f"{name}: {value!r} is not a plain value",
                                  allowed="str, int, float or bool")  # fmt: skip
        out[name] = value
    return out


def predict_signature(cls: type[Any]) -> inspect.Signature:
    """``predict``'s signature without ``self``; refuses a class that cannot serve."""
    predict = getattr(cls, "predict", None)
    if predict is None or not callable(predict):
        raise ValidationError("endpoint", f"{cls.__qualname__} has no predict method")
    load = getattr(cls, "load", None)
    if load is not None and len(inspect.signature(load).parameters) != 2:
        raise ValidationError("endpoint", f"{cls.__qualname__}.load must take (self, model_path)")
    sig = inspect.signature(predict)
    params = list(sig.parameters.values())[1:]
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise ValidationError(
                "endpoint", f"{cls.__qualname__}.predict takes *args, **kwargs or positional-"
                f"only {p.name!r}; a request names each argument, so each must be a keyword",
            )  # fmt: skip
    if not params:
        raise ValidationError("endpoint", f"{cls.__qualname__}.predict takes no arguments")
    _check_predict_batch(cls)
    return sig.replace(parameters=params)


def _check_predict_batch(cls: type[Any]) -> None:
    """An optional ``predict_batch(self, rows)``: batch jobs call it once per shard with
    a list of ``predict``'s arguments (one dict per row) and take a list of answers."""
    batch = getattr(cls, "predict_batch", None)
    if batch is None:
        return
    params = list(inspect.signature(batch).parameters.values()) if callable(batch) else []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) != 2 or any(p.kind not in positional for p in params):
        raise ValidationError(
            "endpoint", f"{cls.__qualname__}.predict_batch must take (self, rows): a list of "
            "dicts of predict's arguments, and return one answer per row, in order",
        )  # fmt: skip


def _count(field_name: str, value: Any, *, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValidationError(field_name, f"{value!r} is not a count", allowed=f"an int >= {low}")
