"""``kiln --help``, drawn with the parts of rich that a start of the CLI loads anyway.

Typer's own rich help imports ``rich.markdown`` (markdown-it) and
``rich.traceback`` (pygments) to draw any help page, which alone took longer
than importing typer. The top-level page needs neither: a usage line, the
description and two tables. Subcommands' pages stay typer's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from typer._click import Context
    from typer.core import TyperGroup


def print_group_help(group: TyperGroup, ctx: Context) -> None:
    """Print the help page of ``group``: usage, description, options, commands."""
    out = Console(highlight=False)
    usage = Text.assemble(" Usage: ", (ctx.command_path, "bold"), " [OPTIONS] COMMAND [ARGS]...")
    out.print()
    out.print(usage, style="yellow")
    out.print()
    if group.help:
        out.print(Text(" " + group.help.strip().splitlines()[0]))
        out.print()
    options = _table()
    for param in group.get_params(ctx):
        options.add_row(", ".join(param.opts), getattr(param, "help", None) or "")
    out.print(_panel(options, "Options"))
    commands = _table()
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is not None and not command.hidden:
            commands.add_row(name, (command.help or "").strip().split("\n")[0])
    out.print(_panel(commands, "Commands"))
    out.print()


def _table() -> Table:
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 1), expand=True)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(ratio=10)
    return table


def _panel(table: Table, title: str) -> Panel:
    return Panel(Group(table), title=title, title_align="left", border_style="dim",
                 box=box.ROUNDED)  # fmt: skip
