"""``kiln runs ls|show|compare``: read the record."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from kiln.app import get_run, runs
from kiln.cli._render import (
    console,
    fmt_duration,
    fmt_time,
    fmt_value,
    metrics_view,
    plain,
    reader,
    runs_table,
    status_text,
)
from kiln.errors import ValidationError
from kiln.observe import rightsizing
from kiln.observe.sysmetrics import SYS_KEYS
from kiln.record.model import CodeSnapshot, MetricPoint, RunRecord, RunStatus, json_number

app = typer.Typer(
    help="List, show and compare recorded runs, and what they used.", no_args_is_help=True
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts and agents.")]
ReproductionsOpt = Annotated[
    bool,
    typer.Option("--reproductions", help="Include reproductions of other runs (`kiln reproduce`)."),
]


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _pairs(items: list[str], option: str) -> dict[str, Any]:
    """``k=v`` options; v is read as JSON when it parses (0.1, true), else as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValidationError(option, f"{item!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


@app.command("ls")
def ls(
    app_name: Annotated[str | None, typer.Option("--app", "-a", help="Only this app.")] = None,
    status: Annotated[
        str | None, typer.Option(help=f"Only runs in this status: {', '.join(RunStatus)}.")
    ] = None,
    param: Annotated[list[str], typer.Option("--param", "-p", help="KEY=VALUE filter.")] = [],  # noqa: B006
    tag: Annotated[list[str], typer.Option("--tag", "-t", help="KEY=VALUE filter.")] = [],  # noqa: B006
    order_by: Annotated[
        str, typer.Option("--order-by", "-o", help="created, ended, or a metric; '-' descends.")
    ] = "-created",
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, max=1_000_000, help="How many runs.")
    ] = 20,
    sweep: Annotated[str | None, typer.Option(help="Only the runs of this sweep.")] = None,
    reproductions: ReproductionsOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """List runs, newest first (or by a metric: -o -accuracy)."""
    records = runs(
        parent=sweep,
        app=app_name,
        status=status,
        params=_pairs(param, "--param"),
        tags=_pairs(tag, "--tag"),
        order_by=order_by,
        limit=limit,
        reproductions=reproductions,
    )
    if as_json:
        _print_json([r.to_dict() for r in records])
        return
    out = console()
    if not records:
        out.print("no runs match")
        return
    key = order_by.lstrip("-+").removeprefix("metrics.")
    metrics = None
    if records and key not in ("created", "started", "ended", "name", "status", "app"):
        others = [m for r in records for m in r.summary if m != key]
        metrics = [key, *dict.fromkeys(others)][:4]
    out.print(runs_table(records, metrics=metrics))


