"""The ``kiln`` command line: one module per command group, imported on first use.

``kiln --help`` lists every command from :data:`COMMANDS` without importing a
single command module: those pull in SQLAlchemy, the engine and the registry,
which made every start of the CLI cost over a second. A command's module is
imported when that command runs (``kiln runs ls`` imports ``kiln.cli.runs``
only). A test checks that each entry's one-line help is the one its module
declares, so the listing cannot drift from the commands.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, cast

import typer
from typer.core import TyperCommand, TyperGroup

from kiln.errors import KilnError

if TYPE_CHECKING:
    from typer._click import Context, HelpFormatter  # typer's own copy of click


@dataclass(frozen=True)
class LazyCommand:
    """A command of ``kiln``: where it lives and the line ``kiln --help`` shows for it.

    ``target`` is ``module:attribute``, a ``typer.Typer`` (a command group) or a
    function (a single command). ``extra_args`` passes unknown ``--name value``
    pairs through to the command (``kiln run FILE::FUNC --lr 0.1``).
    """

    target: str
    help: str
    extra_args: bool = False


# In the order `kiln --help` lists them: record, then registry and serving, then upkeep.
COMMANDS: dict[str, LazyCommand] = {
    "demo": LazyCommand(
        "kiln.cli.demo:demo",
        "Train six classifiers as a parallel sweep, promote the best, serve it, trace it.",
    ),
    "run": LazyCommand(
        "kiln.cli.run:run",
        "Run FUNCTION from FILE on the engine; --name value pairs are its arguments.",
        extra_args=True,
    ),
    "runs": LazyCommand(
        "kiln.cli.runs:app", "List, show and compare recorded runs, and what they used."
    ),
    "logs": LazyCommand(
        "kiln.cli.logs:logs",
        "Print what a run printed (stdout and stderr, in order), and with -f follow it.",
    ),
    "lineage": LazyCommand(
        "kiln.cli.lineage:lineage",
        "Print the upstream and downstream graph of a run or artifact as trees.",
    ),
    "reproduce": LazyCommand(
        "kiln.cli.reproduce:reproduce",
        "Re-run a run with its recorded code, params, data and environment lock; compare.",
    ),
    "export": LazyCommand(
        "kiln.cli.bundle:export",
        "Write a run, its metrics, code patch, env lock and artifacts to one file.",
    ),
    "verify": LazyCommand(
        "kiln.cli.bundle:verify",
        "Check every hash in a bundle, offline. Exits 1 if anything does not match.",
    ),
    "import": LazyCommand(
        "kiln.cli.bundle:import_",
        "Add a bundle's run to this store, identical (same ids and hashes). Twice is a no-op.",
    ),
    "keys": LazyCommand("kiln.cli.keys:app", "Ed25519 keys that sign bundles: create, add, ls."),
    "models": LazyCommand("kiln.cli.models:app", "Registered models, their versions and aliases."),
    "serve": LazyCommand(
        "kiln.cli.serve:serve",
        "Serve an endpoint over HTTP: POST /predict, GET /healthz /readyz /metrics.",
    ),
    "batch": LazyCommand(
        "kiln.cli.serve:batch",
        "Run predict over a file on replicas; a killed job resumes where it stopped.",
    ),
    "endpoints": LazyCommand("kiln.cli.serve:endpoints_app", "Endpoints served from this store."),
    "traces": LazyCommand("kiln.cli.serve:traces_app", "Traces of inferences."),
    "why": LazyCommand(
        "kiln.cli.serve:why",
        "Everything behind one inference: model version, promotion, run, code, data, env.",
    ),
    "k8s": LazyCommand(
        "kiln.cli.k8s:app", "Kubernetes objects of functions and endpoints: render, apply."
    ),
    "envs": LazyCommand("kiln.cli.envs:app", "List, show and prune cached environments."),
    "audit": LazyCommand("kiln.cli.audit:app", "Read and verify the audit log."),
    "server": LazyCommand(
        "kiln.cli.server:server",
        "Serve the record over HTTP (/api/v1, /openapi.json, /metrics) until Ctrl-C or SIGTERM.",
    ),
    "cost": LazyCommand(
        "kiln.cli.cost:cost",
        "What ended runs held and cost, grouped by project, user, app or sweep.",
    ),
    "pools": LazyCommand(
        "kiln.cli.quotas:pools_app", "Pools of hardware on a team server, and their capacity."
    ),
    "queues": LazyCommand(
        "kiln.cli.quotas:queues_app", "Your project's queues on pools: quotas, cohorts, limits."
    ),
    "budgets": LazyCommand(
        "kiln.cli.quotas:budgets_app", "Your project's budgets, and its principals'."
    ),
    "queue": LazyCommand(
        "kiln.cli.quotas:queue",
        "Your project's runs on shared pools: admitted, and pending with why they wait.",
    ),
    "explain": LazyCommand(
        "kiln.cli.quotas:explain", "Why a run waits, was preempted or was refused admission."
    ),
    "what-if": LazyCommand(
        "kiln.cli.quotas:what_if",
        "Would a run of this shape be admitted now, and whom would it preempt? Changes nothing.",
    ),
    "ui": LazyCommand(
        "kiln.cli.server:ui",
        "Open the web dashboard on this machine's record (or on the team server).",
    ),
    "sync": LazyCommand(
        "kiln.cli.server:sync",
        "Send the batches spooled while the server could not be reached (KILN_HOME/spool).",
    ),
    "push": LazyCommand(
        "kiln.cli.server:push",
        "Copy runs (blobs, metric points, lineage) from this store to a server. Twice: no-op.",
    ),
    "login": LazyCommand(
        "kiln.cli.identity:login", "Store a token for a team server (or enrol its first admin)."
    ),
    "users": LazyCommand(
        "kiln.cli.identity:users_app",
        "Principals of a team server: users, service accounts, agents.",
    ),
    "tokens": LazyCommand("kiln.cli.identity:tokens_app", "Tokens for a team server."),
    "projects": LazyCommand(
        "kiln.cli.identity:projects_app",
        "Projects of a team server (tenants) and their members.",
    ),
    "approvals": LazyCommand(
        "kiln.cli.approvals:app", "Agents' actions waiting for a person's approval."
    ),
    "mcp": LazyCommand(
        "kiln.cli.mcp:mcp",
        "Serve Kiln's tools to an MCP client over stdio (with KILN_SERVER: the server's).",
    ),
    "gc": LazyCommand(
        "kiln.cli.gc:gc",
        "Remove blobs no run, artifact or environment references; never a referenced one.",
    ),
}


def load_command(name: str) -> TyperCommand | TyperGroup:
    """Import the module of ``kiln NAME`` and build its click command."""
    lazy = COMMANDS[name]
    module_name, _, attribute = lazy.target.partition(":")
    target = getattr(importlib.import_module(module_name), attribute)
    if isinstance(target, typer.Typer):
        group = typer.main.get_group(target)
        group.name = name
        return group
    single = typer.Typer(add_completion=False)
    settings = {"allow_extra_args": True, "ignore_unknown_options": True}
    single.command(name, context_settings=settings if lazy.extra_args else None)(target)
    # One command and no callback: typer returns the command itself, never a group.
    return cast(TyperCommand, typer.main.get_command(single))


class LazyGroup(TyperGroup):
    """The ``kiln`` group: lists :data:`COMMANDS` by their help line, imports one on use.

    Until a command runs it is a stand-in carrying only its name and help, which
    is all that ``kiln --help`` and "No such command ... Did you mean" read.
    """

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self._loaded: set[str] = set()
        for name, lazy in COMMANDS.items():
            self.commands.setdefault(name, TyperCommand(name, help=lazy.help))

    def resolve_command(self, ctx: Context, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if name in COMMANDS and name not in self._loaded:
            command = self.commands[name] = load_command(name)
            self._loaded.add(name)
        return name, command, rest

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        from kiln.cli._help import print_group_help

        print_group_help(self, ctx)


app = typer.Typer(
    name="kiln",
    cls=LazyGroup,
    help="Run experiments, record every run, promote and serve the best.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(requested: bool) -> None:
    if requested:
        from importlib.metadata import version

        typer.echo(f"kiln {version('kiln')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print Kiln's version and exit.", is_eager=True,
            callback=_print_version,
        ),
    ] = False,
) -> None:  # fmt: skip
    """Run experiments, record every run, promote and serve the best."""


def main() -> None:
    """Entry point of the ``kiln`` script: Kiln's own errors become one red line and exit
    code 1. It ends the process (see :func:`_exit`); in-process callers use ``app``."""
    try:
        app()
    except KilnError as exc:
        from rich.console import Console
        from rich.text import Text

        # A Text, not markup: "pip install 'kiln[parquet]'" must keep its [parquet].
        line = Text.assemble(("error:", "bold red"), " ", str(exc))
        Console(stderr=True, soft_wrap=True, highlight=False).print(line)
        _exit(1)
    except SystemExit as done:  # typer ends every command this way
        _exit(done.code)
    _exit(0)


def _exit(code: str | int | None) -> NoReturn:
    """End the process without tearing the interpreter down.

    Tearing down the modules a command loaded (SQLAlchemy, pydantic under typer)
    took a third of a second, longer than many commands themselves. Everything a
    normal exit would finish still is: exit handlers run (recorders flush and
    close their stores, logging flushes) and the output streams are flushed. Where
    a thread that is not a daemon still runs, Python's own exit waits for it.
    """
    import atexit
    import os
    import threading

    if isinstance(code, str):  # sys.exit("message") prints it and exits 1
        print(code, file=sys.stderr)
        code = 1
    code = code or 0
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (kiln runs ls | head): nothing to do
            code = code or 1
    os._exit(code)
