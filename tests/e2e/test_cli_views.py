"""What the ``kiln`` command shows: text as the user wrote it, numbers whole, the
step-by-step metrics, the package list, policies, registration and requests."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import kiln
from kiln.cli import app as cli
from kiln.cli._render import fmt_value, sparkline
from kiln.cli.envs import pinned
from kiln.envs.manager import EnvInfo
from kiln.record.model import RunStatus


def invoke(*args: str, actor: str | None = None) -> tuple[int, str]:
    env = {"KILN_ACTOR": actor} if actor else None
    result = CliRunner().invoke(cli, list(args), env=env)
    error = "" if result.exception is None else str(result.exception)  # main() prints these
    return result.exit_code, result.output + error


@pytest.fixture
def run_id() -> str:
    with kiln.App("views").run(params={"extra": "kiln[parquet]", "n": 30000}) as run:
        for step in range(60):
            kiln.log({"loss": 1 / (step + 1), "tokens": 30000.0 * step}, step=step)
        kiln.save("model.pkl", b"weights")
    return run.id


def test_numbers_print_whole_from_ten_thousand_up() -> None:
    assert [fmt_value(v) for v in (30000.0, 123456.7, 0.123456, 1234.5, 1e20, 1e-7)] == [
        "30000", "123457", "0.1235", "1234", "1e+20", "1e-07",
    ]  # fmt: skip


def test_user_text_keeps_its_brackets_everywhere(run_id: str) -> None:
    with kiln.App("views").run(params={"extra": "[red]x[/]"}) as other:
        pass
    for args in (
        ["runs", "ls"],
        ["runs", "show", run_id[:8]],
        ["runs", "compare", run_id, other.id],
    ):
        code, out = invoke(*args)
        assert code == 0, out
        assert "kiln[parquet]" in out and "3e+04" not in out and "30000" in out
    assert "[red]x[/]" in invoke("runs", "ls")[1]


def test_status_help_lists_every_status() -> None:
    code, out = invoke("runs", "ls", "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert all(status.value in flat for status in RunStatus)


def test_runs_show_metrics_step_by_step(run_id: str) -> None:
    code, out = invoke("runs", "show", run_id[:8], "--metrics")
    assert code == 0, out
    assert "loss" in out and "tokens" in out and "1770000" in out  # the last step's tokens
    assert "40 of 60 steps shown" in out
    data = json.loads(invoke("runs", "show", run_id, "--metrics", "--json")[1])
    loss = data["metric_history"]["loss"]
    assert [p["step"] for p in loss] == list(range(60)) and loss[1]["value"] == 0.5
    assert sparkline([0.0, 1.0, 2.0]) == "▁▅█"


def test_runs_show_packages(run_id: str) -> None:
    from importlib.metadata import version

    code, out = invoke("runs", "show", run_id, "--packages")
    assert code == 0 and f"typer=={version('typer')}" in out.split()
    assert "--packages" in invoke("runs", "show", run_id)[1]  # the panel says how to list them
    data = json.loads(invoke("runs", "show", run_id, "--packages", "--json")[1])
    assert f"rich=={version('rich')}" in data["packages"]


def test_register_policy_promote_and_approve_by_prefix(
    run_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = invoke("models", "register", "views-model", run_id[:6], "--artifact", "model.pkl")
    assert code == 0 and "registered views-model:1" in out, out
    registered = json.loads(invoke("models", "show", "views-model", "--json")[1])
    assert registered["versions"][0]["run_id"] == run_id
    assert invoke("models", "policy", "show", "views-model", "production", "--json")[1].strip() == (
        "null"
    )
    bad = invoke("models", "policy", "set", "views-model", "production", '{"metrics": {"loss": 1}}')
    assert bad[0] == 1 and "policy.metrics.loss" in bad[1]
    policy = {"metrics": {"loss": "<= 0.5"}, "allow_dirty": True,
              "approvals": {"count": 1, "approvers": ["alice"]}}  # fmt: skip
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    file = str(tmp_path / "policy.json")
    assert invoke("models", "policy", "set", "views-model", "production", "-f", file)[0] == 0
    shown = invoke("models", "policy", "show", "views-model", "production", "--json")[1]
    assert json.loads(shown) == policy
    actions = [e["action"] for e in json.loads(invoke("audit", "ls", "--json")[1])]
    assert actions[:2] == ["policy.set", "model.register"]
    # Two requests whose ids share a prefix: the prefix is refused, naming both.
    ids = iter(["abcd000000000001", "abcd000000000002"])
    monkeypatch.setattr("kiln.registry.models.secrets.token_hex", lambda n: next(ids))
    for _ in range(2):
        assert "waits for 1 approval" in invoke("models", "promote", "views-model", "1")[1]
    code, out = invoke("models", "approve", "abcd", actor="alice")
    assert code == 1 and "abcd000000000001" in out and "abcd000000000002" in out
    code, out = invoke("models", "approve", "abcd0000000000", actor="alice")
    assert code == 1 and "several requests" in out
    code, out = invoke("models", "approve", "abcd000000000002", actor="alice")
    assert code == 0 and "applied" in out
    code, out = invoke("models", "reject", "abcd0000000000001")
    assert code == 1 and "no promotion request" in out
    assert invoke("models", "reject", "abcd000000000001")[0] == 0
    code, out = invoke("models", "policy", "set", "views-model", "production", "--clear")
    assert code == 1 and "removes the policy" in out and "--weaken" in out
    clear = ["--clear", "--weaken", "--reason", "retired"]
    assert invoke("models", "policy", "set", "views-model", "production", *clear)[0] == 0


def test_audit_ls_shows_whole_targets(run_id: str) -> None:
    code, out = invoke("audit", "ls", "--action", "run.create")
    assert code == 0 and run_id in out


LOCK = """\
numpy==2.1.0 \\
    --hash=sha256:aaaa \\
    --hash=sha256:bbbb
