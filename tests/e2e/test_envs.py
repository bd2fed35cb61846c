"""Environments resolved and built for real with uv, from the package index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kiln
from kiln._engine import close_engines
from kiln.cli import app as cli
from kiln.config import Settings
from kiln.envs.manager import EnvManager
from kiln.errors import EnvError
from kiln.record.blobs import FileBlobStore


def _index_reachable() -> str | None:
    import uv

    try:
        proc = subprocess.run(
            [uv.find_uv_bin(), "pip", "compile", "-", "--quiet", "--python", sys.executable],
            input="six==1.16.0\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return "timed out"
    return None if proc.returncode == 0 else proc.stderr.strip()[-300:]


_UNREACHABLE = _index_reachable()
if _UNREACHABLE and os.environ.get("CI"):
    raise RuntimeError(f"CI must reach the package index for the env tests: {_UNREACHABLE}")
pytestmark = pytest.mark.skipif(
    _UNREACHABLE is not None, reason=f"the package index is unreachable: {_UNREACHABLE}"
)

SIX = kiln.Env(packages=["six==1.16.0"])
app = kiln.App("envs")


@app.function(env=SIX)
def inside() -> dict:
    import six

    kiln.log({"ok": 1.0})
    try:
        import rich  # the caller has it; the env does not declare it

        leaked = rich.__name__
    except ImportError:
        leaked = None
    return {"prefix": sys.prefix, "six": six.__version__, "pid": os.getpid(), "leaked": leaked}


@app.function()
def outside() -> int:
    return os.getpid()


def manager() -> EnvManager:
    settings = Settings.from_env()
    return EnvManager(settings.home, FileBlobStore(settings.blob_dir), settings.cache)


def test_a_function_runs_in_its_env_and_the_record_names_the_lock() -> None:
    result = inside.remote()
    assert result["six"] == "1.16.0" and result["leaked"] is None
    env_dir = Path(result["prefix"])
    assert env_dir.parent == Settings.from_env().cache / "envs"
    (record,) = kiln.runs(app="envs")
    assert record.environment.env_id == env_dir.name
    lock = kiln.get_run(record.id)._blobs.read(record.environment.lock_sha256)  # type: ignore[union-attr]
    assert b"six==1.16.0" in lock and b"--hash=sha256:" in lock
    assert record.summary["ok"] == 1.0 and record.summary["pid"] == result["pid"]
    assert record.environment.package_count == 1  # six; Kiln's own links are not installs


def test_warm_workers_are_kept_per_env() -> None:
    first, second = inside.remote()["pid"], inside.remote()["pid"]
    assert first == second
    assert outside.remote() != first


def test_a_second_request_neither_resolves_nor_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    m = manager()
    built = m.ensure(SIX)
    assert built.resolved and built.built
    again = m.ensure(SIX)
    assert (again.resolved, again.built, again.path) == (False, False, built.path)
    # no network now: a cached identity still works (and calls no uv at all)
    monkeypatch.setenv("UV_OFFLINE", "1")
    assert m.ensure(SIX).path == built.path
    # even rebuilt after a prune: from the lock, with no resolver, offline
    assert m.prune(0, set()) == [built.env_id]
    rebuilt = m.ensure(SIX)
    assert (rebuilt.resolved, rebuilt.built, rebuilt.env_id) == (False, True, built.env_id)


def test_the_same_lock_is_the_same_env_however_it_was_asked_for(tmp_path: Path) -> None:
    m = manager()
    by_packages = m.ensure(SIX)
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("six==1.16.0\n")
    assert m.ensure(kiln.Env(requirements=reqs)).env_id == by_packages.env_id
    project = tmp_path / "proj"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "p"\nversion = "0"\ndependencies = ["six==1.16.0"]\n'
    )
    assert m.ensure(kiln.Env(requirements=project / "pyproject.toml")).env_id == by_packages.env_id


@pytest.mark.parametrize(
    ("packages", "explanation"),
    [
        (["kiln-no-such-package-xyz==1.0"], "not found in the package registry"),
        (["six==1.16.0", "six==1.15.0"], "six==1.16.0"),
    ],
)
def test_an_unresolvable_env_fails_before_anything_runs(packages: list, explanation: str) -> None:
    bad = app.function(env=kiln.Env(packages=packages))(outside.fn)
    with pytest.raises(EnvError, match="could not resolve") as info:
        bad.remote()
    assert explanation in info.value.detail
    (run_id,) = info.value.run_ids
    record = kiln.get_run(run_id)
    assert record.status is kiln.RunStatus.FAILED
    assert record.resources["stage"] == "environment" and explanation in (record.error or "")


def test_two_processes_asking_for_one_new_env_build_it_once() -> None:
    script = textwrap.dedent(
        """
        import sys
        from kiln.config import Settings
        from kiln.envs.manager import EnvManager
        from kiln.envs.spec import Env
        from kiln.record.blobs import FileBlobStore
        s = Settings.from_env()
        m = EnvManager(s.home, FileBlobStore(s.blob_dir), s.cache)
        print(m.ensure(Env(packages=["six==1.16.0", "idna==3.7"])).path)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    paths = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert paths[0] == paths[1]
    log = (Settings.from_env().cache / "envs" / "builds.log").read_text().splitlines()
    assert len([line for line in log if Path(paths[0]).name in line]) == 1


