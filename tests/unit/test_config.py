from pathlib import Path

import pytest

from kiln._optional import require
from kiln.config import Settings, cache_dir, make_home
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
        ({"KILN_SERVER": "ftp://host:8700"}, "KILN_SERVER"),
        ({"KILN_SERVER": "http://"}, "KILN_SERVER"),
        ({"KILN_SERVER": "http://host:notaport"}, "KILN_SERVER"),
        ({"KILN_SERVER": "http://user:secret@host:8700"}, "KILN_SERVER"),
        ({"KILN_SERVER": "http://host:8700/api/v1"}, "KILN_SERVER"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError, match=setting) as info:
        Settings.from_env(env)
    assert info.value.setting == setting


def test_kiln_server_is_kept_as_its_root_url() -> None:
    settings = Settings.from_env({"KILN_SERVER": "https://kiln.example:8700/"})
    assert settings.server_url == "https://kiln.example:8700"
    assert settings.record_url == settings.server_url
    assert Settings.from_env({}).record_url.startswith("sqlite:///")


def test_a_missing_extra_names_the_extra_to_install() -> None:
    with pytest.raises(MissingDependencyError, match=r"pip install 'kiln\[ray\]'"):
        require("kiln_no_such_module_xyz", extra="ray")
    assert require("json", extra="none").dumps([]) == "[]"


def test_without_kiln_home_the_nearest_kiln_folder_above_is_the_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "project" / ".kiln").mkdir(parents=True)
    deep = tmp_path / "project" / "src" / "models"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    s = Settings.from_env({})
    assert s.home == tmp_path / "project" / ".kiln"
    assert s.store_url == f"sqlite:///{tmp_path / 'project' / '.kiln' / 'kiln.db'}"
    assert str(deep) in s.home_origin


def test_without_a_kiln_folder_the_home_is_at_the_work_tree_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    sub = tmp_path / "repo" / "notebooks"
    sub.mkdir()
    monkeypatch.chdir(sub)
    s = Settings.from_env({})
    assert s.home == tmp_path / "repo" / ".kiln"
    assert "work tree" in s.home_origin and str(sub) in s.home_origin


def test_outside_a_work_tree_the_home_is_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({})
    assert s.home == tmp_path / ".kiln"
    assert "not in a git work tree" in s.home_origin


def test_kiln_home_wins_over_any_kiln_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".kiln").mkdir()
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({"KILN_HOME": str(tmp_path / "elsewhere")})
    assert s.home == tmp_path / "elsewhere" and "KILN_HOME" in s.home_origin


def test_the_env_cache_is_kiln_cache_else_the_users_cache_dir(tmp_path: Path) -> None:
    assert Settings.from_env({"KILN_CACHE": str(tmp_path / "c")}).cache == tmp_path / "c"
    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "kiln"
    assert cache_dir({"XDG_CACHE_HOME": "relative"}) == Path.home() / ".cache" / "kiln"


def test_a_home_kiln_creates_ignores_itself(tmp_path: Path) -> None:
    make_home(tmp_path / "new" / ".kiln")
    assert (tmp_path / "new" / ".kiln" / ".gitignore").read_text().splitlines()[-1] == "*"
    (tmp_path / "mine").mkdir()
    make_home(tmp_path / "mine")  # a folder the user made: nothing is added to it
    assert not (tmp_path / "mine" / ".gitignore").exists()


@pytest.mark.parametrize("below", ["", "sub/folder"])
def test_a_kiln_home_at_or_under_a_file_is_a_config_error(tmp_path: Path, below: str) -> None:
    (tmp_path / "notes.txt").write_text("x")
    home = tmp_path / "notes.txt" / below if below else tmp_path / "notes.txt"
    with pytest.raises(ConfigError, match=r"KILN_HOME: .*notes.txt is a file; set it to a folder"):
        Settings.from_env({"KILN_HOME": str(home)})
