"""Run every benchmark and write bench/RESULTS.md.

.venv/bin/python bench/run_all.py
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

from _common import machine

HERE = Path(__file__).parent
BENCHES = [
    "bench_import.py",
    "bench_cli.py",
    "bench_runs.py",
    "bench_query.py",
    "bench_ingest.py",
    "bench_scheduler.py",
    "bench_admission.py",
    "bench_engine.py",
    "bench_sandbox.py",
    "bench_mcp.py",
    "bench_kubernetes.py",
    "bench_torch_sweep.py",
    "bench_envs.py",
    "bench_audit.py",
    "bench_bundle.py",
    "bench_serve.py",
    "bench_server.py",
    "bench_observe.py",
    "bench_ui.py",
    "bench_ray.py",
]


def fmt(value: float, unit: str) -> str:
    return f"{value:,.0f}" if unit.endswith("/s") else f"{value:.3g}"


def main() -> None:
    rows = []
    for bench in BENCHES:
        print(f"running {bench} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, str(HERE / bench)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{bench} failed:\n{done.stderr[-4000:]}")
        out = done.stdout
        rows += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmark results",
        "",
        f"Taken {when} on {machine()}.",
        "Each figure is set against a baseline measured in the same script run;",
        "`ratio` is kiln / baseline. Regenerate with `.venv/bin/python bench/run_all.py`.",
        "",
        "| bench | metric | kiln | baseline | ratio | baseline is | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bench']} | {r['metric']} | {fmt(r['kiln'], r['unit'])} | "
            f"{fmt(r['baseline'], r['unit'])} | {r['ratio']:.2f} | {r['baseline_name']} | "
            f"{r['goal']} | {'yes' if r['met'] else '**no**'} |"
        )
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n" + NOTES)
    print("\n".join(lines))


NOTES = """
## Notes

- **cli**: a fresh `python -m kiln` process per sample, against `python -c "import
  typer, rich.console"` in turn with it (medians of 15). `kiln --help` imports no command
  module: it lists them from a table and draws its page without `rich.markdown`;
  each command's module loads when it runs, and the process ends without tearing
  the interpreter down (about 0.3 s with SQLAlchemy and pydantic loaded). Before,
  both commands took 1.2 to 1.6 s. `kiln runs ls` misses 0.5 s: what is left is
  SQLAlchemy's import (0.27 to 0.43 s here, every store opens it) and pydantic,
  which typer 0.29 imports to convert any command's options (0.10 to 0.17 s); the
  query and the table take about 0.05 s.
- **machine speed**: the absolute goals (ms, decisions/s, runs/s) depend on how
  fast this shared 2-core machine is during the run; the baselines show it. On
  2026-11-23 02:50 UTC the naive scheduler loop made 1.83M decisions/s and the raw
  sqlite3 top-10 took 0.030 ms; on a run about 3x slower (0.55M, 0.089 ms) the
  ratios stayed where they were while import, scheduler, `f.remote()`, `f.map`
  and audit verify missed their absolute goals with the same code.
- **serve**: `kiln serve` of a one-replica endpoint (tracing on, every request a
  span exported to the store) against the bare FastAPI app a user would write for
  the same answer, both on uvicorn with uvloop and httptools, loaded by wrk (1
  thread, 32 connections), alternating, 3 rounds of 5 s. Kiln's front door is a
  plain ASGI app that forwards request bodies to the replica process over a pipe;
  validation (pydantic), `predict`, JSON and the span happen in the replica, on the
  other core. Each ended span becomes a compact tuple there, pickled 256 at a time,
  and a writer process beside the replica stores them: when the replica itself
  stored them (a batch processor's thread turning thousands of spans into rows
  every 0.5 s), the GIL it held put p99 at 50 ms against FastAPI's 7 ms on this
  machine, and cut throughput to 0.87x. The cold start is the demo's scikit-learn model served with
  `min_replicas=0`, timed from a request that finds no replica to its answer, once
  the endpoint scaled to zero; it starts from a standby process that has imported
  what the last `load` imported, against a fresh interpreter that imports, loads
  and predicts. Batch: 100,000 JSONL rows through `Endpoint.batch` on 2 replicas
  (validated, checkpointed per 5,000-row shard, recorded as a run) against a plain
  loop that reads the same file, calls `predict` and writes the answers; with a
  model this cheap the JSON work is all there is, so the loop is the ceiling.
