"""Model references: ``name:3`` (a version) and ``name@alias`` (what the alias holds).

Kept apart from the registry so that declaring an endpoint imports no database code.
"""

from __future__ import annotations

import re

from kiln.errors import ValidationError
from kiln.record.values import check_name

_ALIAS = re.compile(r"[a-z][a-z0-9_-]{0,99}")  # fullmatch: "$" admits a final newline
_VERSION = re.compile(r"[1-9][0-9]{0,8}")  # ASCII digits only ("²".isdigit() is true)


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """``name:3`` -> (name, 3, None); ``name@alias`` -> (name, None, alias)."""
    if "@" in ref:
        name, _, alias = ref.partition("@")
        check_alias(alias)
        return check_name("ref", name), None, alias
    name, sep, number = ref.partition(":")
    if not sep or not _VERSION.fullmatch(number):
        raise ValidationError(
            "ref",
            f"{ref[:100]!r} is not a model reference",
            allowed="NAME:VERSION (1 to 999999999) or NAME@ALIAS",
        )
    return check_name("ref", name), int(number), None


def check_alias(alias: str) -> None:
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias):
        raise ValidationError(
            "alias",
            f"{alias!r} is not an alias name",
            allowed="1-100 lowercase letters, digits, '_' or '-', starting with a letter",
        )
