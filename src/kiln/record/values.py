"""Checks that turn user values into what the record stores, naming the field when they cannot."""

from __future__ import annotations

import enum
import math
import numbers
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from kiln.errors import RecordingWarning, ValidationError

_JSON_ALLOWED = "str, int, float, bool, None, pathlib.Path, kiln.Dataset, lists and dicts of these"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # fullmatch: "$" admits a final "\n"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What the store's columns hold (record/store/_schema.py): checked at the call, so that
# nothing the writer cannot store is ever queued.
METRIC_KEY_MAX = 250
ARTIFACT_NAME_MAX = 500
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INT_PARAM = (-(2**63), 2**64 - 1)  # signed or unsigned 64-bit: what JSON tools keep exact
_KILN_DIR = str(PurePath(__file__).parent.parent)  # frames here are Kiln's, not the caller's


def check_name(field: str, value: object) -> str:
    """A name for an app or run: letters, digits, ``.``, ``_`` and ``-``, up to 200 characters."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValidationError(
            field,
            f"{_short(value)} is not a valid name",
            allowed="1-200 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return value


def check_text(field: str, value: object, *, max_len: int, what: str) -> str:
    """A non-empty str of at most ``max_len`` characters, none of them a control
    character (a newline or NUL would corrupt listings, logs and some databases)."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field, f"{_short(value)} is not a {what}", allowed="a non-empty str")
    if len(value) > max_len:
        raise ValidationError(
            field, f"a {what} of {len(value)} characters", allowed=f"at most {max_len} characters"
        )
    if _CONTROL.search(value):
        raise ValidationError(
            field, f"{_short(value)} holds a control character", allowed="printable characters"
        )
    return value


