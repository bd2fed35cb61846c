"""The audit log catches tampering with the database and the blob store."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kiln
from kiln.cli import app as cli
from kiln.config import Settings
from kiln.record import recorder


def record_two_runs() -> list[str]:
    app = kiln.App("audited")
    ids = []
    for lr in (0.1, 0.2):
        with app.run(params={"lr": lr}) as run:
            for step in range(5):
                kiln.log({"loss": lr * step}, step=step)
            kiln.save("model.bin", f"weights {lr}".encode())
        ids.append(run.id)
    recorder.close_all()  # flush and seal, as at the end of a process
    return ids


def verify() -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["audit", "verify"])
    return result.exit_code, result.output


def db() -> sqlite3.Connection:
    return sqlite3.connect(Settings.from_env().home / "kiln.db", isolation_level=None)


def test_every_mutation_is_an_event_and_the_log_verifies() -> None:
    run_ids = record_two_runs()
    code, out = verify()
    assert code == 0, out
    events = json.loads(CliRunner().invoke(cli, ["audit", "ls", "--json", "-n", "100"]).output)
    actions = [(e["action"], e["target"]) for e in reversed(events)]
    for run_id in run_ids:
        for action in ("run.create", "artifact.save", "run.end", "run.seal"):
            assert (action, run_id) in actions
    assert {e["actor"] for e in events} == {"tester"}
    assert [e["seq"] for e in reversed(events)] == list(range(1, len(events) + 1))
    only_ends = CliRunner().invoke(cli, ["audit", "ls", "--action", "run.end", "--json"]).output
    assert {e["target"] for e in json.loads(only_ends)} == set(run_ids)


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        ("UPDATE metrics SET value = value + 1 WHERE step = 2", "its metrics changed"),
        ("UPDATE summary SET value = 0", "its summary changed"),
        ("DELETE FROM audit WHERE seq = 3", "event 3 is missing"),
        ("UPDATE audit SET actor = 'mallory' WHERE seq = 2", "event 2"),
        ("UPDATE audit SET payload = replace(payload, '0.1', '0.9') WHERE seq = 1", "event 1"),
        ("UPDATE artifacts SET size = 1", "its artifacts changed"),
    ],
)
def test_verify_finds_each_kind_of_tampering(tamper: str, expected: str) -> None:
    record_two_runs()
    with db() as conn:
        conn.execute(tamper)
    code, out = verify()
    assert code == 1 and expected in out, out


def test_verify_finds_a_swapped_or_missing_blob() -> None:
    run_ids = record_two_runs()
    blob = kiln.get_run(run_ids[0]).artifact_path("model.bin")
    recorder.close_all()
    blob.chmod(0o644)
    blob.write_bytes(b"weights 0.9")  # same size, other bytes
    code, out = verify()
    assert code == 1 and "does not hash to its name" in out, out
    blob.unlink()
    code, out = verify()
    assert code == 1 and "missing" in out, out


def test_engine_runs_are_audited_and_sealed() -> None:
    app = kiln.App("audited-engine")

    @app.function()
    def work(x: int) -> dict:
        kiln.log({"x": float(x)})
        return {"double": 2 * x}

    assert list(work.map(range(3))) == [{"double": 0}, {"double": 2}, {"double": 4}]
    deadline = time.time() + 10
    seals = []
    while len(seals) < 3 and time.time() < deadline:
        events = recorder.recorder_for(Settings.from_env()).store.audit_events(
            action="run.seal", limit=None
        )
        seals = [e["target"] for e in events]
        time.sleep(0.1)
    assert len(seals) == 3
    code, out = verify()
    assert code == 0, out


def test_datasets_are_hashed_not_stored_and_verify_knows_it(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("1\n")
    with kiln.App("audited").run(params={"data": kiln.Dataset(data)}):
        pass
    recorder.close_all()
    code, out = verify()
    assert code == 0, out
