"""``kiln cost``: what ended runs held (asked-for CPUs, memory and GPU share for their
wall time; what a hand-recorded run used) and, with ``KILN_PRICES``, what they cost."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from kiln.cli import app as cli
from kiln.config import Settings
from kiln.record.model import RunStatus
from kiln.record.store import open_store
from kiln.record.store.base import WriteBatch
from kiln.record.store.rows import RunRow

PRICES = '{"cpu_hour": 0.04, "memory_gb_hour": 0.01, "gpu_hour": {"H100": 3.0, "default": 1.0}}'
HOUR = 3600.0


def run(
    n: int, *, actor: str, app: str, asked: dict[str, float] | None, wall: float,
    gpus: list[str] | None = None, **extra: object,
) -> RunRow:  # fmt: skip
    now = time.time()
    resources = None if asked is None else {"requested": asked,
                                            "assigned": {"gpu_names": gpus or []}}  # fmt: skip
    return RunRow.model_validate({
        "id": f"{n:032x}", "app": app, "actor": actor, "status": RunStatus.SUCCEEDED,
        "created_at": now - wall, "started_at": now - wall, "ended_at": now,
        "resources": resources, "usage": {"wall_s": wall, "cpu_s": wall / 2,
                                          "peak_rss_bytes": 2_000_000_000},
        **extra,
    })  # fmt: skip


@pytest.fixture
def recorded(settings: Settings) -> None:
    with open_store(settings) as store:
        store.write(WriteBatch(new_runs=[
            run(1, actor="ann", app="fraud", asked={"cpu": 4, "memory_bytes": 8e9, "gpu": 0.5},
                wall=HOUR, gpus=["H100"]),
            run(2, actor="bob", app="fraud", asked={"cpu": 2, "memory_bytes": 0, "gpu": 0},
                wall=2 * HOUR),
            run(3, actor="bob", app="churn", asked=None, wall=HOUR),  # by hand: what it used
            run(4, actor="bob", app="churn", asked={"cpu": 1}, wall=HOUR, tags={"kind": "sweep"}),
        ]))  # fmt: skip


def cost(*args: str, prices: str | None = PRICES) -> dict[str, object]:
    env = {"KILN_PRICES": prices} if prices else {"KILN_PRICES": ""}
    result = CliRunner().invoke(cli, ["cost", "--json", *args], env=env)
    assert result.exit_code == 0, result.output
    found: dict[str, object] = json.loads(result.output)
    return found


def test_cost_by_user_app_and_project(recorded: None) -> None:
    by_user = {g["user"]: g for g in cost("--by", "user")["groups"]}  # type: ignore[union-attr]
    ann, bob = by_user["ann"], by_user["bob"]
    # ann: 4 CPU-h, 8 GB-h, half an H100 for an hour
    assert ann["cpu_hours"] == pytest.approx(4) and ann["gpu_hours"] == pytest.approx(0.5)
    assert ann["cost"] == pytest.approx(4 * 0.04 + 8 * 0.01 + 0.5 * 3.0)
    # bob: 2 CPUs for 2 h, plus a hand-recorded run's half hour of CPU and 2 GB for an
    # hour; the sweep's own run holds nothing
    assert bob["runs"] == 2 and bob["cpu_hours"] == pytest.approx(4.5)
    assert bob["cost"] == pytest.approx(4.5 * 0.04 + 2 * 0.01)
    apps = [g["app"] for g in cost("--by", "app")["groups"]]  # type: ignore[union-attr]
    assert apps == ["fraud", "churn"]  # costliest first
    [project] = cost("--by", "project")["groups"]  # type: ignore[misc]
    assert project["project"] == "default" and project["runs"] == 3


def test_without_prices_hours_only_and_bad_input_named(recorded: None) -> None:
    found = cost("--by", "sweep", prices=None)
    assert found["priced"] is False
    assert all(g["cost"] is None for g in found["groups"])  # type: ignore[union-attr]
    assert cost("--since", "1m")["groups"] == []  # created an hour or more ago
    for args, field in ((["--by", "team"], "--by"), (["--since", "soon"], "--since")):
        result = CliRunner().invoke(cli, ["cost", *args])
        assert result.exit_code != 0 and field in str(result.exception) + result.output
    bad = CliRunner().invoke(cli, ["cost"], env={"KILN_PRICES": '{"cpu_hour": -1}'})
    assert bad.exit_code != 0 and "KILN_PRICES" in str(bad.exception) + bad.output
