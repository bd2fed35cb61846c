"""``kiln pools``, ``kiln queues``, ``kiln budgets``, ``kiln queue``, ``kiln explain`` and
``kiln what-if``: shared hardware on a team server (see :mod:`kiln.server.quotas`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.table import Table

from kiln.cli._render import console, fmt_time, parse_duration, plain
from kiln.compute.resources import parse_memory
from kiln.config import Settings, server_token
from kiln.errors import ConfigError, ValidationError
from kiln.record.values import check_name

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts and agents.")]
Cpu = Annotated[float, typer.Option("--cpu", help="Cores.")]
Memory = Annotated[
    str,
    typer.Option(
        "--memory", help="Memory, e.g. 64Gi (0: none, and runs asking for some are refused)."
    ),
]
Gpu = Annotated[float, typer.Option("--gpu", help="GPUs (fractions of one allowed).")]
ProjectOpt = Annotated[
    str | None,
    typer.Option("--project", help="The project (default: KILN_PROJECT, else your token's)."),
]
pools_app = typer.Typer(help="Pools of hardware on a team server, and their capacity.",
                        no_args_is_help=True)  # fmt: skip
queues_app = typer.Typer(help="Your project's queues on pools: quotas, cohorts, limits.",
                         no_args_is_help=True)  # fmt: skip
budgets_app = typer.Typer(help="Your project's budgets, and its principals'.",
                          no_args_is_help=True)  # fmt: skip
RESOURCES = ("cpu", "memory", "gpu")


def _client(project: str | None = None) -> Any:
    from kiln.record.store.http import Client

    settings = Settings.from_env()
    url = settings.server_url
    if not url:
        raise ConfigError("KILN_SERVER", "is not set: this lives on a team server; "
                          "`export KILN_SERVER=URL` (and `kiln login URL` once, for a "
                          "token)")  # fmt: skip
    token = server_token(url)
    if not token:
        raise ConfigError("KILN_TOKEN", f"no token for {url}: run `kiln login {url}`")
    return Client(url, actor="", token=token, project=project or settings.project)


def _number(value: float, option: str, *, most: float = 1e6) -> float:
    """``value`` if it is a finite number from 0 to ``most``; else a clear error."""
    if not math.isfinite(value) or not 0 <= value <= most:
        raise ValidationError(option, f"{value!r} is not a number from 0 to {most:g}")
    return value


def _amount(cpu: float, memory: str, gpu: float, field: str = "--memory") -> dict[str, Any]:
    return {"cpu": _number(cpu, "--cpu"), "memory_bytes": parse_memory(memory, field),
            "gpu": _number(gpu, "--gpu", most=1e5)}  # fmt: skip


def _limit(text: str | None, option: str) -> dict[str, Any] | None:
    """``cpu=4,memory=16Gi,gpu=1`` as an amount (a resource left out: 0)."""
    if text is None:
        return None
    out: dict[str, Any] = {"cpu": 0.0, "memory_bytes": 0, "gpu": 0.0}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in RESOURCES or not value:
            raise ValidationError(option, f"{part!r} is not RESOURCE=AMOUNT",
                                  allowed="cpu=N, memory=SIZE, gpu=N, comma-separated")  # fmt: skip
        if key == "memory":
            out["memory_bytes"] = parse_memory(value.strip(), option)
            continue
        try:
            out[key] = _number(float(value), option)
        except ValueError:
            raise ValidationError(option, f"{value!r} is not a number of {key}") from None
    return out


def _listing(
    found: list[dict[str, Any]], as_json: bool, empty: str, columns: tuple[str, ...],
    row: Callable[[dict[str, Any]], tuple[Any, ...]], *, right: int = 0,
) -> None:  # fmt: skip
    """Print a listing: JSON, a line saying it is empty, or a table (its last ``right``
    columns aligned right)."""
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    if not found:
        console().print(empty)
        return
    table = Table(show_edge=False, header_style="bold")
    for i, column in enumerate(columns):
        table.add_column(column, justify="right" if i >= len(columns) - right else "left")
    for item in found:
        table.add_row(*row(item))
    console().print(table)


def _shown(amounts: dict[str, float]) -> str:
    units = {"cpu": "cpu", "memory": "GiB", "gpu": "gpu"}
    return ", ".join(f"{v:g} {units.get(k, k)}" for k, v in amounts.items() if v) or "-"


# -- pools ---------------------------------------------------------------------------


@pools_app.command("set")
def pools_set(
    name: Annotated[str, typer.Argument(help="The pool, e.g. gpu-box or ray-prod.")],
    cpu: Cpu = 0.0,
    memory: Memory = "0",
    gpu: Gpu = 0.0,
    gpu_type: Annotated[
        str | None, typer.Option("--gpu-type", help="Its GPUs' type, for prices (e.g. H100).")
    ] = None,
    detect: Annotated[
        bool, typer.Option("--detect", help="Take the capacity from this machine.")
    ] = False,
) -> None:
    """Register a pool and its capacity, or change them (admins of the default project)."""
    check_name("name", name)
    body = _amount(cpu, memory, gpu)
    if detect:
        from kiln.compute.resources import detect_inventory

        inv = detect_inventory()
        body = {"cpu": float(inv.cpu), "memory_bytes": inv.memory_bytes,
                "gpu": float(len(inv.gpus))}  # fmt: skip
    _client().call("PUT", f"/pools/{name}", json={**body, "gpu_type": gpu_type})
    shown = _shown({"cpu": body["cpu"], "memory": body["memory_bytes"] / 2**30,
                    "gpu": body["gpu"]})  # fmt: skip
    console().print(plain(f"pool {name}: {shown}"))


@pools_app.command("ls")
def pools_ls(as_json: JsonOpt = False) -> None:
    """Every pool: its capacity, what its queues hold now, and how much waits."""
    _listing(_client().call("GET", "/pools")["items"], as_json,
             "no pools: an admin adds one with `kiln pools set NAME --cpu N ...`",
             ("pool", "capacity", "in use", "queues", "pending"),
             lambda p: (plain(p["name"]), _shown(p["capacity"]), _shown(p["in_use"]),
                        plain(", ".join(p["queues"]) or "-"), str(p["pending"])))  # fmt: skip


# -- queues --------------------------------------------------------------------------


@queues_app.command("set")
def queues_set(
    pool: Annotated[str, typer.Argument(help="The pool this queue takes from.")],
    cpu: Cpu = 0.0,
    memory: Memory = "0",
    gpu: Gpu = 0.0,
    cohort: Annotated[
        str | None, typer.Option("--cohort", help="Queues of a cohort lend what they do not use.")
    ] = None,
    borrowing_limit: Annotated[
        str | None,
        typer.Option(
            "--borrowing-limit",
            help="At most this borrowed, e.g. gpu=2,cpu=8 (default: whatever the cohort lends).",
        ),
    ] = None,
    lending_limit: Annotated[
        str | None,
        typer.Option("--lending-limit", help="At most this lent, e.g. gpu=0 (default: all)."),
    ] = None,
    weight: Annotated[float, typer.Option("--weight", help="Fair-sharing weight.")] = 1.0,
    strategy: Annotated[
        str, typer.Option("--strategy", help="strict (only the head may go) or best-effort.")
    ] = "best-effort",
    fair_sharing: Annotated[
        bool, typer.Option("--fair-sharing", help="Preempt borrowers by share over weight.")
    ] = False,
    project: ProjectOpt = None,
) -> None:
    """Set your project's nominal quota on a pool (project admins)."""
    body = {**_amount(cpu, memory, gpu), "cohort": cohort, "weight": _number(weight, "--weight"),
            "strategy": strategy, "fair_sharing": fair_sharing,
            "borrowing_limit": _limit(borrowing_limit, "--borrowing-limit"),
            "lending_limit": _limit(lending_limit, "--lending-limit")}  # fmt: skip
    _client(project).call("PUT", f"/queues/{pool}", json=body)
    shown = _shown({"cpu": cpu, "memory": body["memory_bytes"] / 2**30, "gpu": gpu})
    console().print(plain(f"queue on {pool}: {shown}" + (f", cohort {cohort}" if cohort else "")))


