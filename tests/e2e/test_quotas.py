"""Shared hardware on a real ``kiln server``: two projects' driver processes on one pool
of (declared) GPUs, their quotas, borrowing, preemption with a checkpoint and resume,
and budgets that stop an agent's sweep before it overspends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ServerProcess
from kiln.record.model import RunStatus
from kiln.record.store.http import HttpStore

Start = Callable[..., ServerProcess]
FUNCS = Path(__file__).with_name("quota_funcs.py")
PRICES = '{"cpu_hour": 3.6, "gpu_hour": 36.0}'  # a core-hour $3.60: a 1-core hour run, $3.60


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Team:
    """A server with two projects (``default`` and ``blue``), an admin token of each."""

    def __init__(self, server: ServerProcess) -> None:
        assert server.enrolment is not None
        self.server = server
        self.http = httpx.Client(base_url=server.url + "/api/v1", timeout=30)
        root = self.http.post("/enrol", json={"name": "root"}, headers=bearer(server.enrolment))
        self.red = root.json()["token"]
        made = self.http.post("/projects", json={"name": "blue"}, headers=bearer(self.red))
        self.blue = made.json()["token"]["token"]

    def call(self, token: str, method: str, path: str, body: Any = None) -> Any:
        answer = self.http.request(method, path, json=body, headers=bearer(token))
        assert answer.status_code < 300, answer.text
        return answer.json() if answer.content else None

    def driver(self, token: str, tmp: Path, *args: str, **env: str) -> subprocess.Popen[str]:
        """A driver process of the project ``token`` is for, on pool ``box``."""
        home = tmp / f"home-{token[-6:]}-{args[0]}"
        full = {**os.environ, "KILN_SERVER": self.server.url, "KILN_TOKEN": token,
                "KILN_POOL": "box", "KILN_GPUS": "2", "KILN_HOME": str(home), **env}  # fmt: skip
        pipe = subprocess.PIPE
        return subprocess.Popen([sys.executable, str(FUNCS), *args], stdout=pipe, stderr=pipe,
                                text=True, env=full, cwd=FUNCS.parent)  # fmt: skip


@pytest.fixture
def team(start_server: Start, monkeypatch: pytest.MonkeyPatch) -> Iterator[Team]:
    monkeypatch.setenv("KILN_PRICES", PRICES)
    monkeypatch.setenv("KILN_LEASE_S", "6")  # engines sync every 2 s (every 1 s while one waits)
    team = Team(start_server(auth=True))
    team.call(team.red, "PUT", "/pools/box", {"cpu": 4, "gpu": 2})
    for token in (team.red, team.blue):  # one GPU each, lent to the other while idle
        team.call(token, "PUT", "/queues/box", {"cpu": 2, "gpu": 1, "cohort": "lab"})
    yield team
    team.http.close()


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_project_borrows_idle_gpus_and_gives_them_back_with_a_checkpoint(
    team: Team, tmp_path: Path
) -> None:
    red = team.driver(team.red, tmp_path, "train", "150")
    assert red.stdout is not None and red.stderr is not None
    line = red.stdout.readline()
    assert line, red.stderr.read()
    ids = json.loads(line)

    def both_admitted() -> bool:
        items = team.call(team.red, "GET", "/workloads")["items"]
        return sum(1 for w in items if w["state"] == "admitted") == 2

    wait_for(both_admitted, "red's two runs to be admitted (one on blue's idle GPU)")
    queues = team.call(team.red, "GET", "/queues")["items"]
    assert queues[0]["in_use"]["gpu"] == 2.0  # its nominal 1 and one borrowed
    store = HttpStore(team.server.url, cache=tmp_path / "cache", token=team.red)
    wait_for(lambda: all(store.get_run(i).status == RunStatus.RUNNING for i in ids),
             "red's runs to be running")  # fmt: skip

    blue = team.driver(team.blue, tmp_path, "quick")
    out, err = blue.communicate(timeout=120)
    assert blue.returncode == 0, err
    assert json.loads(out) == "done"  # blue got its GPU back while red still ran

    rest, err = red.communicate(timeout=120)
    assert red.returncode == 0, err
    results = json.loads(rest.splitlines()[0])
    assert all(r["steps"] == 150 for r in results)
    resumed = [r for r in results if r["resumed_from"] > 0]
    assert len(resumed) == 1  # the borrower was preempted, saved, and resumed from there
    records = [store.get_run(i) for i in ids]
    assert all(r.status == RunStatus.SUCCEEDED for r in records)
    victim = next(r for r in records if len(r.resources["attempts"]) > 1)
    first = victim.resources["attempts"][0]
    assert first["status"] == "preempted"
    assert first["cause"] == "preempted by a run of project blue (reclaim)"
    explained = team.call(team.red, "GET", f"/workloads/{victim.id}")
    assert explained["state"] == "finished" and "project blue" in explained["cause"]
    audit = team.call(team.red, "GET", "/audit/events?action=workload.preempt")
    assert any(e["target"] == victim.id for e in audit["events"])
    store.close()


def test_a_budget_stops_an_agents_sweep_before_it_overspends(team: Team, tmp_path: Path) -> None:
    team.call(team.red, "POST", "/principals", {"name": "ann", "kind": "user", "role": "member"})
    team.call(team.red, "POST", "/principals", {"name": "bot", "kind": "agent", "role": "member",
                                                "sponsor": "ann"})  # fmt: skip
    token = team.call(team.red, "POST", "/tokens", {"principal": "bot", "role": "member"})["token"]
    # Each costly run may cost up to $3.60 (1 core for its 3600 s timeout): $8 holds two.
    team.call(team.red, "PUT", "/budgets", {"principal": "bot", "amount": 8.0, "period": "day"})
    blue = team.driver(token, tmp_path, "sweep", "5")
    out, err = blue.communicate(timeout=120)
    ended = json.loads(out.splitlines()[-1])
    assert [e["status"] for e in ended] == ["succeeded"] * 2 + ["failed"] * 3, err
    for refused in ended[2:]:
        assert "over bot's budget" in refused["cause"] and "$8 per day" in refused["cause"]
    budgets = team.call(team.red, "GET", "/budgets")["items"]
    assert budgets[0]["principal"] == "bot" and budgets[0]["spent"] <= 8.0
    untimed = team.driver(token, tmp_path, "untimed")
    out, _ = untimed.communicate(timeout=120)
    refused = json.loads(out)
    assert refused["status"] == "failed" and "give the function a timeout" in refused["cause"]


def kiln_cli(team: Team, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KILN_SERVER": team.server.url, "KILN_TOKEN": token}
    return subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def test_admins_manage_pools_queues_and_budgets_from_the_cli(team: Team) -> None:
    made = kiln_cli(team, team.red, "pools", "set", "cpus", "--cpu", "8", "--memory", "32Gi")
    assert made.returncode == 0, made.stderr
    pools = json.loads(kiln_cli(team, team.red, "pools", "ls", "--json").stdout)
    assert {p["name"]: p["capacity"] for p in pools} == {
        "box": {"cpu": 4.0, "gpu": 2.0},
        "cpus": {"cpu": 8.0, "memory": 32.0},
    }
    # blue's admin may set blue's queue, not the server's pools
    denied = kiln_cli(team, team.blue, "pools", "set", "mine", "--cpu", "1")
    assert denied.returncode != 0 and "default project" in denied.stderr
    over = kiln_cli(team, team.blue, "queues", "set", "cpus", "--cpu", "9")
    assert over.returncode != 0 and "nominal.cpu: 9 is more than pool 'cpus'" in over.stderr
    bad = kiln_cli(team, team.blue, "queues", "set", "cpus", "--cpu", "2",
                   "--borrowing-limit", "disk=1")  # fmt: skip
    assert bad.returncode != 0 and "--borrowing-limit" in bad.stderr
    for args in (
        ["pools", "set", "q", "--cpu", "inf"],
        ["queues", "set", "cpus", "--weight", "nan"],
        ["budgets", "set", "inf"],
        ["what-if", "--pool", "box", "--gpu", "-1"],
    ):
        refused = kiln_cli(team, team.red, *args)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr, args
        assert "is not a number from 0 to" in refused.stderr, args
    done = kiln_cli(team, team.blue, "queues", "set", "cpus", "--cpu", "2", "--memory", "4Gi",
                    "--cohort", "c", "--borrowing-limit", "cpu=1", "--weight", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    queues = json.loads(kiln_cli(team, team.blue, "queues", "ls", "--json").stdout)
    cpus = next(q for q in queues if q["pool"] == "cpus")
    assert cpus["nominal"] == {"cpu": 2.0, "memory": 4.0} and cpus["weight"] == 2.0
    assert cpus["borrowing_limit"] == {"cpu": 1.0, "memory": 0.0, "gpu": 0.0}
    assert kiln_cli(team, team.blue, "budgets", "set", "100", "--period", "week").returncode == 0
    budgets = json.loads(kiln_cli(team, team.blue, "budgets", "ls", "--json").stdout)
    assert budgets == [{"principal": None, "amount": 100.0, "period": "week", "spent": 0.0,
                        "left": 100.0}]  # fmt: skip
    guess = kiln_cli(team, team.blue, "what-if", "--pool", "box", "--gpu", "2", "--timeout",
                     "1h", "--json")  # fmt: skip
    found = json.loads(guess.stdout)
    assert found["admitted"] and found["preempted"] == [] and found["max_cost"] == 72.0 + 3.6
    untimed = json.loads(kiln_cli(team, team.blue, "what-if", "--pool", "box", "--json").stdout)
    assert "give the function a timeout" in untimed["refused"]
    assert json.loads(kiln_cli(team, team.blue, "queue", "--json").stdout) == []
    shown = kiln_cli(team, team.blue, "queues", "ls")
    assert "cpus" in shown.stdout and "2 cpu, 4 GiB" in shown.stdout


def test_the_same_on_the_ray_engine(team: Team, tmp_path: Path, ray_cluster: str) -> None:
    """Red borrows blue's idle core of a Ray cluster; blue's run takes it back."""
    team.call(team.red, "PUT", "/pools/ray", {"cpu": 2})
    for token in (team.red, team.blue):
        team.call(token, "PUT", "/queues/ray", {"cpu": 1, "cohort": "lab"})
    ray = {"KILN_BACKEND": "ray", "KILN_RAY_ADDRESS": ray_cluster, "KILN_POOL": "ray",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # fmt: skip
    red = team.driver(team.red, tmp_path, "train-cpu", "200", **ray)
    assert red.stdout is not None and red.stderr is not None
    line = red.stdout.readline()
    assert line, red.stderr.read()
    ids = json.loads(line)
    store = HttpStore(team.server.url, cache=tmp_path / "cache", token=team.red)
    wait_for(lambda: all(store.get_run(i).status == RunStatus.RUNNING for i in ids),
             "red's runs to be running on Ray", timeout=120)  # fmt: skip
    blue = team.driver(team.blue, tmp_path, "quick-cpu", **ray)
    out, err = blue.communicate(timeout=180)
    assert blue.returncode == 0, err
    assert json.loads(out) == "done"
    rest, err = red.communicate(timeout=180)
    assert red.returncode == 0, err
    results = json.loads(rest.splitlines()[0])
    assert all(r["steps"] == 200 for r in results)
    assert len([r for r in results if r["resumed_from"] > 0]) == 1
    records = [store.get_run(i) for i in ids]
    victim = next(r for r in records if len(r.resources["attempts"]) > 1)
    assert victim.resources["attempts"][0]["status"] == "preempted"
    assert victim.engine == "ray"
    store.close()


def test_reasons_count_another_projects_runs_without_naming_them(team: Team) -> None:
    def ask(n: int, gpu: float) -> dict[str, Any]:
        return {"id": f"{n:032x}", "gpu": gpu}

    # red uses its own GPU and borrows blue's idle one; blue then asks for both
    team.call(team.red, "POST", "/workloads", {"pool": "box", "workloads": [ask(1, 1.0)]})
    team.call(team.blue, "POST", "/workloads", {"pool": "box", "workloads": [ask(2, 2.0)]})
    shown = kiln_cli(team, team.blue, "queue")
    assert shown.returncode == 0, shown.stderr
    assert "held by a run of default (1)" in shown.stdout.replace("\n", " ")
    listed = json.loads(kiln_cli(team, team.blue, "queue", "--json").stdout)
    assert listed[0]["reason"]["held_by"] == [{"project": "default", "amount": 1.0}]
    team.call(team.blue, "POST", "/workloads:sync", {"ended": [f"{2:032x}"]})
    team.call(team.red, "POST", "/workloads", {"pool": "box", "workloads": [ask(3, 1.0)]})
    guess = kiln_cli(team, team.blue, "what-if", "--pool", "box", "--gpu", "1")
    assert guess.returncode == 0, guess.stderr
    assert "would preempt a run of default (1 gpu)" in guess.stdout
    team.call(team.red, "POST", "/workloads:sync", {"ended": [f"{1:032x}", f"{3:032x}"]})