def _short(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters; an int too long to print is described."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an int of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_json(value: object, field: str) -> Any:
    """``value`` as plain JSON data, or a :class:`ValidationError` naming ``field``."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not _INT_PARAM[0] <= value <= _INT_PARAM[1]:
            raise ValidationError(
                field,
                f"{_short(value)} is too large to store as a number",
                allowed="integers of up to 64 bits (pass a str for a bigger one)",
            )
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
    number = scalar(value)  # numpy scalars, 0-d arrays and tensors
    if number is not None:
        return to_json(number, field)
    raise ValidationError(
        field, f"a {_describe(value)} cannot be stored as JSON", allowed=_JSON_ALLOWED
    )


def scalar(value: object) -> bool | int | float | None:
    """A 0-d number as a Python bool, int or float; None if ``value`` is not one.

    A 0-d number is anything with ``__float__`` and no length: numpy scalars and
    0-d arrays, 0-d torch tensors, ``decimal.Decimal``. Its ``item()``, where it has
    one, keeps ints as ints and bools as bools; complex numbers are not accepted.
    """
    if isinstance(value, bool | int | float):
        return value if type(value) in (bool, int, float) else _plain(value)
    if not hasattr(value, "__float__"):
        return None
    if isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
        return None  # numpy complex: float() would drop the imaginary part
    try:
        len(value)  # type: ignore[arg-type]
    except TypeError:  # unsized: numpy and torch say so for 0-d values
        pass
    else:
        return None
    item = getattr(value, "item", None)
    try:
        number = item() if callable(item) else float(value)
    except (TypeError, ValueError, RuntimeError):  # complex tensors, say
        return None
    return _plain(number) if isinstance(number, bool | int | float) else None


def _plain(value: bool | int | float) -> bool | int | float:
    if isinstance(value, bool):
        return bool(value)
    return int(value) if isinstance(value, int) else float(value)


def _describe(value: object) -> str:
    """``value``'s type for a message: ``torch.Tensor of shape (2, 3)``, ``list``."""
    name = _type_name(value)
    shape = getattr(value, "shape", None)  # torch.Size is a tuple
    return f"{name} of shape {tuple(shape)}" if isinstance(shape, tuple) else name


def _container_to_json(value: Mapping[Any, Any] | list[Any] | tuple[Any, ...], field: str) -> Any:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValidationError(f"{field}.{k!r}", "keys must be strings")
            out[k] = to_json(v, f"{field}.{k}")
        return out
    return [to_json(v, f"{field}[{i}]") for i, v in enumerate(value)]


def result_json(value: object) -> tuple[Any, list[str]]:
    """A run's result as JSON, and what was left out of it.

    Unlike :func:`to_json` this never fails: an entry of a dict or list that cannot
    be stored is replaced by ``"<type, not recorded>"`` and named in the returned
    problems (for a warning at the call). A whole result that is not JSON data (a
    model, say) becomes ``{"type": ..., "recorded": False}``; returning an object is
    a normal use, so that is not a problem.
    """
    if not isinstance(value, Mapping | list | tuple):
        try:
            return to_json(value, "result"), []
        except ValidationError:
            return {"type": _type_name(value), "recorded": False}, []
    problems: list[str] = []
    return _lenient(value, "result", problems), problems


def _lenient(value: object, field: str, problems: list[str]) -> Any:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if isinstance(k, str):
                out[k] = _lenient(v, f"{field}[{k!r}]", problems)
            else:
                problems.append(f"{field}[{k!r}] (its key is not a string)")
        return out
    if isinstance(value, list | tuple):
        return [_lenient(v, f"{field}[{i}]", problems) for i, v in enumerate(value)]
    try:
        return to_json(value, field)
    except ValidationError:
        what = repr(value) if isinstance(value, float) else _describe(value)
        problems.append(f"{field} ({what})")
        return f"<{_type_name(value)}, not recorded>"


def _type_name(value: object) -> str:
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def summary_of(result: Any) -> dict[str, float]:
    """The summary metrics of a recorded result: its top-level numbers (not bools)."""
    if not isinstance(result, dict):
        return {}
    return {
        k: float(v)
        for k, v in result.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def unrecorded_message(problems: list[str]) -> str:
    """What a run's record says when parts of its result were left out."""
    return (
        "cannot record " + ", ".join(problems) + ": left out of the run's record "
        "(the caller still gets the value). Return numbers (float(x) or x.item()), strings, "
        "lists or dicts with string keys."
    )


def warn_unrecorded(problems: list[str]) -> None:
    """Warn, at the first caller outside Kiln, that these parts of a result were left out."""
    if not problems:
        return
    warnings.warn(
        "kiln: " + unrecorded_message(problems), RecordingWarning, stacklevel=_outside_kiln()
    )


def _outside_kiln() -> int:
    """The ``stacklevel`` of the nearest frame outside the kiln package (for warnings)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_KILN_DIR):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


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
        out[k] = str(to_json(v, f"tags.{k}"))
    return out


def _str_keys(mapping: Mapping[Any, Any], field: str) -> dict[str, Any]:
    for k in mapping:
        if not isinstance(k, str) or not k:
            raise ValidationError(f"{field}.{k!r}", "keys must be non-empty strings")
    return dict(mapping)


def metric_key(key: object) -> str:
    """A metric name the store can hold: see :func:`check_text`."""
    return check_text("metrics", key, max_len=METRIC_KEY_MAX, what="metric name")


def metric_value(key: object, value: object) -> float:
    """A metric as a float: numbers, 0-d numbers (see :func:`scalar`) and one-element
    arrays and tensors are accepted."""
    metric_key(key)
    if type(value) is float:
        return value
    try:
        if isinstance(value, numbers.Real):
            return float(value)
        number = scalar(value)
        if number is not None:
            return float(number)
        item = getattr(value, "item", None)  # one-element arrays and tensors
        if callable(item):
            try:
                number = item()
            except (TypeError, ValueError, RuntimeError):
                number = None
            if isinstance(number, numbers.Real):
                return float(number)
    except OverflowError:
        raise ValidationError(
            f"metrics.{key}", f"{_short(value)} is too large for a float", allowed="|x| < 1.8e308"
        ) from None
    raise ValidationError(
        f"metrics.{key}",
        f"{_short(value)} ({type(value).__name__}) is not a number",
        allowed="int, float, 0-d numbers (numpy scalars, 0-d arrays and tensors), "
        "one-element arrays and tensors",
    )


def metric_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise ValidationError("step", f"{_short(step)} ({type(step).__name__}) is not an integer")
    value = int(step)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValidationError("step", f"{_short(value)} is out of range", allowed="-2**63..2**63-1")
    return value


def artifact_name(name: object) -> str:
    """A relative path like ``model.pkl`` or ``ckpt/last.pt`` the store can hold."""
    allowed = f"a relative path like 'model.pkl', at most {ARTIFACT_NAME_MAX} characters"
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/"):
        raise ValidationError("name", f"{_short(name)} is not an artifact name", allowed=allowed)
    return check_text("name", name, max_len=ARTIFACT_NAME_MAX, what="artifact name")
