import enum
import math
from pathlib import Path

import numpy as np
import pytest

from kiln.errors import ValidationError
from kiln.record.values import check_params, check_tags, metric_step, metric_value


class Color(enum.Enum):
    RED = "red"


def test_params_become_plain_json() -> None:
    params = check_params(
        {
            "lr": np.float32(0.5),
            "n": np.int64(3),
            "path": Path("/x"),
            "c": Color.RED,
            "nested": {"a": (1, 2)},
            "none": None,
        }
    )
    assert params == {
        "lr": 0.5,
        "n": 3,
        "path": "/x",
        "c": "red",
        "nested": {"a": [1, 2]},
        "none": None,
    }


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"f": object()}, "params.f"),
        ({"x": {"y": {1, 2}}}, "params.x.y"),
        ({"inf": math.inf}, "params.inf"),
        ({"x": {1: 2}}, "params.x"),
        ({"": 1}, "params"),
    ],
)
def test_bad_params_name_the_field(params: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        check_params(params)
    assert info.value.field.startswith(field)


def test_tags_are_strings() -> None:
    assert check_tags({"a": 1, "b": True}) == {"a": "1", "b": "True"}
    with pytest.raises(ValidationError, match="tags"):
        check_tags("team=a")  # type: ignore[arg-type]


def test_metric_values_accept_numbers_and_scalars_only() -> None:
    assert metric_value("m", 1) == 1.0
    assert metric_value("m", np.float32(0.25)) == 0.25
    assert metric_value("m", np.array([2.0])) == 2.0
    assert math.isnan(metric_value("m", math.nan))
    for bad in ("1.0", None, [1.0], b"1"):
        with pytest.raises(ValidationError, match=r"metrics\.m"):
            metric_value("m", bad)
    with pytest.raises(ValidationError, match="names"):
        metric_value(3, 1.0)


def test_steps_are_integers() -> None:
    assert metric_step(np.int64(4)) == 4
    for bad in (1.0, "1", True, None):
        with pytest.raises(ValidationError, match="step"):
            metric_step(bad)
