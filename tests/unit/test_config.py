from pathlib import Path

import pytest

from kiln._optional import require
from kiln.config import Settings
from kiln.errors import ConfigError, MissingDependencyError


def test_defaults_put_the_store_under_kiln_home(tmp_path: Path) -> None:
    s = Settings.from_env({"KILN_HOME": str(tmp_path), "KILN_ACTOR": "ci-agent"})
    assert s.home == tmp_path
    assert s.store_url == f"sqlite:///{tmp_path / 'kiln.db'}"
    assert s.blob_dir == tmp_path / "blobs"
    assert s.actor == "ci-agent" and s.backend == "local"


def test_actor_defaults_to_the_os_user() -> None:
    assert Settings.from_env({}).actor


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"KILN_STORE": "mysql://x"}, "KILN_STORE"),
        ({"KILN_BACKEND": "slurm"}, "KILN_BACKEND"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError, match=setting) as info:
        Settings.from_env(env)
    assert info.value.setting == setting


def test_a_missing_extra_names_the_extra_to_install() -> None:
    with pytest.raises(MissingDependencyError, match=r"pip install 'kiln\[ray\]'"):
        require("kiln_no_such_module_xyz", extra="ray")
    assert require("json", extra="none").dumps([]) == "[]"
