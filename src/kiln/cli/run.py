"""``kiln run path/to/file.py::func --lr 0.1``: run one function on the engine."""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import typing
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer

from kiln.app import App
from kiln.errors import ValidationError
from kiln.function import Function, Offered
from kiln.record.values import check_name


def run(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="FILE.py::FUNCTION")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the run record as JSON.")] = False,
) -> None:
    """Run FUNCTION from FILE on the engine; --name value pairs are its arguments."""
    function = load_function(target)
    kwargs = parse_arguments(function, ctx.args)
    handle = function.spawn(**kwargs)
    result = handle.result()
    record = handle.record()
    if as_json:
        typer.echo(json.dumps({**record.to_dict(), "value": _jsonable(result)}, indent=2))
        return
    typer.echo(f"run {record.id} {record.status} in {record.duration_s or 0:.2f}s")
    typer.echo(json.dumps(_jsonable(result), indent=2))


def import_file(path: Path) -> ModuleType:
    """Import FILE.py by name from its own folder, so that workers and replicas can
    import it the same way."""
    if not path.is_file():
        raise ValidationError("TARGET", f"no file {str(path)!r}")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(path.stem)


def load_function(target: str) -> Function[..., Any]:
    path_text, sep, name = target.partition("::")
    path = Path(path_text)
    if not sep or not name or path.suffix != ".py":
        raise ValidationError("TARGET", f"{target!r} is not FILE.py::FUNCTION")
    module = import_file(path)
    obj = getattr(module, name, None)
    if obj is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ValidationError("TARGET", f"{path_text} has no {name!r}", allowed=names)
    if isinstance(obj, Function):
        return obj
    if not callable(obj):
        raise ValidationError("TARGET", f"{name!r} in {path_text} is not a function")
    app_name = path.stem.replace("_", "-") if _valid(path.stem) else "default"
    return App(app_name).function()(obj)


def registered(targets: list[str] | None) -> dict[str, Offered]:
    """``FILE.py::FUNCTION`` targets as the functions agents may run, by FUNCTION's name
    (``--function``: each given once, each name once)."""
    found: dict[str, Offered] = {}
    for target in targets or ():
        name = target.partition("::")[2]
        if name in found:
            raise ValidationError("--function", f"two functions are named {name!r}")
        found[name] = Offered(load_function(target))
    return found


def _valid(name: str) -> bool:
    try:
        check_name("app", name)
    except ValidationError:
        return False
    return True


def parse_arguments(function: Function[..., Any], args: list[str]) -> dict[str, Any]:
    """``--name value``, ``--name=value``, ``--flag`` / ``--no-flag``, typed by annotation."""
    params = inspect.signature(function.fn).parameters
    hints = typing.get_type_hints(function.fn)
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            raise ValidationError("arguments", f"unexpected {token!r}; give --name value")
        key, eq, raw = token[2:].partition("=")
        name = key.replace("-", "_")
        negated = name.startswith("no_") and name[3:] in params and hints.get(name[3:]) is bool
        if negated:
            out[name[3:]] = False
            i += 1
            continue
        if name not in params:
            raise ValidationError(
                f"--{key}", "is not an argument", allowed=[f"--{p}" for p in params]
            )
        if hints.get(name) is bool and not eq:
            out[name] = True
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                raise ValidationError(f"--{key}", "needs a value")
            raw = args[i + 1]
            i += 1
        out[name] = _convert(raw, hints.get(name), f"--{key}")
        i += 1
    missing = [
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty
        and n not in out
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if missing:
        raise ValidationError(f"--{missing[0]}", "is required")
    return out


def _convert(raw: str, hint: Any, field: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = options[0] if len(options) == 1 else None
    try:
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if hint in (int, float, str, Path):
            return hint(raw)
    except ValueError:
        raise ValidationError(field, f"{raw!r} is not a {hint.__name__}") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value
