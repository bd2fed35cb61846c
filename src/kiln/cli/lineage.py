"""``kiln lineage REF``: where a run or artifact came from, and what came of it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated

import typer
from rich.text import Text
from rich.tree import Tree

from kiln.cli._render import console, reader
from kiln.record.lineage import Lineage


def lineage(
    ref: Annotated[str, typer.Argument(help="A run id, or an artifact's sha256 (prefix).")],
    as_json: Annotated[bool, typer.Option("--json", help="The graph as JSON.")] = False,
    as_dot: Annotated[bool, typer.Option("--dot", help="The graph for Graphviz.")] = False,
) -> None:
    """Print the upstream and downstream graph of a run or artifact as trees."""
    graph = reader().store.lineage(ref)
    if as_json:
        typer.echo(json.dumps(graph.to_dict(), indent=2))
        return
    if as_dot:
        typer.echo(graph.to_dot(), nl=False)
        return
    out = console()
    out.print(_tree(graph, "upstream (where it came from)", graph.upstream))
    out.print(_tree(graph, "downstream (what came of it)", graph.downstream))


def _tree(graph: Lineage, title: str, step: Callable[[str], list[str]]) -> Tree:
    root = Tree(f"[bold]{title}[/]")
    node = root.add(Text(graph.label(graph.root)))

    def grow(branch: Tree, at: str, seen: frozenset[str]) -> None:
        for nxt in step(at):
            child = branch.add(Text(graph.label(nxt)))  # names are the user's: never markup
            if nxt not in seen:
                grow(child, nxt, seen | {nxt})

    grow(node, graph.root, frozenset({graph.root}))
    return root
