"""Run bundles: export, verify offline, import identically into another store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kiln
from kiln.cli import app as cli
from kiln.config import Settings
from kiln.record import recorder
from kiln.record.bundle import verify


def record_one(tmp_path: Path) -> str:
    data = tmp_path / "data.csv"
    data.write_text("x\n1\n2\n")
    with kiln.App("bundled").run(params={"lr": 0.1, "data": kiln.Dataset(data)}) as run:
        for step in range(50):
            kiln.log(
                {"loss": 1 / (step + 1), "odd": math.nan if step % 7 == 0 else step}, step=step
            )
        kiln.save("model.bin", b"weights" * 1000)
        run.set_result({"accuracy": 0.9})
    return run.id


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    error = "" if result.exception is None else str(result.exception)  # main() prints these
    return result.exit_code, result.output + error


def comparable(record: kiln.RunRecord) -> dict:
    data = record.to_dict()
    data["metrics"] = {
        key: [(p.step, p.time, repr(p.value)) for p in record.metric_history(key)]
        for key in ("loss", "odd")
    }
    return data


def test_export_verify_import_gives_the_identical_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = record_one(tmp_path)
    original = comparable(kiln.get_run(run_id))
    model_sha = kiln.get_run(run_id).artifact("model.bin").sha256
    bundle = tmp_path / "run.kiln"
    assert invoke("export", run_id[:8], "-o", str(bundle))[0] == 0
    assert invoke("verify", str(bundle)) == (
        0,
        f"{bundle} verified: every hash matches; unsigned: integrity only\n",
    )
    recorder.close_all()

    monkeypatch.setenv("KILN_HOME", str(tmp_path / "elsewhere"))
    code, out = invoke("import", str(bundle))
    assert code == 0 and "imported" in out, out
    copy = kiln.get_run(run_id)
    assert comparable(copy) == original
    assert copy.load("model.bin") == b"weights" * 1000
    assert copy.artifact("model.bin").sha256 == model_sha
    code, out = invoke("import", str(bundle))
    assert code == 0 and "already here" in out
    assert len(kiln.runs()) == 1
    recorder.close_all()
    assert invoke("audit", "verify")[0] == 0  # the import is audited and sealed like any write


def test_any_changed_byte_fails_verification_and_import(tmp_path: Path) -> None:
    run_id = record_one(tmp_path)
    bundle = tmp_path / "run.kiln"
    invoke("export", run_id, "-o", str(bundle))
    original = bundle.read_bytes()
    for offset in sorted({0, 1, 30, len(original) // 3, len(original) // 2, len(original) - 100,
                          len(original) - 70, len(original) - 1}):  # fmt: skip
        corrupt = bytearray(original)
        corrupt[offset] ^= 0x01
        bundle.write_bytes(bytes(corrupt))
        assert verify(bundle), f"a change at byte {offset} went unnoticed"
        code, out = invoke("import", str(bundle))
        assert code == 1 and "not imported" in out
    bundle.write_bytes(original)
    assert verify(bundle) == []


def test_no_blobs_keeps_hashes_and_a_conflicting_run_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = record_one(tmp_path)
    bundle = tmp_path / "slim.kiln"
    code, said = invoke("export", run_id, "-o", str(bundle), "--no-blobs")
    assert code == 0 and "2 left out: artifact" in said  # the model and the data set
    assert verify(bundle) == []
    import zipfile

    with zipfile.ZipFile(bundle) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        model_sha = next(a["sha256"] for a in manifest["artifacts"] if a["name"] == "model.bin")
        assert model_sha in manifest["blobs"]["omitted"]
        left_out = {"sha256": model_sha, "what": "artifact model.bin", "why": "--no-blobs"}
        assert left_out in manifest["blobs"]["left_out"]
        assert f"artifact model.bin {model_sha[:12]} (--no-blobs)" in said
        assert f"blobs/{model_sha}" not in zf.namelist()
    recorder.close_all()
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "other"))
    invoke("import", str(bundle))
    with kiln.App("bundled").run() as other:
        pass
    recorder.close_all()
    assert kiln.get_run(run_id).artifact("model.bin").sha256 == model_sha
    assert other.id != run_id
    missing = invoke("export", "ffffffff", "-o", str(tmp_path / "x.kiln"))
    assert missing[0] == 1


def test_settings_home_is_isolated() -> None:
    assert Settings.from_env().home.name == "kiln-home"


def test_every_single_byte_flip_is_reported_not_raised(tmp_path: Path) -> None:
    run_id = record_one(tmp_path)
    bundle = tmp_path / "run.kiln"
    invoke("export", run_id, "-o", str(bundle))
    original = bundle.read_bytes()
    for offset in range(0, len(original), max(1, len(original) // 400)):
        corrupt = bytearray(original)
        corrupt[offset] ^= 0xFF
        bundle.write_bytes(bytes(corrupt))
        assert verify(bundle), f"a change at byte {offset} went unnoticed"
