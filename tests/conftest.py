"""Fixtures shared by every test: an isolated KILN_HOME, and a store per backend.

PostgreSQL tests take their server from KILN_TEST_POSTGRES_URL (``.ci/run`` sets it
to the machine's local server). Each test gets a schema of its own there.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from kiln._engine import close_engines
from kiln.config import Settings
from kiln.observe import runtrace
from kiln.record import recorder

PG_URL = os.environ.get("KILN_TEST_POSTGRES_URL")
STORES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if PG_URL:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(
            "CI must set KILN_TEST_POSTGRES_URL: the PostgreSQL tests are required"
        )
    skip = pytest.mark.skip(reason="KILN_TEST_POSTGRES_URL is not set (bash .ci/run sets it)")
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _uv_cache() -> None:
    """Packages the env tests download are cached in a folder the tests own, across runs."""
    os.environ.setdefault("UV_CACHE_DIR", str(Path(__file__).parent.parent / ".cache" / "uv"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test records into its own KILN_HOME, builds envs into its own KILN_CACHE
    and keeps keys and anchors of its own (never the user's); recorders are closed after."""
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "kiln-home"))
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "kiln-cache"))
    monkeypatch.setenv("KILN_KEYS", str(tmp_path / "kiln-keys"))
    monkeypatch.setenv("KILN_ANCHORS", str(tmp_path / "kiln-anchors.jsonl"))
    monkeypatch.delenv("KILN_STORE", raising=False)
    monkeypatch.setenv("KILN_ACTOR", "tester")
    monkeypatch.delenv("KILN_GPUS", raising=False)
    yield
    close_engines()
    recorder.close_all()
    runtrace.reset()  # a test that set OTEL_EXPORTER_OTLP_ENDPOINT keeps it to itself


RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def ray_start(*args: str, cpus: int = 1) -> None:
    """``ray start`` a node of ``cpus`` CPUs on this machine (no token authentication: Ray
    2.5x turns it on for ``ray start``, and a local test cluster does not need it)."""
    ray = Path(sys.executable).with_name("ray")
    subprocess.run(
        [str(ray), "start", "--num-cpus", str(cpus), "--num-gpus", "0", "--disable-usage-stats",
         *args],
        check=True, capture_output=True, env={**os.environ, **RAY_ENV}, timeout=180,
    )  # fmt: skip


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A real Ray cluster, started once for the session: a head and a worker node."""
    port = "6399"  # below the range Ray gives its workers (10002-19999)
    ray_start("--head", "--port", port, "--include-dashboard", "false")
    try:
        ray_start("--address", f"127.0.0.1:{port}")
        yield f"127.0.0.1:{port}"
    finally:
        ray = Path(sys.executable).with_name("ray")
        subprocess.run([str(ray), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree("/tmp/ray/session_latest", ignore_errors=True)


@pytest.fixture
def on_ray(ray_cluster: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Functions of this test run on the Ray cluster."""
    monkeypatch.setenv("KILN_BACKEND", "ray")
    monkeypatch.setenv("KILN_RAY_ADDRESS", ray_cluster)
    for name, value in RAY_ENV.items():
        monkeypatch.setenv(name, value)
    return ray_cluster


@pytest.fixture(params=["local", "ray"])
def engine(request: pytest.FixtureRequest) -> str:
    """The backend contract: a test taking this runs on the local engine and on Ray."""
    if request.param == "ray":
        request.getfixturevalue("on_ray")
    return str(request.param)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh, empty schema."""
    assert PG_URL, "KILN_TEST_POSTGRES_URL is not set"
    schema = f"kiln_test_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    close_engines()
    recorder.close_all()
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture(params=STORES)
def settings(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Settings for a fresh store of each kind, also exported as KILN_STORE."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        monkeypatch.setenv("KILN_STORE", url)
    return Settings.from_env()


class ServerProcess:
    """A real ``kiln server`` process on a free port of 127.0.0.1."""

    def __init__(
        self, store_url: str, home: Path, *, auth: bool = False, args: tuple[str, ...] = ()
    ) -> None:
        self.store_url, self.home, self.auth, self.args = store_url, home, auth, args
        self.url = ""
        self.enrolment: str | None = None  # the one-time token an auth server printed
        self.proc: subprocess.Popen[str] | None = None

    def start(self, port: int = 0) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if k != "KILN_SERVER"}
        self.home.mkdir(parents=True, exist_ok=True)
        self.log = self.home / "server.log"
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kiln", "server", "--store", self.store_url,
                 "--home", str(self.home), "--port", str(port),
                 *([] if self.auth else ["--insecure-no-auth"]), *self.args],
                stdout=subprocess.PIPE, stderr=log, text=True, env=env,
            )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # printed once it listens
        if not line.startswith("kiln server: "):
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            raise RuntimeError(f"kiln server did not start: {line}{self.log.read_text()}")
        self.url = line.split()[2]
        if self.auth and self.enrolment is None:  # printed at the first start only
            self.enrolment = self.proc.stdout.readline().split("--enrol ")[1].split()[0]
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        self._close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=60)
        self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real ``kiln server`` processes (stopped after the test)."""
    started: list[ServerProcess] = []

    def start(
        store_url: str | None = None, home: Path | None = None, *, auth: bool = False,
        args: tuple[str, ...] = (),
    ) -> ServerProcess:  # fmt: skip
        home = home or tmp_path / "server-home"
        url = store_url or f"sqlite:///{home / 'kiln.db'}"
        server = ServerProcess(url, home, auth=auth, args=args).start()
        started.append(server)
        return server

    yield start
    close_engines()  # what they still write goes to the servers before they stop
    recorder.close_all()
    for server in started:
        server.stop()


SERVER_STORES = ["http-sqlite", pytest.param("http-postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=[*STORES, *SERVER_STORES])
def any_settings(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Settings for a fresh record of each kind, as the SDK's environment says it: SQLite,
    PostgreSQL, and a real ``kiln server`` on each (KILN_SERVER)."""
    return record_settings(request, str(request.param), monkeypatch)


def record_settings(
    request: pytest.FixtureRequest, kind: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Settings (exported to the environment) for a fresh record of ``kind``: sqlite,
    postgres, http-sqlite or http-postgres."""
    url = request.getfixturevalue("pg_url") if kind.endswith("postgres") else None
    if kind.startswith("http"):
        server = request.getfixturevalue("start_server")(url)
        monkeypatch.setenv("KILN_SERVER", server.url)
    elif url:
        monkeypatch.setenv("KILN_STORE", url)
    return Settings.from_env()
