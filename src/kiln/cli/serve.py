"""``kiln serve``, ``kiln batch``, ``kiln endpoints``, ``kiln traces`` and ``kiln why``."""

from __future__ import annotations

import importlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kiln.cli._render import console, fmt_time, fmt_value, reader
from kiln.cli.run import import_file
from kiln.errors import ValidationError

if TYPE_CHECKING:
    from kiln.serve.endpoint import Endpoint

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts and agents.")]
endpoints_app = typer.Typer(help="Endpoints served from this store.", no_args_is_help=True)
traces_app = typer.Typer(help="Traces of inferences.", no_args_is_help=True)


def _esc(value: object) -> str:
    """``value`` as literal text inside markup: names, inputs and reasons may hold brackets."""
    return escape(str(value))


def load_endpoint(target: str) -> Endpoint[Any]:
    """``FILE.py:CLASS`` (or ``FILE.py::CLASS``, or ``module:CLASS``) to its endpoint."""
    from kiln.serve.endpoint import Endpoint

    where, _, name = target.replace("::", ":").rpartition(":")
    if not where or not name:
        raise ValidationError("TARGET", f"{target!r} is not FILE.py:CLASS")
    module = import_file(Path(where)) if where.endswith(".py") else _import(where, target)
    obj = getattr(module, name, None)
    if not isinstance(obj, Endpoint):
        found = [n for n, v in vars(module).items() if isinstance(v, Endpoint)]
        raise ValidationError(
            "TARGET",
            f"{where} has no endpoint {name!r} (declare it with @app.endpoint)",
            allowed=found or None,
        )
    return obj


def _import(module: str, target: str) -> Any:
    try:
        return importlib.import_module(module)
    except (ImportError, ValueError, TypeError) as exc:  # a folder, a path, no such module
        raise ValidationError(
            "TARGET", f"{target!r}: cannot import {module!r} ({exc})",
            allowed="FILE.py:CLASS or module:CLASS",
        ) from None  # fmt: skip


