"""Batch inference: ``predict`` over a file or a list of rows, on replicas, resumable.

The input (JSONL, CSV or Parquet, or rows in memory) is cut into shards of
``shard_size`` rows. Replicas of the endpoint (the same processes, resources and
scheduler as serving) answer one shard at a time; each answered shard is written
to a checkpoint file, atomically, beside the output. A job that is killed and run
again with the same input, model version and shard size finds those files and
computes only the shards it lacks, so no row is computed into the output twice or
left out. The output holds one JSON line per input row, in input order; a row
that fails validation or raises is answered ``{"error": ...}`` in its place.

The job is recorded as a run of the endpoint's app: the input as a dataset, the
model version's artifact as an input (so lineage runs from the training run
through this run), and the output file as its artifact.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import ValidationError
from kiln.observe.tracing import BATCH_RUN_ID
from kiln.serve._replica import BATCH, batch_answers
from kiln.serve.replicas import Replica, replica_env, reserve, setup

if TYPE_CHECKING:
    from kiln.record.store.base import KilnStore
    from kiln.registry.models import ModelVersion
    from kiln.serve.endpoint import Endpoint

FORMATS = (".jsonl", ".csv", ".parquet")


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What a batch job did. ``outputs`` holds the answers when no output file was asked for."""

    run_id: str
    model: str
    rows: int
    rows_failed: int
    shards: int
    shards_resumed: int
    output: str | None
    outputs: list[Any] | None
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def run_batch(
    endpoint: Endpoint[Any],
    inputs: Sequence[Mapping[str, Any]] | str | Path,
    *,
    output: str | Path | None = None,
    shard_size: int = 1000,
    replicas: int | None = None,
    progress: bool = False,
) -> BatchResult:
    from kiln.record.recorder import recorder_for
    from kiln.record.runs import ActiveRun, Dataset
    from kiln.registry.models import models_for

    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise ValidationError("shard_size", f"{shard_size!r} is not a count", allowed="an int >= 1")
    if replicas is not None and (not isinstance(replicas, int) or replicas < 1):
        raise ValidationError("replicas", f"{replicas!r} is not a count", allowed="an int >= 1")
    settings = endpoint.app.settings
    spec = endpoint.spec
    rows, input_path = _read_rows(inputs, endpoint)
    out_path = Path(output) if output is not None else None
    if out_path is not None and out_path.suffix != ".jsonl":
        raise ValidationError("output", f"{str(out_path)!r} is not a .jsonl file")
    recorder = recorder_for(settings)
    version = models_for(recorder.store, app=spec.app, actor=settings.actor).get(spec.model)
    digest = _digest(input_path, rows)
    job_key = hashlib.sha256(
        json.dumps([digest, version.ref, spec.name, shard_size]).encode()
    ).hexdigest()[:16]
    if out_path is not None:
        job_dir = out_path.with_name(out_path.name + ".kiln-batch")
    else:
        job_dir = settings.home / "batch" / job_key
    shards = [rows[i : i + shard_size] for i in range(0, len(rows), shard_size)]
    done = _checkpoints(job_dir, job_key, len(shards))
    if input_path is None:
        input_path = job_dir / "input.jsonl"
        if not input_path.exists():
            _write_atomically(input_path, b"".join(r + b"\n" for r in rows))
    params = {
        "model": version.ref, "endpoint": spec.name, "input": Dataset(input_path),
        "rows": len(rows), "shard_size": shard_size,
    }  # fmt: skip
    tags = {"kind": "batch", "endpoint": spec.name, "model": version.ref,
            "resumed": str(bool(done)).lower()}  # fmt: skip
    started = time.perf_counter()
    with ActiveRun(settings, app=spec.app, params=params, tags=tags,
                   name=f"batch-{spec.name}") as run:  # fmt: skip
        model_run = recorder.store.get_run(version.run_id)
        run.use(model_run.artifact(version.artifact))
        todo = [i for i in range(len(shards)) if i not in done]
        want = min(replicas or spec.max_replicas, len(todo)) if todo else 0
        asyncio.run(_compute(endpoint, version, recorder.store, shards, todo, job_dir, want,
                             run.id, progress))  # fmt: skip
        failed = 0
        assembled = job_dir / "output.jsonl"
        with assembled.open("wb") as out:
            for i in range(len(shards)):
                part = (job_dir / _part(i)).read_bytes()
                failed += part.count(b'{"error":')
                out.write(part)
        final = out_path or assembled
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            assembled.replace(out_path)
        run.save("output.jsonl", final)
        seconds = time.perf_counter() - started
        result = {"rows": len(rows), "rows_failed": failed, "shards": len(shards),
                  "shards_resumed": len(done), "rows_per_s": len(rows) / seconds}  # fmt: skip
        run.set_result(result)
    outputs = None
    if out_path is None:
        outputs = [json.loads(line) for line in final.read_bytes().splitlines()]
    shutil.rmtree(job_dir, ignore_errors=True)
    return BatchResult(run.id, version.ref, len(rows), failed, len(shards), len(done),
                       str(out_path) if out_path else None, outputs, seconds)  # fmt: skip


