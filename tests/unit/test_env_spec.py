from pathlib import Path

import pytest

import kiln
from kiln.errors import ValidationError


def test_declarations_are_normalized() -> None:
    env = kiln.Env(packages=["Six==1.16.0", "idna>=3", "idna>=3"])
    assert env.packages == ("idna>=3", "Six==1.16.0")
    assert env.declaration_key("py") == kiln.Env(["idna>=3", "Six==1.16.0"]).declaration_key("py")
    assert env.declaration_key("py") != env.declaration_key("other-python")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"packages": ["numpy>>2"]}, "packages[0]"),
        ({"packages": ["ok", 3]}, "packages[1]"),
        ({"packages": "numpy"}, "packages"),
        ({"packages": []}, "packages"),
        ({"packages": ["six"], "python": "three"}, "python"),
        ({"requirements": "/no/such/requirements.txt"}, "requirements"),
        ({"packages": ["six"], "index": "pypi"}, "index"),
    ],
)
def test_bad_declarations_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        kiln.Env(**kwargs)
    assert info.value.field == field


def test_requirements_must_be_a_requirements_file(tmp_path: Path) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("six\n")
    with pytest.raises(ValidationError, match="requirements file"):
        kiln.Env(requirements=notes)


def test_a_function_env_must_be_an_env() -> None:
    with pytest.raises(ValidationError, match="env"):
        kiln.App("a").function(env=["six"])(lambda: None)  # type: ignore[arg-type]
