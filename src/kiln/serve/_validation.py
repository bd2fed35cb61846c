"""The request body of an endpoint: a pydantic model built from ``predict``'s annotations.

``def predict(self, features: list[float], threshold: float = 0.5)`` takes the body
``{"features": [...], "threshold": 0.7}``: each argument is a field, required unless
it has a default, unannotated ones take any JSON, and unknown fields are refused.
Validation is strict, as the published OpenAPI document says: ``false`` is not a
number, ``"3"`` is not an integer, and ``NaN``, ``Infinity`` or ``1e999`` are not
numbers JSON can carry (JSON's own forms still are: an integer for a
float, a string for a date or a UUID).
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, create_model


@functools.cache
def request_model(cls: type[Any]) -> type[BaseModel]:
    predict = cls.predict
    try:
        hints = typing.get_type_hints(predict)
    except Exception:  # an annotation that names something not importable here
        hints = {}
    fields: dict[str, Any] = {}
    for p in list(inspect.signature(predict).parameters.values())[1:]:
        annotation = hints.get(p.name, Any)
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (annotation, default)
    model: type[BaseModel] = create_model(
        f"{cls.__name__}Request",
        __config__=ConfigDict(
            extra="forbid", strict=True, allow_inf_nan=False, arbitrary_types_allowed=True
        ),
        **fields,
    )
    return model


def return_annotation(cls: type[Any]) -> Any:
    """``predict``'s return annotation; ``Any`` without one (or one not importable here)."""
    try:
        return typing.get_type_hints(cls.predict).get("return", Any)
    except Exception:
        return Any


@functools.cache
def answer_adapter(cls: type[Any]) -> tuple[TypeAdapter[Any] | None, str]:
    """What checks an answer's JSON against ``predict``'s return annotation (None for
    ``Any`` or a type pydantic cannot describe, such as a numpy array), and its name."""
    annotation = return_annotation(cls)
    name = getattr(annotation, "__name__", None) or str(annotation)
    if annotation is Any:
        return None, name
    try:
        adapter: TypeAdapter[Any] = TypeAdapter(annotation)
        adapter.json_schema(mode="serialization")  # what /openapi.json publishes
    except Exception:
        return None, name
    return adapter, name