@app.command("show")
def show(
    run_id: Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")],
    metrics: Annotated[
        bool, typer.Option("--metrics", "-m", help="Each metric's values step by step.")
    ] = False,
    packages: Annotated[
        bool, typer.Option("--packages", help="The installed packages, name==version.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Everything recorded about one run."""
    record = get_run(run_id)
    warnings = _warnings(record.id)
    if as_json:
        data = {**record.to_dict(), "warnings": warnings, "fit": rightsizing.fit(record).to_dict()}
        if metrics:
            data["metric_history"] = {
                key: [{"step": p.step, "time": p.time, "value": json_number(p.value)}
                      for p in points]
                for key, points in _histories(record).items()
            }  # fmt: skip
        if packages:
            data["packages"] = _packages(record)
        _print_json(data)
        return
    out = console()
    if metrics or packages:
        if metrics:
            out.print(metrics_view(record.id, _histories(record)))
        if packages:
            out.print(plain("\n".join(_packages(record)) or "no package list was recorded"))
        return
    out.print(_run_panel(record))
    for warning in warnings:
        out.print(Text(f"warning: {warning}", style="yellow"))


def _warnings(run_id: str) -> list[str]:
    """What the store refused of the run's record (dropped rows), oldest first."""
    events = reader().store.audit_events(action="run.warning", target=run_id, limit=None)
    return [json.loads(e["payload"])["message"] for e in reversed(events)]


def _histories(record: RunRecord) -> dict[str, list[MetricPoint]]:
    """Every point of each of the run's metrics that has any, by name."""
    store = reader().store
    keys = sorted(record.summary) + list(SYS_KEYS)
    found = {key: store.metric_history(record.id, key) for key in keys}
    return {key: points for key, points in found.items() if points}


def _packages(record: RunRecord) -> list[str]:
    """The run's interpreter's distributions as ``name==version``, from their blob."""
    sha = record.environment.packages_sha256
    if sha is None:
        return []
    return reader().blobs.read(sha).decode().split()


# Shown by name in `kiln runs show`: the versions a result most often depends on.
NOTABLE_PACKAGES = ("torch", "jax", "tensorflow", "numpy", "scikit-learn", "transformers",
                    "pandas", "xgboost", "lightgbm", "kiln")  # fmt: skip


def _packages_line(r: RunRecord) -> str:
    e = r.environment
    if e.packages_sha256 is None:
        return "not recorded"
    versions = dict(p.partition("==")[::2] for p in _packages(r))
    notable = [f"{n}=={versions[n]}" for n in NOTABLE_PACKAGES if n in versions]
    return (", ".join(notable) + "; " if notable else "") + (
        f"{e.package_count} in all: kiln runs show {r.id[:8]} --packages"
    )


def _code_panel(c: CodeSnapshot) -> Panel:
    code_rows: list[tuple[str, str | Text]] = [
        ("commit", f"{c.commit or '-'} ({c.branch or 'detached'})" if c.repo_root else "no git"),
        ("changes", f"patch {c.patch_sha256[:16]}" if c.patch_sha256 else "none"),
        ("module", f"{c.module_path or '-'}"),
        ("source sha256", c.source_sha256 or "-"),
    ]
    if c.left_out:  # what the run saw but the patch does not hold: named, sized, hashed
        code_rows.append(("left out of patch", "\n".join(c.left_out)))
    elif c.untracked_skipped:  # recorded before notes were kept
        code_rows.append(("left out of patch", ", ".join(c.untracked_skipped)))
    return Panel(_kv_table(code_rows), title="code", title_align="left")


def _kv_table(rows: list[tuple[str, str | Text]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for k, v in rows:  # names and values are the user's: shown as they are, never markup
        table.add_row(plain(k), v if isinstance(v, Text) else plain(v))
    return table


def _fit_rows(r: RunRecord) -> list[tuple[str, str | Text]]:
    """What the run used against what it asked (see kiln.observe.rightsizing)."""
    fit, u = rightsizing.fit(r), r.usage
    rows: list[tuple[str, str | Text]] = []
    if fit.cpu_used is not None and r.duration_s and r.duration_s >= rightsizing.TOO_SHORT_S:
        asked = f" of {fit.cpu_requested:g} asked" if fit.cpu_requested else ""
        rows.append(("cpus used", f"{fit.cpu_used:.2f} on average{asked}"))
    if u.gpu_utilization_mean is not None:
        rows.append(("gpu busy", f"{u.gpu_utilization_mean:.0f}%, memory peak "
                     f"{(u.gpu_memory_peak_bytes or 0) / 2**20:.0f} MiB"))  # fmt: skip
    rows += [("right-size", Text(advice, style="yellow")) for advice in fit.advice]
    return rows


def _run_panel(r: RunRecord) -> Group:
    u, c, e = r.usage, r.code, r.environment
    overview: list[tuple[str, str | Text]] = [
        ("id", r.id),
        ("app", r.app + (f"  name: {r.name}" if r.name else "")),
        ("status", Text.from_markup(status_text(r.status))),
        ("who", f"{r.actor} on {r.host} (pid {r.pid}, {r.engine})"),
        ("created", fmt_time(r.created_at)),
        ("ended", fmt_time(r.ended_at) if r.ended_at else "-"),
        ("duration", fmt_duration(r.duration_s)),
        ("cpu", fmt_duration(u.cpu_s)),
        ("peak memory", f"{u.peak_rss_bytes / 2**20:.1f} MiB" if u.peak_rss_bytes else "-"),
    ]
    overview += _fit_rows(r)
    if r.parent_id:
        overview.append(("parent", r.parent_id))
    parts: list[Any] = [Panel(_kv_table(overview), title="run", title_align="left")]
    if r.params or r.tags:
        rows: list[tuple[str, str | Text]] = [(k, fmt_value(v)) for k, v in r.params.items()]
        rows += [(f"tag {k}", v) for k, v in r.tags.items()]
        parts.append(Panel(_kv_table(rows), title="params", title_align="left"))
    if r.summary or r.result is not None:
        rows = [(k, fmt_value(v)) for k, v in sorted(r.summary.items())]
        if r.result is not None:
            rows.append(("result", fmt_value(r.result)))
        parts.append(Panel(_kv_table(rows), title="summary", title_align="left"))
    if r.artifacts:
        t = Table(show_edge=False, header_style="bold")
        for col in ("name", "dir", "kind", "size", "sha256"):
            t.add_column(col)
        for a in r.artifacts:
            t.add_row(plain(a.name), a.direction, a.kind, f"{a.size:,}", a.sha256[:16])
        parts.append(Panel(t, title="artifacts and datasets", title_align="left"))
    parts.append(_code_panel(c))
    env_rows: list[tuple[str, str | Text]] = [
        ("python", f"{e.implementation} {e.python} ({e.executable})"),
        ("platform", e.platform),
        ("packages", _packages_line(r)),
    ]
    if e.threads:
        env_rows.append(("threads", ", ".join(f"{k}={v}" for k, v in e.threads.items())))
    if e.sandbox:
        env_rows.append(("sandbox", plain(", ".join(e.sandbox.get("layers") or []))))
    parts.append(Panel(_kv_table(env_rows), title="environment", title_align="left"))
    parts.append(Text(f"step by step: kiln runs show {r.id[:8]} --metrics; what it printed: "
                      f"kiln logs {r.id[:8]}", style="dim"))  # fmt: skip
    if r.error:
        parts.append(Panel(Text(r.error), title="error", title_align="left", border_style="red"))
    return Group(*parts)


@app.command("usage")
def usage(
    app_name: Annotated[
        str | None, typer.Option("--app", "-a", help="The runs of this app.")
    ] = None,
    sweep: Annotated[str | None, typer.Option(help="The runs of this sweep.")] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, max=1_000_000, help="How many runs, newest.")
    ] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """What runs asked for against what they used: CPUs, memory, GPU; where to shrink."""
    if app_name is None and sweep is None:
        raise ValidationError("--app", "name an app (--app) or a sweep (--sweep)")
    records = [r for r in runs(parent=sweep, app=app_name, limit=limit) if r.status.terminal]
    fits = [rightsizing.fit(r) for r in records]
    total = rightsizing.summarize(fits)
    if as_json:
        _print_json({"summary": total, "runs": [f.to_dict() for f in fits]})
        return
    out = console()
    if not fits:
        out.print("no ended runs match")
        return
    t = Table(show_edge=False, header_style="bold")
    for col in ("run", "wall", "cpu asked", "cpu used", "mem peak", "mem asked", "gpu busy"):
        t.add_column(col)
    for f in fits:
        t.add_row(f.run_id[:8], fmt_duration(f.wall_s), _num(f.cpu_requested), _num(f.cpu_used),
                  _mib(f.memory_peak_bytes), _mib(f.memory_requested_bytes),
                  "-" if f.gpu_utilization is None else f"{f.gpu_utilization:.0f}%")  # fmt: skip
    out.print(t)
    eff = total["cpu_efficiency"]
    if eff is None:  # runs recorded by hand (app.run) ask for no CPUs
        out.print(plain(f"{total['runs']} runs used {total['cpu_seconds_used']:.1f} "
                        "CPU-seconds; none asked for CPUs"))  # fmt: skip
    else:
        out.print(plain(f"{total['runs']} runs: {total['cpu_seconds_used']:.1f} of "
                        f"{total['cpu_seconds_asked']:.1f} CPU-seconds asked were used "
                        f"({eff:.0%})"))  # fmt: skip
    said = {a.split(":")[0].split(", used")[0]: a for f in fits for a in f.advice}
    for advice in list(said.values())[:10]:
        out.print(Text(f"right-size: {advice}", style="yellow"))


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}".rstrip("0").rstrip(".")


def _mib(value: int | None) -> str:
    return "-" if not value else f"{value / 2**20:,.0f} MiB"


@app.command("compare")
def compare(
    run_ids: Annotated[list[str], typer.Argument(help="Two or more run ids or prefixes.")],
    as_json: JsonOpt = False,
) -> None:
    """Params and summary metrics side by side; rows that differ are highlighted."""
    if len(run_ids) < 2:
        raise ValidationError("RUN_IDS", "compare needs at least two runs")
    records = [get_run(i) for i in run_ids]
    sections: dict[str, dict[str, list[Any]]] = {"params": {}, "metrics": {}}
    for name in dict.fromkeys(k for r in records for k in r.params):
        sections["params"][name] = [r.params.get(name) for r in records]
    for name in sorted({k for r in records for k in r.summary}):
        sections["metrics"][name] = [r.summary.get(name) for r in records]

    def differs(values: list[Any]) -> bool:
        return len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1

    if as_json:
        _print_json(
            {
                "runs": [r.id for r in records],
                **{
                    section: {
                        k: {
                            "values": [json_number(v) if isinstance(v, float) else v for v in vals],
                            "differs": differs(vals),
                        }
                        for k, vals in rows.items()
                    }
                    for section, rows in sections.items()
                },
            }
        )
        return
    table = Table(header_style="bold", show_edge=False)
    table.add_column("")
    for r in records:
        table.add_column(f"{r.id[:8]}\n{status_text(r.status)}", justify="right")
    for section, rows in sections.items():
        if not rows:
            continue
        table.add_row(f"[dim]{section}[/]", *[""] * len(records))
        for name, values in rows.items():
            style = "bold yellow" if differs(values) else ""
            cells = [plain("-" if v is None else fmt_value(v)) for v in values]
            table.add_row(plain(f"  {name}"), *cells, style=style)
    console().print(table)


@app.command("rm")
def rm(
    run_id: Annotated[str, typer.Argument(help="Run or sweep id, or a unique prefix of it.")],
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask (needed when not on a terminal).")
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Remove a run still recording: end it as cancelled first."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove a run's record (a sweep with its runs). Refused, naming them, while other
    runs or models depend on it, or while it is still recording (unless --force).
    Asks first on a terminal."""
    store = reader().store
    record = store.get_run(run_id)
    sweep = record.tags.get("kind") == "sweep"
    what = f"run {record.id}"
    if sweep:
        count = len(runs(parent=record.id, limit=None, reproductions=True))
        what = f"sweep {record.id} with its {count} runs"
    _confirm(f"Remove {what}?", yes)
    removed = store.delete_run(record.id, with_runs=sweep, force=force)
    if as_json:
        _print_json({"removed": removed})
    else:
        console().print(f"removed {what} (their blobs stay until `kiln gc`)")


def _confirm(question: str, yes: bool) -> None:
    """Ask on a terminal; elsewhere only ``--yes`` goes ahead (nothing is removed unasked)."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise ValidationError("--yes", "not on a terminal, so nothing was asked: pass --yes")
    if not typer.confirm(question, default=False):
        raise typer.Exit(1)


@app.command("resume")
def resume(
    sweep_id: Annotated[str, typer.Argument(help="Sweep id, or a unique prefix of it.")],
    as_json: JsonOpt = False,
) -> None:
    """Re-run the runs of a sweep that did not succeed, with the same arguments, and wait.

    The function is imported from its recorded module (as its code is now) from the
    folder it was recorded in; a function defined in a script is loaded from that file.
    """
    from kiln._sweep import resume_sweep
    from kiln.config import Settings

    sweep, total = resume_sweep(sweep_id, Settings.from_env())
    if sweep is None:
        _report_resume(get_run(sweep_id), [], total, as_json)
        return
    try:
        sweep.wait()
    except KeyboardInterrupt:  # the sweep has said what was cancelled and how to resume
        raise typer.Exit(130) from None
    _report_resume(sweep.record(), sweep.records(), total, as_json)


def _report_resume(sweep: RunRecord, rerun: list[RunRecord], total: int, as_json: bool) -> None:
    if as_json:
        _print_json({"sweep": sweep.id, "status": str(sweep.status), "runs": total,
                     "resumed": [r.id for r in rerun], "result": sweep.result})  # fmt: skip
        return
    out = console()
    if not rerun:
        out.print(f"every one of the {total} runs of sweep {sweep.id[:8]} succeeded: nothing to do")
        return
    out.print(runs_table(rerun))
    failed = sum(r.status is not RunStatus.SUCCEEDED for r in rerun)
    out.print(
        f"sweep {sweep.id[:8]}: re-ran {len(rerun)} of {total} runs "
        f"({failed} did not succeed); the sweep {status_text(sweep.status)}"
    )


@app.command("best")
def best(
    metric: Annotated[str, typer.Option("--metric", "-m", help="The summary metric to rank by.")],
    mode: Annotated[str, typer.Option(help="max or min.")] = "max",
    app_name: Annotated[str | None, typer.Option("--app", "-a", help="Only this app.")] = None,
    sweep: Annotated[str | None, typer.Option(help="Only the runs of this sweep.")] = None,
    reproductions: ReproductionsOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """The succeeded run with the best value of a metric, across apps unless one is named.
    Ties go to the run created first."""
    if mode not in ("max", "min"):
        raise ValidationError("--mode", f"{mode!r} is not a mode", allowed=["max", "min"])
    found = runs(
        app=app_name, status="succeeded", parent=sweep,
        order_by=("-" if mode == "max" else "") + metric, limit=1, reproductions=reproductions,
    )  # fmt: skip
    if not found or metric not in found[0].summary:
        raise ValidationError("--metric", f"no succeeded run has the metric {metric!r}")
    if as_json:
        _print_json(found[0].to_dict())
        return
    console().print(_run_panel(found[0]))