def serve(
    target: Annotated[str, typer.Argument(help="FILE.py:CLASS, a class declared @app.endpoint")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8000,
    backend: Annotated[
        str | None,
        typer.Option(
            help="local (replica processes), ray (Ray Serve) or kubernetes "
            "(Deployments); default: KILN_BACKEND."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Serve this version (NAME:N) or alias instead of the declared one."),
    ] = None,
    replicas: Annotated[
        int | None, typer.Option(min=1, help="Exactly this many replicas (no autoscaling).")
    ] = None,
) -> None:
    """Serve an endpoint over HTTP: POST /predict, GET /healthz /readyz /metrics.

    With ``--backend ray`` it is deployed on Ray Serve (KILN_RAY_ADDRESS), served
    at http://HOST:PORT/ENDPOINT (POST .../predict) by Ray Serve's proxy. With
    ``--backend kubernetes`` each version is a Deployment behind a router Service
    (see ``kiln k8s render``); this process applies them and follows the alias.
    """
    endpoint = load_endpoint(target).pinned(model, replicas)
    endpoint.serve(host=host, port=port, block=True, backend=backend)


def batch(
    target: Annotated[str, typer.Argument(help="FILE.py:CLASS, a class declared @app.endpoint")],
    input_path: Annotated[Path, typer.Option("--input", help=".jsonl, .csv or .parquet")],
    output: Annotated[Path, typer.Option("--output", help="Where to write answers (.jsonl)")],
    shard_size: Annotated[int, typer.Option(min=1, help="Rows per shard (checkpoint).")] = 1000,
    replicas: Annotated[
        int | None, typer.Option(min=1, help="Replicas (default: max_replicas).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run predict over a file on replicas; a killed job resumes where it stopped."""
    endpoint = load_endpoint(target)
    result = endpoint.batch(
        input_path,
        output=output,
        shard_size=shard_size,
        replicas=replicas,
        progress=sys.stderr.isatty() and not as_json,
    )
    summary = {
        "run_id": result.run_id,
        "model": result.model,
        "rows": result.rows,
        "rows_failed": result.rows_failed,
        "shards": result.shards,
        "shards_resumed": result.shards_resumed,
        "output": result.output,
        "seconds": result.seconds,
        "rows_per_s": result.rows_per_s,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    resumed = f", {result.shards_resumed} shards resumed" if result.shards_resumed else ""
    failed = f", [red]{result.rows_failed} rows failed[/]" if result.rows_failed else ""
    console().print(
        f"run {result.run_id[:8]}: {result.rows} rows through {_esc(result.model)} in "
        f"{result.seconds:.2f}s ({result.rows_per_s:,.0f} rows/s){_esc(resumed)}{_esc(failed)}"
        f" -> {_esc(output)}"
    )


# -- endpoints ------------------------------------------------------------------------


@endpoints_app.command("ls")
def endpoints_ls(as_json: JsonOpt = False) -> None:
    """Endpoints, where they are served and their figures."""
    from kiln.serve import state

    infos = state.all_endpoints(reader().store)
    if as_json:
        typer.echo(json.dumps([i.to_dict() for i in infos], indent=2, default=str))
        return
    table = Table(header_style="bold", show_edge=False)
    for col in ("endpoint", "model", "status", "url", "replicas", "requests", "p99 ms", "updated"):
        table.add_column(col)
    for info in infos:
        stats = info.stats
        live = sum(1 for s in info.servers if s.status == "serving")
        table.add_row(
            info.name,
            info.model + (" (split)" if info.traffic else ""),
            info.status + (f" ({live} servers)" if live > 1 else ""),
            info.url or "",
            str(stats.get("replicas", "")),
            str(stats.get("requests", "")),
            fmt_value(stats.get("latency_ms", {}).get("p99", "")),
            fmt_time(info.updated_at),
        )
    console().print(table)


@endpoints_app.command("show")
def endpoints_show(
    name: Annotated[str, typer.Argument(help="Endpoint name.")], as_json: JsonOpt = False
) -> None:
    """One endpoint: its spec, versions served, latency, and cost per request."""
    from kiln.observe.cost import Prices, Usage
    from kiln.serve import state

    info = state.get(reader().store, name)
    if as_json:
        typer.echo(json.dumps(info.to_dict(), indent=2, default=str))
        return
    out = console()
    stats = info.stats
    spec = info.spec
    res = spec.get("resources", {})
    where = " on Ray Serve" if stats.get("engine") == "ray" else ""
    out.print(
        f"[bold]{_esc(info.name)}[/]  app {_esc(info.app)}  model {_esc(info.model)}  "
        f"\\[{_esc(info.status)}]{where}  "
        f"{_esc(info.url or '')}"
    )
    out.print(
        f"replicas {spec.get('min_replicas')}..{spec.get('max_replicas')}, target "
        f"{spec.get('target_concurrency')} in flight each, idle {spec.get('idle_timeout')}s;"
        f" each cpu {res.get('cpu')} gpu {res.get('gpu')} memory "
        f"{res.get('memory_bytes', 0) / 2**20:.0f} MiB"
    )
    if info.traffic:
        out.print("live split: " + ", ".join(f"{_esc(k)} {v:g}" for k, v in info.traffic.items()))
    for server in info.servers:
        out.print(
            f"server {server.id[:8]}  {_esc(server.status)}  {_esc(server.url or '')}  pid "
            f"{server.pid} on {_esc(server.host)}  since {fmt_time(server.started_at)}  "
            f"requests {server.stats.get('requests', 0)}",
            highlight=False,
        )
    lat = stats.get("latency_ms", {})
    out.print(
        f"requests {stats.get('requests', 0)}  errors {stats.get('errors', 0)}  "
        f"in flight {stats.get('inflight', 0)}  p50 {lat.get('p50', 0):.2f} ms  "
        f"p99 {lat.get('p99', 0):.2f} ms"
    )
    table = Table(header_style="bold", show_edge=False)
    for col in (
        "version",
        "weight",
        "replicas",
        "requests",
        "errors",
        "cpu s/req",
        "gpu s/req",
        "cold starts",
        "run",
    ):
        table.add_column(col)
    for version, v in stats.get("versions", {}).items():
        usage = v.get("usage", {})
        colds = ", ".join(f"{c:.2f}s" for c in v.get("cold_starts_s", []))
        table.add_row(
            version,
            fmt_value(v.get("weight")),
            str(v.get("replicas")),
            str(v.get("requests")),
            str(v.get("errors")),
            f"{usage.get('cpu_seconds', 0):.6f}",
            f"{usage.get('gpu_seconds', 0):.6f}",
            colds,
            str(v.get("run_id", ""))[:8],
        )
    out.print(table)
    per = stats.get("per_request", {})
    prices = Prices.from_env()
    if prices is not None and stats.get("requests"):
        n = int(stats["requests"])
        usage = Usage(
            n,
            per.get("cpu_seconds", 0) * n,
            per.get("gpu_seconds", 0) * n,
            per.get("memory_gb_seconds", 0) * n,
        )
        cost = prices.per_1k_requests(usage, stats.get("gpu_type"))
        out.print(f"cost per 1,000 requests: ${cost:.6f} (KILN_PRICES)")
    elif "cost_per_1k_requests" in stats:
        out.print(f"cost per 1,000 requests: ${stats['cost_per_1k_requests']:.6f}")
    else:
        out.print("cost: set KILN_PRICES (e.g. '{\"cpu_hour\": 0.04}') to price requests")


@endpoints_app.command("set-traffic")
def set_traffic(
    name: Annotated[str, typer.Argument(help="Endpoint name.")],
    split: Annotated[list[str] | None, typer.Argument(help="NAME:VERSION=WEIGHT ...")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", help="Drop the live split: follow the declared model.")
    ] = False,
    override_policy: Annotated[
        bool,
        typer.Option(
            "--override-policy",
            help="Send traffic to versions that fail the followed alias's promotion gates "
            "(needs --reason; audited).",
        ),
    ] = False,
    reason: Annotated[str | None, typer.Option(help="Why the policy is overridden.")] = None,
) -> None:
    """Change a served endpoint's traffic split live, e.g. digits:3=90 digits:4=10.

    For an endpoint that follows an alias (``digits@production``), every version given
    traffic must pass the gates a promotion to that alias would pass; the refusal
    names each failing gate.
    """
    from kiln.config import Settings
    from kiln.registry.traffic import set_traffic as set_split

    if follow == bool(split):
        raise ValidationError("split", "give NAME:VERSION=WEIGHT pairs, or --follow")
    if override_policy and not (reason and reason.strip()):
        raise ValidationError("reason", "--override-policy needs --reason saying why")
    if reason is not None and not override_policy:
        raise ValidationError("reason", "only an --override-policy takes a reason")
    traffic: dict[str, Any] | None = None
    if split:
        traffic = {}
        for item in split:
            ref, sep, weight = item.partition("=")
            try:
                traffic[ref] = float(weight)
            except ValueError:
                raise ValidationError("split", f"{item!r} is not NAME:VERSION=WEIGHT") from None
            if not sep:
                raise ValidationError("split", f"{item!r} is not NAME:VERSION=WEIGHT")
    done = set_split(
        reader().store,
        name,
        traffic,
        actor=Settings.from_env().actor,
        override_reason=reason.strip() if override_policy and reason else None,
    )
    if done is None:
        console().print(f"{_esc(name)} follows its declared model again")
    else:
        shares = ", ".join(f"{k} {100 * v / sum(done.values()):.0f}%" for k, v in done.items())
        overridden = " (policy override recorded in the audit log)" if override_policy else ""
        console().print(
            f"{_esc(name)}: {_esc(shares)}{_esc(overridden)} (a serving process follows within a "
            "second)"
        )


# -- traces ---------------------------------------------------------------------------


@traces_app.command("ls")
def traces_ls(
    endpoint: Annotated[str | None, typer.Option(help="Only this endpoint's.")] = None,
    run: Annotated[str | None, typer.Option(help="Only answers of this model run.")] = None,
    errors: Annotated[bool, typer.Option("--errors", help="Only failed ones.")] = False,
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Recent inferences: trace id, endpoint, model version, latency, status."""
    from kiln.observe.why import list_spans

    rows = list_spans(
        reader().store, endpoint=endpoint, run_id=run, errors_only=errors, limit=limit
    )
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table(header_style="bold", show_edge=False)
    for col in ("trace", "when", "endpoint", "span", "model", "ms", "status", "input"):
        table.add_column(col)
    for r in rows:
        model = f"{r['model_name']}:{r['model_version']}" if r["model_name"] else ""
        text = str(r["attributes"].get("input.value", "")).partition("\n")[0]
        table.add_row(
            r["trace_id"],
            fmt_time(r["start_ns"] / 1e9),
            r["endpoint"] or "",
            r["name"],
            model,
            f"{r['duration_ns'] / 1e6:.2f}",
            r["status"],
            text[:40] + ("..." if len(text) > 40 else ""),
        )
    console().print(table)


def why(
    trace_id: Annotated[
        str,
        typer.Argument(
            help="A trace id (or a unique prefix), or the traceparent an answer carried "
            "(names its span: needed when a caller's trace holds several answers)."
        ),
    ],
    as_json: JsonOpt = False,
) -> None:
    """Everything behind one inference: model version, promotion, run, code, data, env."""
    from kiln.observe.why import explain

    info = explain(reader().store, trace_id)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    print_why(info)


def print_why(info: dict[str, Any]) -> None:
    out = console()
    when = datetime.fromtimestamp(info["at_ns"] / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    out.print(
        f"[bold]trace {_esc(info['trace_id'])}[/]  {_esc(info['endpoint'])}  {_esc(when)}  "
        f"{info['latency_ms']:.2f} ms  {_esc(info['status'])}"
    )
    if info.get("error"):
        out.print(f"  [red]{_esc(str(info.get('http_status') or ''))} {_esc(info['error'])}[/]")
    out.print(f"  input   {_esc(_short(info['input']))}")
    out.print(f"  output  {_esc(_short(info['output']))}")
    for key, value in info.get("llm", {}).items():
        out.print(f"  {_esc(key)} {_esc(_short(value))}")
    model = info.get("model")
    if model is None:
        return
    via = f"  via {info['routed_by']}" if info.get("routed_by") else ""
    out.print(
        f"[bold]model[/] {_esc(model['ref'])}{_esc(via)}  artifact {_esc(model['artifact'])} "
        f"sha256:{model['artifact_sha256'][:12]}  registered by "
        f"{_esc(model['registered_by'])} {fmt_time(model['registered_at'])}"
    )
    routed_by = info.get("routed_by")
    if routed_by and "@" in routed_by and not info["promotions"]:
        out.print(f"  served through {_esc(routed_by)} by a traffic split; never promoted to it")
    for p in info["promotions"]:
        moved = f"from {p['from_version']}" if p["from_version"] else "(new alias)"
        policy = json.dumps(p["policy"]) if p["policy"] else "no policy"
        out.print(
            f"  promoted to @{_esc(p['alias'])} {_esc(moved)} by [bold]{_esc(p['by'])}[/] "
            f"{fmt_time(p['at'])} ({_esc(p['action'])}): {_esc(p['reason'] or '')}"
        )
        out.print(f"    under {_esc(policy)}")
    run = info["run"]
    out.print(
        f"[bold]run[/] {_esc(run['id'])}  {_esc(run['app'])} {_esc(run['function'] or '')}  "
        f"{_esc(run['status'])}  by {_esc(run['actor'])}  {fmt_time(run['created'])}"
    )
    params = {k: v for k, v in run["params"].items() if not isinstance(v, dict)}
    out.print(
        "  params  " + ", ".join(f"{_esc(k)}={_esc(fmt_value(v))}" for k, v in params.items())
    )
    out.print(
        "  metrics "
        + ", ".join(f"{_esc(k)}={_esc(fmt_value(v))}" for k, v in run["metrics"].items())
    )
    code = run["code"]
    if code.get("commit"):
        patch = f" + patch sha256:{code['patch_sha256'][:12]}" if code.get("patch_sha256") else ""
        out.print(
            f"  code    {_esc(code.get('branch'))}@{code['commit'][:12]}{_esc(patch)}  "
            f"{_esc(code.get('module_path') or '')}"
        )
    else:
        out.print(
            f"  code    {_esc(code.get('module_path'))} (not in git) source sha256:"
            f"{_esc((code.get('source_sha256') or '')[:12])}"
        )
    for item in run["inputs"]:
        out.print(
            f"  data    {_esc(item['name'])}  sha256:{item['sha256'][:12]}  {item['size']} bytes"
        )
    env = run["environment"]
    lock = f"  lock sha256:{env['lock_sha256'][:12]}" if env.get("lock_sha256") else ""
    env_id = f"  env {env['env_id'][:12]}" if env.get("env_id") else ""
    out.print(f"  env     python {_esc(env['python'])}{_esc(env_id)}{_esc(lock)}")


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"