async def _compute(
    endpoint: Endpoint[Any], version: ModelVersion, store: KilnStore, shards: list[list[bytes]],
    todo: list[int], job_dir: Path, n_replicas: int, run_id: str, progress: bool,
) -> None:  # fmt: skip
    """Answer the ``todo`` shards on ``n_replicas`` replicas, checkpointing each."""
    if not todo:
        return
    bar = _Progress(sum(len(shards[i]) for i in todo), progress)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in todo:
        queue.put_nowait(i)
    model_path = str(store.blob_store.fetch(version.artifact_sha256))
    init = setup(endpoint, endpoint.app.settings.record_url, version, model_path)

    async def shard(i: int, answer: Any) -> None:
        body = await answer
        answered = body.count(b"\n")
        if answered != len(shards[i]):
            raise RuntimeError(f"shard {i}: {len(shards[i])} rows in, {answered} out")
        await asyncio.to_thread(_write_atomically, job_dir / _part(i), body)
        bar.advance(len(shards[i]))

    try:
        if endpoint.app.settings.backend == "ray":
            await _on_ray(endpoint, init, shards, queue, n_replicas, run_id, shard)
        else:
            await _local(endpoint, store, init, shards, queue, n_replicas, run_id, shard)
    finally:
        bar.close()


async def _on_ray(
    endpoint: Endpoint[Any], init: dict[str, Any], shards: list[list[bytes]],
    queue: asyncio.Queue[int], n_replicas: int, run_id: str, shard: Any,
) -> None:  # fmt: skip
    """Shards answered by Ray actors of the endpoint's replica."""
    import ray

    from kiln.serve.on_ray import batch_replicas

    actors, connected = await asyncio.to_thread(batch_replicas, endpoint, init, max(1, n_replicas))

    async def work(actor: Any) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            attributes = {BATCH_RUN_ID: run_id, "kiln.batch.shard": i}
            rows = b"\n".join(shards[i])
            await shard(i, actor.batch.remote(rows, time.time_ns(), attributes))

    try:
        await asyncio.gather(*(work(a) for a in actors))
    finally:
        await asyncio.gather(*(a.close.remote() for a in actors), return_exceptions=True)
        for actor in actors:
            ray.kill(actor)
        if connected:
            ray.shutdown()


async def _local(
    endpoint: Endpoint[Any], store: KilnStore, init: dict[str, Any], shards: list[list[bytes]],
    queue: asyncio.Queue[int], n_replicas: int, run_id: str, shard: Any,
) -> None:  # fmt: skip
    """Shards answered by replica processes, admitted by the local engine's scheduler."""
    engine = await asyncio.to_thread(endpoint.app._engine)
    spec = endpoint.spec
    python, env_lock = None, None
    if spec.env is not None:
        from kiln.envs.manager import env_manager

        manager = env_manager(endpoint.app.settings.home, store.blob_store)
        built = await asyncio.to_thread(manager.ensure, spec.env)
        python, env_lock = str(built.python), str(built.lock_file)

    async def work() -> None:
        import sys

        lease_id, allocation = await reserve(engine.backend, spec.resources)
        replica = Replica()
        try:
            await replica.spawn(
                python=python or sys.executable, env=replica_env(env_lock, spec.resources.cpu)
            )
            gpus = allocation.cuda_visible_devices if engine.inventory.gpus else None
            await replica.start(lease_id, {**init, "cuda_visible_devices": gpus})
            while not queue.empty():
                i = queue.get_nowait()
                header = json.dumps({BATCH_RUN_ID: run_id, "kiln.batch.shard": i}).encode()
                body = header + b"\n" + b"\n".join(shards[i])
                await shard(i, _body(replica.send(BATCH, body, received_ns=time.time_ns())))
        finally:
            await replica.stop()
            engine.backend.release(lease_id)

    await asyncio.gather(*(work() for _ in range(max(1, n_replicas))))