@queues_app.command("rm")
def queues_rm(
    pool: Annotated[str, typer.Argument(help="The pool.")], project: ProjectOpt = None
) -> None:
    """Remove your project's queue on a pool (once nothing of it is live)."""
    _client(project).call("DELETE", f"/queues/{pool}")
    console().print(plain(f"queue on {pool} removed"))


@queues_app.command("ls")
def queues_ls(project: ProjectOpt = None, as_json: JsonOpt = False) -> None:
    """Your project's queues: quota, limits, what they hold now and what waits."""
    _listing(_client(project).call("GET", "/queues")["items"], as_json,
             "no queues: a project admin sets one with `kiln queues set POOL ...`",
             ("pool", "nominal", "in use", "cohort", "admitted", "pending"),
             lambda q: (plain(q["pool"]), _shown(q["nominal"]), _shown(q["in_use"]),
                        plain(q["cohort"] or "-"), str(q["admitted"]),
                        str(q["pending"])))  # fmt: skip


# -- budgets -------------------------------------------------------------------------


@budgets_app.command("set")
def budgets_set(
    amount: Annotated[float, typer.Argument(help="Dollars per period.")],
    principal: Annotated[
        str | None, typer.Option("--principal", help="One principal's (an agent's) budget.")
    ] = None,
    period: Annotated[str, typer.Option("--period", help="day, week, month or total.")] = "month",
    project: ProjectOpt = None,
) -> None:
    """Set your project's budget, or one principal's in it (project admins)."""
    dollars = _number(amount, "amount", most=1e12)
    body = {"amount": dollars, "period": period, "principal": principal}
    _client(project).call("PUT", "/budgets", json=body)
    whose = principal or "the project"
    per = "" if period == "total" else f" per {period}"
    console().print(plain(f"budget of {whose}: ${amount:g}{per}"))