six==1.16.0 ; python_version >= "3" \\
    --hash=sha256:cccc
"""


def test_envs_show_summarizes_and_lock_prints_the_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    info = EnvInfo(env_id="e" * 64, path=Path("/envs/e"), python="3.11.7", packages=2,
                   size_bytes=3 << 20, created_at=time.time(), last_used_at=time.time(),
                   lock_sha256="f" * 64)  # fmt: skip

    class Manager:
        def get(self, env_id: str) -> EnvInfo:
            return info

        def lock_text(self, _: EnvInfo) -> str:
            return LOCK

    monkeypatch.setattr("kiln.cli.envs._manager", lambda: (Manager(), kiln.Settings.from_env()))
    monkeypatch.setattr("kiln.app.runs", lambda **_: [])
    assert pinned(LOCK) == ["numpy==2.1.0", "six==1.16.0"]
    code, out = invoke("envs", "show", "eeee")
    assert code == 0, out
    assert "numpy==2.1.0  six==1.16.0" in out and "sha256:aaaa" not in out and "--lock" in out
    assert invoke("envs", "show", "eeee", "--lock")[1] == LOCK
    data: dict[str, Any] = json.loads(invoke("envs", "show", "eeee", "--json")[1])
    assert data["packages"] == ["numpy==2.1.0", "six==1.16.0"] and data["lock"] == LOCK


def test_hashes_and_numbers_are_not_highlighted(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.cli._render import console, plain

    monkeypatch.setenv("FORCE_COLOR", "1")  # as on a terminal, where colours would show
    out = console()
    with out.capture() as captured:
        out.print(plain("sha256 9a129038d9a00aed, 42 runs, kiln[parquet]"))
    assert captured.get() == "sha256 9a129038d9a00aed, 42 runs, kiln[parquet]\n"


def test_reproduce_refuses_a_negative_tolerance_as_bad_usage() -> None:
    result = CliRunner().invoke(cli, ["reproduce", "abc", "--rtol", "-1"])
    assert result.exit_code == 2  # bad usage, as documented; not 1 (could not reproduce)
    assert "--rtol" in result.output
