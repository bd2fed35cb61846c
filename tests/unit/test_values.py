import enum
import math
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kiln.errors import RecordingWarning, ValidationError
from kiln.record.values import (
    artifact_name,
    check_name,
    check_params,
    check_tags,
    metric_step,
    metric_value,
    result_json,
    scalar,
    summary_of,
    warn_unrecorded,
)


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
    with pytest.raises(ValidationError, match="metric name"):
        metric_value(3, 1.0)


@pytest.mark.parametrize(
    ("call", "field", "allowed"),
    [
        (lambda: metric_value("m", 10**400), "metrics.m", "1.8e308"),
        (lambda: metric_value("x" * 251, 1.0), "metrics", "at most 250 characters"),
        (lambda: metric_value("a\x00b", 1.0), "metrics", "printable"),
        (lambda: metric_value("loss\n", 1.0), "metrics", "printable"),
        (lambda: metric_step(2**63), "step", "2**63-1"),
        (lambda: metric_step(-(2**63) - 1), "step", "-2**63"),
        (lambda: check_params({"seed": 10**5000}), "params.seed", "64 bits"),
        (lambda: check_params({"n": 2**64}), "params.n", "64 bits"),
        (lambda: check_tags({"t": 10**5000}), "tags.t", "64 bits"),
        (lambda: artifact_name("m" * 501), "name", "at most 500"),
        (lambda: artifact_name("model\n.pkl"), "name", "printable"),
        (lambda: check_name("app", "ok\n"), "app", "letters"),
    ],
)
def test_values_the_store_cannot_hold_are_refused_naming_the_field(
    call: Any, field: str, allowed: str
) -> None:
    with pytest.raises(ValidationError) as info:
        call()
    assert info.value.field == field
    message = str(info.value)
    assert allowed in message and len(message) < 300  # one line, never the whole value


def test_the_largest_values_the_store_holds_are_accepted() -> None:
    assert metric_step(2**63 - 1) == 2**63 - 1
    assert check_params({"seed": 2**64 - 1, "neg": -(2**63)}) == {
        "seed": 2**64 - 1,
        "neg": -(2**63),
    }
    assert metric_value("k" * 250, 1e308) == 1e308
    assert artifact_name("d/" + "m" * 498) == "d/" + "m" * 498


def test_steps_are_integers() -> None:
    assert metric_step(np.int64(4)) == 4
    for bad in (1.0, "1", True, None):
        with pytest.raises(ValidationError, match="step"):
            metric_step(bad)


def test_zero_d_numbers_become_python_numbers() -> None:
    assert scalar(np.float32(0.25)) == 0.25 and type(scalar(np.float32(0.25))) is float
    assert scalar(np.int64(3)) == 3 and type(scalar(np.int64(3))) is int
    assert scalar(np.bool_(True)) is True
    assert scalar(np.array(0.5)) == 0.5  # a 0-d array
    assert scalar(torch.tensor(0.5)) == 0.5
    assert scalar(torch.tensor(0.5, requires_grad=True)) == 0.5
    assert scalar(torch.tensor(7)) == 7 and scalar(torch.tensor(False)) is False
    assert scalar(Decimal("1.5")) == 1.5
    # values with a length, and complex numbers, are not 0-d numbers
    for other in (np.array([0.5]), torch.tensor([0.5]), np.complex64(1j), "1.0", None, [1.0]):
        assert scalar(other) is None, other
    assert metric_value("m", torch.tensor(2.0)) == 2.0


def test_results_keep_what_can_be_recorded_and_name_what_cannot() -> None:
    result, problems = result_json(
        {"acc": torch.tensor(0.75), "f1": np.float32(0.5), "n": np.int64(3),
         "hist": torch.zeros(2, 3), "ok": True, "nested": {"loss": math.nan}}
    )  # fmt: skip
    assert result == {
        "acc": 0.75, "f1": 0.5, "n": 3, "hist": "<torch.Tensor, not recorded>", "ok": True,
        "nested": {"loss": "<float, not recorded>"},
    }  # fmt: skip
    assert problems == [
        "result['hist'] (torch.Tensor of shape (2, 3))",
        "result['nested']['loss'] (nan)",
    ]
    assert summary_of(result) == {"acc": 0.75, "f1": 0.5, "n": 3.0}  # no bools, no nesting
    assert result_json(torch.tensor(0.5)) == (0.5, [])
    # returning an object is a normal use: recorded by type, no problem to warn about
    assert result_json(object()) == ({"type": "object", "recorded": False}, [])


def test_what_cannot_be_recorded_is_warned_about_at_the_callers_line() -> None:
    with pytest.warns(RecordingWarning, match=r"result\['hist'\]") as caught:
        warn_unrecorded(["result['hist'] (torch.Tensor of shape (2, 3))"])
    assert caught[0].filename == __file__
    warn_unrecorded([])  # nothing to say: no warning (pytest makes warnings errors)