@budgets_app.command("rm")
def budgets_rm(
    principal: Annotated[str | None, typer.Option("--principal", help="Whose.")] = None,
    project: ProjectOpt = None,
) -> None:
    """Remove your project's budget, or one principal's."""
    _client(project).call(
        "DELETE", "/budgets", params={"principal": principal} if principal else None
    )
    console().print(plain(f"budget of {principal or 'the project'} removed"))


@budgets_app.command("ls")
def budgets_ls(project: ProjectOpt = None, as_json: JsonOpt = False) -> None:
    """Budgets with what is spent this period (live runs at the most they may cost)."""

    def row(b: dict[str, Any]) -> tuple[Any, ...]:
        per = "" if b["period"] == "total" else f"/{b['period']}"
        return (plain(b["principal"] or "(project)"), f"${b['amount']:g}{per}",
                f"${b['spent']:.4g}", f"${b['left']:.4g}")  # fmt: skip

    _listing(_client(project).call("GET", "/budgets")["items"], as_json, "no budgets",
             ("whose", "budget", "spent", "left"), row, right=3)  # fmt: skip


# -- what waits, and why -------------------------------------------------------------


def queue(project: ProjectOpt = None, as_json: JsonOpt = False) -> None:
    """Your project's runs on shared pools: admitted, and pending with why they wait."""
    _listing(_client(project).call("GET", "/workloads")["items"], as_json,
             "nothing admitted or waiting", ("run", "pool", "state", "asks", "since", "why"),
             lambda w: (w["id"][:12], plain(w["pool"]), w["state"], _shown(w["requests"]),
                        fmt_time(w["admitted_at"] or w["submitted_at"]),
                        plain(_reason(w.get("reason"), w.get("cause")))))  # fmt: skip


def _whose(held: dict[str, Any]) -> str:
    """A run as the server shows it: this project's by id, another's by its project."""
    return f"{held['project']}/{held['id'][:8]}" if held.get("id") else (
        f"a run of {held['project']}")  # fmt: skip


def _reason(reason: dict[str, Any] | None, cause: str | None = None) -> str:
    if not reason:
        return cause or ""
    if "resource" in reason:
        holders = ", ".join(f"{_whose(h)} ({h['amount']:g})" for h in reason["held_by"][:3])
        text = (f"needs {reason['missing']:g} more {reason['resource']} in queue "
                f"{reason['project']}")  # fmt: skip
        return text + (f"; held by {holders}" if holders else "")
    if reason.get("behind"):
        return f"behind {len(reason['behind'])} of its queue"
    return cause or ""


def explain(
    run: Annotated[str, typer.Argument(help="A run id, or a unique prefix of one.")],
    as_json: JsonOpt = False,
) -> None:
    """Why a run waits, was preempted or was refused admission."""
    from kiln.app import get_run

    record = get_run(run)
    found = _client().call("GET", f"/workloads/{record.id}")
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    out = console()
    out.print(plain(f"run {record.id} on pool {found['pool']}: {found['state']}"))
    out.print(plain(f"  asks for {_shown(found['requests'])}, priority {found['priority']}"
                    + (" (an agent's)" if found["agent"] else "")))  # fmt: skip
    if found.get("reason"):
        out.print(plain(f"  waits: {_reason(found['reason'])}"))
    if found.get("cause"):
        out.print(plain(f"  {found['cause']}"))
    if found["max_cost"]:
        out.print(plain(f"  may cost up to ${found['max_cost']:.4g}; cost ${found['cost']:.4g}"))


def what_if(
    gpu: Gpu = 0.0,
    cpu: Cpu = 1.0,
    memory: Memory = "0",
    timeout: Annotated[
        str | None, typer.Option("--timeout", help="Its timeout, e.g. 2h (for budgets).")
    ] = None,
    priority: Annotated[int, typer.Option("--priority", help="Higher first.")] = 0,
    pool: Annotated[
        str | None, typer.Option("--pool", help="The pool (default: KILN_POOL).")
    ] = None,
    project: ProjectOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Would a run of this shape be admitted now, and whom would it preempt? Changes nothing."""
    pool = pool or Settings.from_env().pool
    if not pool:
        raise ValidationError("--pool", "which pool? give --pool or set KILN_POOL")
    timeout_s = None if timeout is None else parse_duration(timeout, "--timeout")
    body = {**_amount(cpu, memory, gpu), "pool": pool, "priority": priority,
            "timeout_s": timeout_s}  # fmt: skip
    found = _client(project).call("POST", "/workloads:what-if", json=body)
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    out = console()
    if found.get("refused"):
        out.print(plain(f"refused: {found['refused']}"))
        return
    cost = f"; it may cost up to ${found['max_cost']:.4g}" if found.get("max_cost") else ""
    if found["admitted"]:
        out.print(plain(f"admitted now on {pool}{cost}"))
    else:
        out.print(plain(f"would wait: {_reason(found.get('reason'))}"))
    for v in found["preempted"]:
        out.print(plain(f"  would preempt {_whose(v)} ({_shown(v['requests'])})"))