- **ray**: a local Ray instance of 2 CPUs in the bench process; no-op functions
  on `KILN_BACKEND=ray`, each call a recorded run (its row, its start, its end and
  their audit events), against raw Ray tasks of the same no-op, interleaved call
  by call. Where a warm `f.remote()` spends its time (medians of 200, measured by
  timestamps in the engine): about 0.3 ms building the run (arguments, row), 0.6
  ms submitting the Ray task (0.2 ms alone; the rest is contention with the
  recorder's thread), then Ray's own scheduling and execution, about 0.5 ms
  from the task's end to Ray's result callback, and 1.4 ms for the one SQLite
  transaction that records the run's row and its end (0.5 ms when nothing else
  runs; here Ray's raylet and worker hold the other core). Raw Ray's round trip
  is 2.6 to 3.5 ms on this machine, so recording every run synchronously costs
  about as much again; `f.map` group-commits many runs per transaction and beats
  raw Ray tasks.

- **ingest**: 1,000,000 points through `kiln.log` in a tight loop, timed until the
  run's end has flushed them all to SQLite (WAL, synchronous=NORMAL), against one
  raw `sqlite3.executemany` of the same rows into the same table and index. The
  loop does nothing else, so the background writer competes with it for the GIL;
  in a real training loop the GIL is free during the model's compute and the
  writer runs beside it. For scale, MLflow 3 on SQLite manages about 5,500
  points/s with `log_batch` and 190 points/s with `log_metric`
  (`../shared/peer-bench/`).
- **runs**: open + close of a run with no metrics, 500 in a row. Each writes its
  row, its end and their audit events. In a git work tree the code snapshot adds
  git's own `status` (a process start, about 4 ms here); it runs on a helper thread
  beside the run's body, and runs started within 2 s of each other share one
  snapshot, so a loop of runs pays for git once every two seconds.
- **scheduler**: the pure admission core, no processes. The naive baseline is a
  FIFO first-fit loop with none of the policy (priorities, GPU best fit, the
  starvation guard), so the ratio is the price of the policy, not a goal.
- **engine**: no-op functions, so the figures are Kiln's own overhead per run:
  creating the run's record, scheduling, a warm worker's round trip over its pipe,
  and recording the end (group-committed, one transaction for many runs under
  load). `ProcessPoolExecutor` records nothing. The cold call is a new process's
  first `f.remote()` against an existing store: engine start, worker interpreter
  start and imports (kiln, cloudpickle), then the call.
- **torch sweep**: a real PyTorch workload, an MLP (64-h-h-10, Adam, minibatches
  of 32) on scikit-learn's digits, a 12-run grid of learning rate and width with
  `cpu=1` on the local engine (two at a time on two cores; the bench pins itself to
  two cores on bigger machines), each run recorded with its per-epoch loss, timed
  from `train.sweep(...)` to the last result: worker start, `import torch`, loading
  the data and torch's first-step warm-up (its optimizer imports `torch._dynamo`,
  about 3 s here) are paid once per worker. The baseline trains the same 12 models
  one after the other in the bench process with `torch.set_num_threads(1)` (torch
  already imported); the bench checks both give the same accuracies. Before `cpu=`
  bounded threads, each run used every core and the sweep took 11x longer.
- **envs**: warm reuse is a no-op `f.remote()` whose env is built and whose worker
  is warm, against the same call without env. The cold build is a declaration
  Kiln has not seen, in an existing `KILN_HOME`: uv resolves it to a hashed lock
  while, beside it, the venv is made and filled from uv's cache alone (no
  network); then the venv is synced to the lock, which makes it exact. uv's own
  baseline resolves and installs in one step. A brand-new `KILN_HOME` also pays,
  once, for linking Kiln into its envs. With an empty uv cache both sides are
  bound by the same downloads.
- **audit**: `SqlStore.verify()` (what `kiln audit verify` runs) over 1,000,000
  chained events on SQLite: every event's payload hash and chain hash recomputed
  in order. The baseline reads the same rows with sqlite3 and hashes one line per
  event, the least any check of the chain can do.
- **bundle**: `kiln export` of one run with 100,000 metric points and ten 10 MB
  artifacts: the manifest, the points as JSON, every blob, and the whole-file seal
  (a second sha256 pass over the finished file). `tar` only copies the blobs.
- **query**: 100,000 runs with two summary metrics each; ordering reads the
  `(key, value)` / `(app, key, value)` index of the summary table. The raw baseline
  returns bare rows; `kiln.runs` also fetches each run's summary and artifacts and
  builds typed records.
- **server**: `kiln server` (SQLite behind it, uvicorn with uvloop and httptools) in
  its own process. Ingest is `kiln.log` in a client process with `KILN_SERVER` set,
  timed until the run's end is acknowledged (so every point is stored), against the
  same script on the embedded store; 8 clients log at once. MLflow 3's tracking
  server (SQLite, one worker) takes the same points through `MlflowClient.log_batch`
  over REST, 1,000 per call (its limit), from as many client processes. Open+close
  is `with app.run(): pass`, 300 in a row: through a server a run's start waits up
  to 20 ms for its end, so a run that ends at once is one round trip. The top 10 is
  `query_runs` ordered by a summary metric over 100,000 runs, the page and its
  records sent as JSON. The upload is `put_file` of 1 GiB of random bytes: the
  client hashes the file (to ask the server whether it has it), then streams it;
  the server hashes and writes each MiB in a thread while the next arrives, and
  syncs before naming the blob. The baseline copies the bytes a MiB at a time and
  syncs; `shutil.copyfile` is not the baseline because this filesystem makes
  `copy_file_range` a reflink that copies nothing. RSS growth is the peak (VmHWM,
  ru_maxrss) after the upload less the peak before it. The upload misses its goal:
  its floor is two SHA-256 passes over the file, the client's (to ask first) and the
  server's (to check before naming), each about 1 s per GB on this CPU (hashlib, 1.0
  GB/s with SHA-NI), while the copy with fsync took from 0.6 s to 4 s per GB across
  runs on this disk; the server's receive path no longer copies each MiB twice.
  Open+close and the 8-client ratio sit near their goals and move with the machine:
  3.9 to 4.1 ms and 21x in the two runs before this one; in this run (the machine
  about 30% slower, by the process-pool baseline) 5.7 ms and 19x, and an A/B run
  of the commit before this session's changes took as long (6.2 against 6.3 ms).
"""

if __name__ == "__main__":
    main()
