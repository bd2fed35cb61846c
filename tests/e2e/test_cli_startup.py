"""How the ``kiln`` command starts: only what a command needs is imported.

No timings here (bench/bench_cli.py measures them): these tests pin what is
imported, which is what the time is made of.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version

import pytest
from typer.testing import CliRunner

import kiln
from kiln.cli import COMMANDS, app, load_command


def modules_after(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``kiln ARGS`` in a fresh interpreter; its output and the modules it imported."""
    code = (
        "import sys, json, atexit\n"
        "atexit.register(lambda: print(json.dumps(sorted(sys.modules)), file=sys.stderr))\n"
        f"sys.argv = ['kiln', *{list(args)!r}]\n"
        "from kiln.cli import main\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=120,
    )
    return done, set(json.loads(done.stderr.strip().splitlines()[-1]))


def test_help_lists_every_command_without_importing_one() -> None:
    done, modules = modules_after("--help")
    assert done.returncode == 0, done.stderr
    for name, lazy in COMMANDS.items():
        assert f"{name} " in done.stdout and lazy.help in done.stdout
    loaded = {m for m in modules if m.startswith("kiln.cli.")}
    assert loaded == {"kiln.cli._help"}
    heavy = ("sqlalchemy", "pydantic", "kiln.app", "kiln.record.runs", "rich.markdown")
    assert [m for m in heavy if m in modules] == []


def test_runs_ls_imports_its_own_module_only() -> None:
    with kiln.App("startup").run():
        pass
    done, modules = modules_after("runs", "ls", "-n", "10")
    assert done.returncode == 0, done.stderr
    assert "succeeded" in done.stdout
    others = {m for m in modules if m.startswith("kiln.cli.") and m != "kiln.cli._render"}
    assert others == {"kiln.cli.runs"}
    unneeded = ("kiln.serve", "kiln.registry.models", "kiln.envs.manager", "uvicorn",
                "httpx", "alembic", "rich.markdown")  # fmt: skip
    assert [m for m in unneeded if m in modules] == []


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_listed_help_line_is_the_commands_own(name: str) -> None:
    """The table in kiln/cli/__init__.py cannot drift from the commands' docstrings."""
    command = load_command(name)
    assert (command.help or "").strip().splitlines()[0] == COMMANDS[name].help


def test_a_command_runs_through_the_lazy_group() -> None:
    result = CliRunner().invoke(app, ["runs", "--help"])
    assert result.exit_code == 0 and "compare" in result.output
    typo = CliRunner().invoke(app, ["runz"])
    assert typo.exit_code == 2 and "Did you mean" in typo.output


def test_version_prints_the_installed_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"kiln {version('kiln')}"


def test_errors_keep_square_brackets() -> None:
    """Rich markup used to eat "[parquet]" out of "pip install 'kiln[parquet]'"."""
    code = (
        "import sys\n"
        "from kiln.cli import app, main\n"
        "from kiln.errors import MissingDependencyError\n"
        "@app.command('fail-for-test')\n"
        "def fail() -> None:\n"
        "    raise MissingDependencyError('pyarrow', 'parquet')\n"
        "sys.argv = ['kiln', 'fail-for-test']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 1
    assert "pip install 'kiln[parquet]'" in done.stderr
