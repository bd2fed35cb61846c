"""Checks that turn user values into what the record stores, naming the field when they cannot."""

from __future__ import annotations

import enum
import math
import numbers
import re
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from kiln.errors import ValidationError

_JSON_ALLOWED = "str, int, float, bool, None, pathlib.Path, kiln.Dataset, lists and dicts of these"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_name(field: str, value: object) -> str:
    """A name for an app or run: letters, digits, ``.``, ``_`` and ``-``, up to 200 characters."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValidationError(
            field,
            f"{value!r} is not a valid name",
            allowed="1-200 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return value


def to_json(value: object, field: str) -> Any:
    """``value`` as plain JSON data, or a :class:`ValidationError` naming ``field``."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(
                field, f"{value} cannot be stored as JSON", allowed="finite numbers"
            )
        return float(value)
    if isinstance(value, enum.Enum):
        return to_json(value.value, field)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping | list | tuple):
        return _container_to_json(value, field)
    as_json = getattr(value, "__kiln_json__", None)
    if callable(as_json):
        return as_json()
    if isinstance(value, numbers.Number) and hasattr(value, "item"):  # numpy scalars
        return to_json(value.item(), field)
    raise ValidationError(
        field, f"a {type(value).__name__} cannot be stored as JSON", allowed=_JSON_ALLOWED
    )


def _container_to_json(value: Mapping[Any, Any] | list[Any] | tuple[Any, ...], field: str) -> Any:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValidationError(f"{field}.{k!r}", "keys must be strings")
            out[k] = to_json(v, f"{field}.{k}")
        return out
    return [to_json(v, f"{field}[{i}]") for i, v in enumerate(value)]


def check_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise ValidationError("params", f"must be a dict, got {type(params).__name__}")
    return {str(k): to_json(v, f"params.{k}") for k, v in _str_keys(params, "params").items()}


def check_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise ValidationError("tags", f"must be a dict, got {type(tags).__name__}")
    out = {}
    for k, v in _str_keys(tags, "tags").items():
        if not isinstance(v, str | int | float | bool):
            raise ValidationError(
                f"tags.{k}",
                f"a {type(v).__name__} is not a tag value",
                allowed="str, int, float, bool",
            )
        out[k] = str(v)
    return out


def _str_keys(mapping: Mapping[Any, Any], field: str) -> dict[str, Any]:
    for k in mapping:
        if not isinstance(k, str) or not k:
            raise ValidationError(f"{field}.{k!r}", "keys must be non-empty strings")
    return dict(mapping)


def metric_value(key: object, value: object) -> float:
    """A metric as a float. Numbers, numpy scalars and one-element tensors are accepted."""
    if not isinstance(key, str) or not key:
        raise ValidationError("metrics", f"metric names must be non-empty strings, got {key!r}")
    if type(value) is float:
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)  # one-element arrays and tensors
    if callable(item):
        try:
            scalar = item()
        except (TypeError, ValueError, RuntimeError):
            scalar = None
        if isinstance(scalar, numbers.Real):
            return float(scalar)
    raise ValidationError(
        f"metrics.{key}",
        f"{value!r} ({type(value).__name__}) is not a number",
        allowed="int, float, numpy scalars, one-element tensors",
    )


def metric_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise ValidationError("step", f"{step!r} ({type(step).__name__}) is not an integer")
    return int(step)