def test_envs_cli_lists_shows_and_prunes_but_not_what_is_in_use() -> None:
    inside.remote()  # a warm worker now holds the env
    env_id = kiln.runs(app="envs")[0].environment.env_id
    assert env_id is not None
    listed = json.loads(CliRunner().invoke(cli, ["envs", "ls", "--json"]).output)
    assert [e["env_id"] for e in listed] == [env_id]
    shown = json.loads(CliRunner().invoke(cli, ["envs", "show", env_id[:10], "--json"]).output)
    assert "six==1.16.0" in shown["lock"] and len(shown["runs"]) == 1
    pruned = CliRunner().invoke(cli, ["envs", "prune", "--older-than", "0s", "--json"])
    assert json.loads(pruned.output)["removed"] == []
    close_engines()  # the worker exits and lets go of the env
    pruned = CliRunner().invoke(cli, ["envs", "prune", "--older-than", "0s", "--json"])
    assert json.loads(pruned.output)["removed"] == [env_id]
    assert CliRunner().invoke(cli, ["envs", "ls", "--json"]).output.strip() == "[]"
    bad = CliRunner().invoke(cli, ["envs", "prune", "--older-than", "soon"])
    assert bad.exit_code != 0


def test_a_python_version_is_found_by_uv_and_a_missing_one_is_explained() -> None:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    pinned = app.function(env=kiln.Env(packages=["six==1.16.0"], python=version))(outside.fn)
    assert pinned.remote() != os.getpid()
    record = kiln.runs(app="envs", limit=1)[0]
    assert record.environment.python.startswith(version) and record.environment.env_id
    ancient = app.function(env=kiln.Env(packages=["six"], python="2.6"))(outside.fn)
    with pytest.raises(EnvError, match=r"could not find Python 2\.6"):
        ancient.remote()


def test_two_homes_share_one_built_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = inside.remote()
    close_engines()
    second_home = tmp_path / "other-project" / ".kiln"
    monkeypatch.setenv("KILN_HOME", str(second_home))

    def no_uv(*args: str, what: str) -> str:
        raise AssertionError(f"uv was called to {what}: the env is built already")

    monkeypatch.setattr(EnvManager, "_uv", lambda self, *a, what: no_uv(*a, what=what))
    again = inside.remote()  # the same lock from another home: a cache hit
    assert again["prefix"] == first["prefix"] and again["six"] == "1.16.0"
    (record,) = kiln.runs(app="envs")  # the second home's record, with its own lock blob
    lock = FileBlobStore(second_home / "blobs").read(record.environment.lock_sha256 or "")
    assert b"six==1.16.0" in lock

    (info,) = manager().installed()
    assert info.homes == (str(second_home), str(tmp_path / "kiln-home"))
    # the other home used it a moment ago: a week's prune from here keeps it
    assert manager().prune(7 * 86400, set()) == []
