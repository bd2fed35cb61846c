"""The record through ``kiln server`` (SQLite behind it), against the same work done on
the embedded store and against a real MLflow tracking server, all in this run.

- Metric ingest with ``kiln.log`` through the server, 1 client (goal: at least 50% of
  the direct SQLite store) and 8 concurrent clients (goal: at least 20x MLflow's server
  taking the same points through ``log_batch`` over REST, 1,000 per call).
- Run open+close through the server (goal < 5 ms) and the top 10 of 100,000 runs by a
  metric through the server (goal < 50 ms), with the embedded store's times beside them.
- Upload of a 1 GB artifact over loopback (goal: at least 50% of a plain file copy's
  rate, the bytes read and written a MiB at a time and synced, as the server must; peak
  RSS growth of client and server under 100 MB).

MLflow runs from its own virtualenv (made on first use under the temporary folder,
``pip install mlflow``), like the peer benchmarks in shared/peer-bench.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _common import Row, emit

HERE = Path(__file__).parent
PY = sys.executable
POINTS = 400_000  # per client, 1 client
EACH = 100_000  # per client, 8 clients
MLFLOW_EACH = 20_000  # per client: MLflow is slower; its rate is what is compared
MLFLOW_VENV = Path(tempfile.gettempdir()) / "kiln-bench-mlflow"


def start_server(home: Path, *, auth: bool = False) -> tuple[subprocess.Popen[str], str]:
    """A server on ``home``; with ``auth``, the URL is followed by a token of its admin."""
    proc = subprocess.Popen(
        [PY, "-m", "kiln", "server", "--home", str(home), "--port", "0",
         *([] if auth else ["--insecure-no-auth"])],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={k: v for k, v in os.environ.items() if k != "KILN_SERVER"},
    )  # fmt: skip
    assert proc.stdout is not None
    url = proc.stdout.readline().split()[2]
    if not auth:
        return proc, url
    import httpx

    enrolment = proc.stdout.readline().split("--enrol ")[1].split()[0]
    issued = httpx.post(f"{url}/api/v1/enrol", json={"name": "bench"},
                        headers={"Authorization": f"Bearer {enrolment}"})  # fmt: skip
    return proc, f"{url} {issued.json()['token']}"


OPEN_CLOSE = textwrap.dedent(
    """
    import statistics, time, kiln
    from kiln.record import recorder
    app = kiln.App("bench")
    with app.run():
        pass
    times = []
    for _ in range(300):
        t = time.perf_counter()
        with app.run():
            pass
        times.append(time.perf_counter() - t)
    print(statistics.median(times))
    recorder.close_all()
    """
)


def auth_overhead(work: Path, base: dict[str, str]) -> list[Row]:
    """Open+close and ingest through a server asking for tokens, against the same server
    with --insecure-no-auth, alternating (medians of 5)."""
    open_proc, open_url = start_server(work / "open")
    auth_proc, both = start_server(work / "auth", auth=True)
    auth_url, token = both.split()
    try:
        envs = {
            "open": {**base, "KILN_HOME": str(work / "c-open"), "KILN_SERVER": open_url},
            "auth": {**base, "KILN_HOME": str(work / "c-auth"), "KILN_SERVER": auth_url,
                     "KILN_TOKEN": token},
        }  # fmt: skip
        opened: dict[str, list[float]] = {"open": [], "auth": []}
        rate: dict[str, list[float]] = {"open": [], "auth": []}
        for _ in range(5):
            for kind, env in envs.items():
                out = subprocess.run([PY, "-c", OPEN_CLOSE], env=env, check=True,
                                     capture_output=True, text=True).stdout  # fmt: skip
                opened[kind].append(float(out.split()[-1]))
                rate[kind].append(ingest(1, POINTS // 2, env))
    finally:
        stop(open_proc)
        stop(auth_proc)
    o_open, o_auth = statistics.median(opened["open"]), statistics.median(opened["auth"])
    r_open, r_auth = statistics.median(rate["open"]), statistics.median(rate["auth"])
    return [
        Row("server", "run open+close with tokens and roles (s)", o_auth, o_open,
            "the same server with --insecure-no-auth", "s", "<= 1.1x", o_auth <= 1.1 * o_open),
        Row("server", "ingest with tokens and roles, 1 client (points/s)", r_auth, r_open,
            "the same server with --insecure-no-auth", "points/s", ">= 1/1.1x",
            r_auth * 1.1 >= r_open),
    ]  # fmt: skip


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(timeout=60)
    if proc.stdout is not None:
        proc.stdout.close()


LOGGER = textwrap.dedent(
    """
    import sys, time, kiln
    from kiln.record import recorder
    n = int(sys.argv[1])
    app = kiln.App("bench")
    with app.run():
        pass  # connect and warm up outside the timing
    values = [{"loss": float(i)} for i in range(1000)]
    t = time.perf_counter()
    with app.run():
        for i in range(n):
            kiln.log(values[i % 1000], step=i)
    print(time.perf_counter() - t)  # the run's end waits until its points are stored
    recorder.close_all()
    """
)


def ingest(clients: int, each: int, env: dict[str, str]) -> float:
    """Points per second, ``clients`` processes logging ``each`` points each at once."""
    procs = [subprocess.Popen([PY, "-c", LOGGER, str(each)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(clients)]  # fmt: skip
    t = time.perf_counter()
    for p in procs:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0
    wall = time.perf_counter() - t
    if clients == 1:
        wall = float(out.split()[-1])  # the run itself, without the interpreter's start
    return clients * each / wall


def mlflow_python() -> Path:
    python = MLFLOW_VENV / "bin" / "python"
    if not (MLFLOW_VENV / ".ready").exists():
        shutil.rmtree(MLFLOW_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(MLFLOW_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "mlflow>=3,<4"], check=True)
        (MLFLOW_VENV / ".ready").touch()
    return python


MLFLOW_CLIENT = textwrap.dedent(
    """
    import sys, time
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    url, n = sys.argv[1], int(sys.argv[2])
    c = MlflowClient(tracking_uri=url)
    exp = c.get_experiment_by_name("bench")
    exp_id = exp.experiment_id if exp else c.create_experiment("bench")
    run = c.create_run(exp_id)
    now = int(time.time() * 1000)
    for start in range(0, n, 1000):
        c.log_batch(run.info.run_id,
                    metrics=[Metric("loss", float(i), now, i) for i in range(start, start + 1000)])
    c.set_terminated(run.info.run_id)
    """
)


def mlflow_rate(clients: int, work: Path) -> float:
    python = mlflow_python()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(python.with_name("mlflow")), "server", "--backend-store-uri",
         f"sqlite:///{work}/mlflow.db", "--default-artifact-root", str(work / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_up(url + "/health")
        subprocess.run([str(python), "-c", MLFLOW_CLIENT, url, "1000"], check=True)  # warm
        procs = [subprocess.Popen([str(python), "-c", MLFLOW_CLIENT, url, str(MLFLOW_EACH)])
                 for _ in range(clients)]  # fmt: skip
        t = time.perf_counter()
        for p in procs:
            assert p.wait(timeout=1800) == 0
        return clients * MLFLOW_EACH / (time.perf_counter() - t)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str) -> None:
    import urllib.request

    for _ in range(600):
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310  a local URL
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


RUNS = textwrap.dedent(
    """
    import statistics, sys, time, kiln
    from kiln.record import recorder
    from kiln.record.store.base import RunQuery
    app = kiln.App("bench")
    with app.run():
        pass
    times = []
    for _ in range(300):
        t = time.perf_counter()
        with app.run():
            pass
        times.append(time.perf_counter() - t)
    store = recorder.recorder_for(app.settings).store
    query = []
    for _ in range(50):
        t = time.perf_counter()
        top = store.query_runs(RunQuery(order_by="-acc", limit=10))
        query.append(time.perf_counter() - t)
    assert len(top) == 10
    print(statistics.median(times), statistics.median(query))
    recorder.close_all()
    """
)


def seed_runs(home: Path, n: int = 100_000) -> None:
    """100,000 ended runs with an ``acc`` summary, written straight into the store."""
    from kiln.config import Settings
    from kiln.record.model import RunStatus
    from kiln.record.store import open_store
    from kiln.record.store.base import WriteBatch
    from kiln.record.store.rows import RunRow

    settings = Settings.from_env({"KILN_HOME": str(home)})
    home.mkdir(parents=True, exist_ok=True)
    with open_store(settings) as store:
        for start in range(0, n, 10_000):
            ids = [f"{i:032x}" for i in range(start, start + 10_000)]
            store.write(WriteBatch(
                new_runs=[RunRow(id=r, app="seed", status=RunStatus.SUCCEEDED, created_at=1.0 + i)
                          for i, r in enumerate(ids)],
                summaries=[(r, "seed", "acc", (i * 7919 % 10_000) / 10_000)
                           for i, r in enumerate(ids)],
            ))  # fmt: skip


UPLOAD = textwrap.dedent(
    """
    import resource, sys, time
    from pathlib import Path
    from kiln.record.store.http import HttpStore
    store = HttpStore(sys.argv[1], cache=Path(sys.argv[3]))
    store.blob_store.exists("0" * 64)  # connect, import everything
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    store.blob_store.put_file(Path(sys.argv[2]))
    elapsed = time.perf_counter() - t
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(elapsed, grown * 1024)
    """
)


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def upload(work: Path) -> tuple[float, float, int, int]:
    """(upload MB/s, plain copy MB/s, client RSS growth, server RSS growth)."""
    source = work / "artifact.bin"
    with source.open("wb") as f:
        for _ in range(1024):
            f.write(os.urandom(1 << 20))
    size_mb = source.stat().st_size / 1e6
    copies = []
    for i in range(2):  # the bytes copied: copy_file_range may be a reflink here, no copy
        target = work / f"copy{i}.bin"
        t = time.perf_counter()
        with source.open("rb") as src, target.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        copies.append(time.perf_counter() - t)
        target.unlink()
    proc, url = start_server(work / "server")
    try:
        before = peak_rss(proc.pid)
        out = subprocess.run([PY, "-c", UPLOAD, url, str(source), str(work / "cache")],
                             check=True, capture_output=True, text=True).stdout.split()  # fmt: skip
        server_growth = peak_rss(proc.pid) - before
    finally:
        stop(proc)
    return size_mb / float(out[0]), size_mb / min(copies), int(out[1]), server_growth


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = {k: v for k, v in os.environ.items() if k not in ("KILN_SERVER", "KILN_STORE")}
        direct_env = {**base, "KILN_HOME": str(work / "direct")}
        proc, url = start_server(work / "server1")
        server_env = {**base, "KILN_HOME": str(work / "client"), "KILN_SERVER": url}
        try:
            direct, through = [], []
            for _ in range(2):
                direct.append(ingest(1, POINTS, direct_env))
                through.append(ingest(1, POINTS, server_env))
            many = ingest(8, EACH, server_env)
        finally:
            stop(proc)
        one_mlflow = mlflow_rate(1, work / "mlflow1")
        many_mlflow = mlflow_rate(8, work / "mlflow8")
        d, s = statistics.median(direct), statistics.median(through)
        rows += [
            Row("server", "ingest through the server, 1 client (points/s)", s, d,
                "the embedded SQLite store, same process work", "points/s", ">= 0.5x direct",
                s >= 0.5 * d),
            Row("server", "ingest through the server, 1 client, vs MLflow (points/s)", s,
                one_mlflow, "MLflow 3 server, log_batch over REST, 1 client", "points/s",
                ">= 20x MLflow", s >= 20 * one_mlflow),
            Row("server", "ingest through the server, 8 clients (points/s)", many, many_mlflow,
                "MLflow 3 server, log_batch over REST, 8 clients", "points/s", ">= 20x MLflow",
                many >= 20 * many_mlflow),
        ]  # fmt: skip

        seed_runs(work / "runs-direct")
        shutil.copytree(work / "runs-direct", work / "runs-server")
        out = subprocess.run([PY, "-c", RUNS], env={**base, "KILN_HOME": str(work / "runs-direct")},
                             check=True, capture_output=True, text=True).stdout.split()  # fmt: skip
        direct_open, direct_top = float(out[0]), float(out[1])
        proc, url = start_server(work / "runs-server")
        try:
            env = {**base, "KILN_HOME": str(work / "runs-client"), "KILN_SERVER": url}
            out = subprocess.run([PY, "-c", RUNS], env=env, check=True, capture_output=True,
                                 text=True).stdout.split()  # fmt: skip
        finally:
            stop(proc)
        served_open, served_top = float(out[0]), float(out[1])
        rows += [
            Row("server", "run open+close through the server (s)", served_open, direct_open,
                "the embedded SQLite store", "s", "< 5 ms", served_open < 0.005),
            Row("server", "top 10 of 100,000 runs by a metric through the server (s)",
                served_top, direct_top, "the embedded SQLite store", "s", "< 50 ms",
                served_top < 0.05),
        ]  # fmt: skip

        rate, copy_rate, client_rss, server_rss = upload(work)
        rows += [
            Row("server", "upload of a 1 GB artifact over loopback (MB/s)", rate, copy_rate,
                "plain file copy (read/write 1 MiB at a time + fsync)", "MB/s", ">= 0.5x copy",
                rate >= 0.5 * copy_rate),
            Row("server", "peak RSS growth uploading 1 GB: client (MB)", client_rss / 1e6, 100.0,
                "the goal's bound, 100 MB", "MB", "< 100 MB", client_rss < 100e6),
            Row("server", "peak RSS growth uploading 1 GB: server (MB)", server_rss / 1e6, 100.0,
                "the goal's bound, 100 MB", "MB", "< 100 MB", server_rss < 100e6),
        ]  # fmt: skip
        rows += auth_overhead(work, base)
    emit(rows)


if __name__ == "__main__":
    main()