async def _body(answer: Any) -> bytes:
    reply = await answer
    return batch_answers(reply.status, bytes(reply.body))


class _Progress:
    """A progress bar on a terminal; nothing otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            from rich.progress import Progress

            self._bar = Progress(transient=True)
            self._bar.start()
            self._task = self._bar.add_task("batch", total=total)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _part(i: int) -> str:
    return f"shard-{i:07d}.jsonl"


def _checkpoints(job_dir: Path, job_key: str, n_shards: int) -> set[int]:
    """The shards already answered by an earlier attempt of this same job. A folder
    left by a different job (other input, version or shard size) is cleared."""
    marker = job_dir / "job.json"
    if marker.exists():
        try:
            same = json.loads(marker.read_text()).get("key") == job_key
        except (OSError, ValueError):
            same = False
        if same:
            return {i for i in range(n_shards) if (job_dir / _part(i)).exists()}
        shutil.rmtree(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(marker, json.dumps({"key": job_key}).encode())
    return set()


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _digest(path: Path | None, rows: list[bytes]) -> str:
    h = hashlib.sha256()
    if path is not None:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        for row in rows:
            h.update(row + b"\n")
    return h.hexdigest()


def _read_rows(
    inputs: Sequence[Mapping[str, Any]] | str | Path, endpoint: Endpoint[Any]
) -> tuple[list[bytes], Path | None]:
    """Rows as JSON objects (one request body each), and the input file if there is one."""
    if isinstance(inputs, str | Path):
        path = Path(inputs)
        if path.suffix not in FORMATS:
            raise ValidationError("input", f"{str(path)!r} is not a supported file",
                                  allowed=FORMATS)  # fmt: skip
        if not path.is_file():
            raise ValidationError("input", f"no file {str(path)!r}")
        if path.suffix == ".jsonl":
            return [line for line in path.read_bytes().splitlines() if line.strip()], path
        table = _csv(path) if path.suffix == ".csv" else _parquet(path)
        return [json.dumps(_request(r, endpoint)).encode() for r in table], path
    if isinstance(inputs, Mapping) or not isinstance(inputs, Sequence):
        raise ValidationError("inputs", "pass a list of rows (dicts) or a file path")
    out = []
    for i, row in enumerate(inputs):
        if not isinstance(row, Mapping):
            raise ValidationError("inputs", f"row {i} is a {type(row).__name__}, not a dict")
        out.append(json.dumps(row, default=_plain).encode())
    return out, None


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _request(row: dict[str, Any], endpoint: Endpoint[Any]) -> dict[str, Any]:
    """A table row as a request: by column name when the columns are ``predict``'s
    arguments; otherwise, for a ``predict`` of one argument, the row's values as that
    argument (a list, in column order)."""
    names = list(endpoint.predict_signature.parameters)
    if set(row) <= set(names):
        return row
    if len(names) == 1:
        return {names[0]: list(row.values())}
    raise ValidationError(
        "input", f"columns {sorted(row)} are not the arguments of predict", allowed=names
    )


def _csv(path: Path) -> Iterable[dict[str, Any]]:
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            yield {k: _number(v) for k, v in row.items()}


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _parquet(path: Path) -> list[dict[str, Any]]:
    from kiln._optional import require

    pq = require("pyarrow.parquet", extra="parquet")
    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows
