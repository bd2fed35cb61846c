"""Sizes as people write them: ``"512Mi"``, ``"4Gi"``, ``"1.5G"`` or a byte count.

Shared by resource requests (:mod:`kiln.compute.resources`) and sandboxes
(:mod:`kiln.govern.sandbox`), which must not import each other's layer.
"""

from __future__ import annotations

import re

from kiln.errors import ValidationError

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40,
}  # fmt: skip
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]{0,2})\s*$")


def parse_memory(value: int | str, field: str = "memory") -> int:
    """``"512Mi"``, ``"4Gi"``, ``"1.5G"`` or a byte count, as bytes."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValidationError(field, f"{value!r} is not a size", allowed="bytes or '512Mi', '4Gi'")
    if isinstance(value, int):
        if value < 0:
            raise ValidationError(field, f"{value} is negative")
        return value
    match = _MEMORY.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValidationError(
            field,
            f"{value!r} is not a size",
            allowed="bytes, or a number with Ki, Mi, Gi, Ti, K, M, G, T",
        )
    return int(float(match.group(1)) * _UNITS[unit])
