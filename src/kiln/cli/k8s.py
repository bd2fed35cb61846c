"""``kiln k8s render|apply``: what Kiln makes on a Kubernetes cluster, and making it.

``render FILE.py::FUNC --lr 0.1`` prints the Job one call would be: a preview, with a
new run id, naming its task by the sha256 the task would have (it is not stored: a
Job applied by hand finds no task; ``apply`` ships it). ``render FILE.py:CLASS``
prints an endpoint's router and the objects of each version it routes to now (read
from the team server). ``apply`` does
it: a call runs as a Job and prints its result, as ``KILN_BACKEND=kubernetes kiln
run`` would; an endpoint's objects are created or replaced once (``kiln serve
--backend kubernetes`` also keeps following the alias).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kiln.errors import ValidationError

if TYPE_CHECKING:
    from kiln.function import Function
    from kiln.serve.endpoint import Endpoint

app = typer.Typer(
    help="Kubernetes objects of functions and endpoints: render, apply.", no_args_is_help=True
)
_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _target(target: str) -> tuple[Function[..., Any] | None, Endpoint[Any] | None]:
    """A function (``FILE.py::FUNC``) or an endpoint (``FILE.py:CLASS``)."""
    from kiln.cli.run import import_file, load_function
    from kiln.cli.serve import load_endpoint
    from kiln.serve.endpoint import Endpoint

    if "::" not in target:
        return None, load_endpoint(target)
    path, _, name = target.partition("::")
    if path.endswith(".py") and isinstance(getattr(import_file(Path(path)), name, None), Endpoint):
        return None, load_endpoint(target)
    return load_function(target), None


def _function_job(function: Function[..., Any], kwargs: dict[str, Any]) -> list[Any]:
    import cloudpickle

    from kiln.compute.backends.base import TaskSpec
    from kiln.compute.kube import KubeSettings, render_job
    from kiln.config import Settings
    from kiln.record.runs import new_run_id

    settings = Settings.from_env()
    key, payload = function._function_payload(by_value=True)
    requirements = None
    if function.env is not None:
        from kiln.envs.manager import env_manager
        from kiln.record.recorder import recorder_for

        blobs = recorder_for(settings).blobs
        requirements = env_manager(settings.home, blobs).lock(function.env).requirements
    spec = TaskSpec(run_id=new_run_id(), app=function.app.name, fn_key=key, fn_payload=payload,
                    args_payload=cloudpickle.dumps(((), kwargs)), resources=function.resources,
                    timeout_s=function.timeout_s, requirements=requirements)  # fmt: skip
    sha = hashlib.sha256(cloudpickle.dumps(spec)).hexdigest()
    return [render_job(spec, sha, KubeSettings.from_env(), server_url=_server(settings),
                       project=settings.project)]  # fmt: skip


def _server(settings: Any) -> str:
    from kiln.errors import ConfigError

    if settings.server_url is None:
        raise ConfigError("KILN_SERVER", "pods record through a team server: set KILN_SERVER "
                          "to the URL they reach it at")  # fmt: skip
    return str(settings.server_url)


def _endpoint_objects(endpoint: Endpoint[Any]) -> list[Any]:
    from kiln.compute.kube import KubeSettings
    from kiln.config import Settings
    from kiln.record.recorder import recorder_for
    from kiln.serve import state
    from kiln.serve.on_kubernetes import hpa_metric, render_router, render_version

    settings, kube = Settings.from_env(), KubeSettings.from_env()
    url, project = _server(settings), settings.project
    objects = render_router(endpoint, kube, server_url=url, project=project)
    targets = state.targets(recorder_for(settings).store, endpoint.spec, settings.actor)
    for version, weight in sorted(targets.items()):
        if weight > 0:
            objects += render_version(endpoint, version, kube, server_url=url, project=project,
                                      metric=hpa_metric())  # fmt: skip
    return objects


@app.command(context_settings=_EXTRA)
def render(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="FILE.py::FUNCTION or FILE.py:CLASS")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON (a List) instead of YAML.")] = False,
    as_yaml: Annotated[bool, typer.Option("--yaml", help="YAML documents (the default).")] = False,
) -> None:
    """Print the objects that would be applied, without touching a cluster."""
    from kiln.compute.kube import plain

    os.environ["KILN_BACKEND"] = "kubernetes"  # the cluster's resources, not this machine's
    function, endpoint = _target(target)
    if endpoint is not None:
        if ctx.args:
            raise ValidationError("arguments", "an endpoint takes none")
        objects = _endpoint_objects(endpoint)
    elif function is not None:
        from kiln.cli.run import parse_arguments

        objects = _function_job(function, parse_arguments(function, ctx.args))
    out = [plain(o) for o in objects]
    if as_json:
        typer.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": out}, indent=2))
        return
    import yaml

    typer.echo(yaml.safe_dump_all(out, sort_keys=False), nl=False)


@app.command(context_settings=_EXTRA)
def apply(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="FILE.py::FUNCTION or FILE.py:CLASS")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Run a call as a Job (waiting for its result), or apply an endpoint's objects."""
    os.environ["KILN_BACKEND"] = "kubernetes"  # this process's engine is the cluster
    function, endpoint = _target(target)
    if endpoint is not None:
        from kiln.serve.on_kubernetes import serve_on_kubernetes

        serve_on_kubernetes(endpoint, block=False)
        out: dict[str, Any] = {"endpoint": endpoint.name, "applied": True}
    elif function is not None:
        from kiln.cli.run import parse_arguments

        kwargs = parse_arguments(function, ctx.args)
        handle = function.spawn(**kwargs)
        result = handle.result()
        out = {"run_id": handle.id, "job": f"kiln-{handle.id}-1", "result": result}
    typer.echo(json.dumps(out, indent=2, default=str) if as_json else
               " ".join(f"{k}={v}" for k, v in out.items()))  # fmt: skip
