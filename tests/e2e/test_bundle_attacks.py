"""A bundle is hostile input: crafted ones, re-sealed as an attacker can, are refused
before anything is written, never touch a file outside KILN_HOME, never claim
another run, and never run code; signatures say who made a bundle."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import kiln
from kiln.cli import app as cli
from kiln.config import Settings
from kiln.errors import KilnError
from kiln.record import recorder
from kiln.record.bundle import BundleError, import_bundle
from kiln.reproduce import ReproduceError, reproduce

HERE = Path(__file__).parent


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    error = "" if result.exception is None else str(result.exception)
    return result.exit_code, result.output + error


def seal(data: bytes) -> bytes:
    """Re-seal zip bytes as export does: the comment ends with the sha256 of all before."""
    body = data[: -len(b"kiln-sha256:") - 64]
    return body + b"kiln-sha256:" + hashlib.sha256(body).hexdigest().encode()


def forge(members: list[tuple[str, bytes]], *, manifest: dict[str, Any] | None = None) -> bytes:
    """A bundle of these members, with a manifest (rehashed) and seal an attacker made."""
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as zf:
        warnings.simplefilter("ignore")  # a duplicate member is one of the attacks
        for name, data in members:
            if name == "manifest.json" and manifest is not None:
                data = json.dumps(manifest).encode()
            if name == "manifest.sha256" and manifest is not None:
                data = hashlib.sha256(json.dumps(manifest).encode()).hexdigest().encode()
            zf.writestr(name, data)
        zf.comment = b"kiln-sha256:" + b"0" * 64
    return seal(out.getvalue())


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[tuple[str, bytes]], str]:
    """The members of a real bundle of a function's run, and the run's id."""
    root = tmp_path_factory.mktemp("attacks")
    os.environ["KILN_HOME"] = str(root / "home")
    try:
        app = kiln.App("victim")

        @app.function()
        def train(lr: float) -> dict[str, float]:
            kiln.log({"loss": lr}, step=0)
            kiln.save("model.bin", b"weights")
            return {"accuracy": 0.9}

        run = train.spawn(lr=0.1)
        run.wait()
        recorder.close_all()
        out = root / "run.kiln"
        assert invoke("export", run.id, "-o", str(out))[0] == 0
    finally:
        recorder.close_all()
        del os.environ["KILN_HOME"]
    with zipfile.ZipFile(out) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()], run.id


def manifest_of(members: list[tuple[str, bytes]]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(dict(members)["manifest.json"])
    return data


def attempt(tmp_path: Path, data: bytes) -> str:
    """Import ``data``; the refusal's message (the test fails if it was imported)."""
    path = tmp_path / "crafted.kiln"
    path.write_bytes(data)
    rec = recorder.recorder_for(Settings.from_env())
    with pytest.raises(BundleError) as info:
        import_bundle(rec.store, rec.blobs, path)
    return str(info.value)


def test_an_artifact_row_naming_another_run_is_refused(original: Any, tmp_path: Path) -> None:
    members, _ = original
    with kiln.App("victim").run() as mine:
        kiln.save("model.bin", b"my own weights")
    manifest = manifest_of(members)
    manifest["artifacts"][0]["run_id"] = mine.id
    assert "names another run" in attempt(tmp_path, forge(members, manifest=manifest))
    assert (
        kiln.get_run(mine.id).artifact("model.bin").sha256
        == hashlib.sha256(b"my own weights").hexdigest()
    )


@pytest.mark.parametrize(
    "name", ["blobs/../../outside", "/etc/kiln-owned", "../x", "blobs/ab", "blobs/" + "A" * 64]
)
def test_member_names_outside_the_layout_are_refused(
    original: Any, tmp_path: Path, name: str
) -> None:
    members, _ = original
    message = attempt(tmp_path, forge([*members, (name, b"x")]))
    assert "is not one a bundle holds" in message
    assert not Path("/etc/kiln-owned").exists()


def test_a_member_twice_is_refused(original: Any, tmp_path: Path) -> None:
    members, _ = original
    blob = next(m for m in members if m[0].startswith("blobs/"))
    assert "member twice" in attempt(tmp_path, forge([*members, blob]))


def test_a_blob_that_does_not_hash_to_its_name_is_refused(original: Any, tmp_path: Path) -> None:
    members, _ = original
    manifest = manifest_of(members)
    name = next(n for n in manifest["files"] if n.startswith("blobs/"))
    evil = b"not the weights"
    manifest["files"][name] = hashlib.sha256(evil).hexdigest()  # the manifest agrees with it
    forged = [(n, evil if n == name else d) for n, d in members]
    assert "another sha256 than its name" in attempt(tmp_path, forge(forged, manifest=manifest))


@pytest.mark.parametrize("run_id", ["../../x", "0" * 31, "G" * 32, 12])
def test_a_run_id_kiln_would_not_make_is_refused(
    original: Any, tmp_path: Path, run_id: Any
) -> None:
    members, _ = original
    manifest = manifest_of(members)
    manifest["run"]["id"] = run_id
    for art in manifest["artifacts"]:
        art["run_id"] = run_id
    assert "is not one Kiln makes" in attempt(tmp_path, forge(members, manifest=manifest))


def test_a_huge_manifest_is_refused_without_reading_it(original: Any, tmp_path: Path) -> None:
    members, _ = original
    huge = b'{"format": "kiln-bundle/1", "pad": "' + b" " * (65 << 20) + b'"}'
    forged = [(n, huge if n == "manifest.json" else d) for n, d in members]
    forged = [(n, hashlib.sha256(huge).hexdigest().encode() if n == "manifest.sha256" else d)
              for n, d in forged]  # fmt: skip
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, d in forged:
            zf.writestr(n, d)
        zf.comment = b"kiln-sha256:" + b"0" * 64
    assert "larger than" in attempt(tmp_path, seal(out.getvalue()))


def test_a_blob_dropped_from_the_manifest_is_refused(original: Any, tmp_path: Path) -> None:
    members, _ = original
    manifest = manifest_of(members)
    manifest["blobs"]["included"] = []  # not declared left out either: the bytes would be lost
    message = attempt(tmp_path, forge(members, manifest=manifest))
    assert "neither included nor left out" in message


def test_a_bundle_without_its_artifacts_imports_and_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with kiln.App("light").run() as run:
        kiln.save("model.bin", b"weights left behind")
    recorder.close_all()
    bundle = tmp_path / "light.kiln"
    assert invoke("export", run.id, "-o", str(bundle), "--no-blobs")[0] == 0
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "importer"))
    assert invoke("import", str(bundle))[0] == 0
    code, out = invoke("audit", "verify")
    assert code == 0, out  # the artifact was left out by its exporter, not lost here


def test_the_importer_is_the_actor_and_the_author_is_kept_as_claimed(
    original: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    members, run_id = original
    manifest = manifest_of(members)
    manifest["run"]["actor"] = "alice"
    path = tmp_path / "claimed.kiln"
    path.write_bytes(forge(members, manifest=manifest))
    monkeypatch.setenv("KILN_ACTOR", "bob")
    assert invoke("import", str(path))[0] == 0
    store = recorder.recorder_for(Settings.from_env()).store
    created = store.audit_events(action="run.create", target=run_id)
    assert [e["actor"] for e in created] == ["bob"]
    imported = store.audit_events(action="run.import", target=run_id)
    assert imported[0]["actor"] == "bob"
    assert json.loads(imported[0]["payload"])["claimed_actor"] == "alice"


def test_an_imported_run_is_reproduced_only_when_trusted(original: Any, tmp_path: Path) -> None:
    members, run_id = original
    path = tmp_path / "run.kiln"
    path.write_bytes(forge(members))
    assert invoke("import", str(path))[0] == 0
    with pytest.raises(ReproduceError, match=r"came from a bundle .*--trust"):
        reproduce(run_id)
    code, out = invoke("reproduce", run_id)
    assert code == 1 and "--trust" in out
    assert kiln.runs(app="victim", reproductions=True) == [kiln.get_run(run_id)]  # nothing ran


def test_signed_bundles_name_their_key_and_a_changed_one_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with kiln.App("signed").run() as run:
        kiln.log({"x": 1.0}, step=0)
    recorder.close_all()
    assert invoke("keys", "create", "lab")[0] == 0
    bundle = tmp_path / "signed.kiln"
    assert invoke("export", run.id, "-o", str(bundle), "--sign", "lab")[0] == 0
    code, out = invoke("verify", str(bundle))
    assert code == 0 and "signed by lab (" in out
    keys = json.loads(invoke("keys", "ls", "--json")[1])
    assert [(k["name"], k["private"]) for k in keys] == [("lab", True)]
    unsigned = tmp_path / "unsigned.kiln"
    assert invoke("export", run.id, "-o", str(unsigned))[0] == 0
    assert "unsigned: integrity only" in invoke("verify", str(unsigned))[1]
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "other-home"))
    code, out = invoke("import", str(unsigned), "--require-signed")
    assert code == 1 and "not signed by a known key" in out
    assert invoke("import", str(bundle), "--require-signed")[0] == 0
    # Another machine that does not know the key: signed, by a key it cannot name.
    monkeypatch.setenv("KILN_KEYS", str(tmp_path / "no-keys"))
    assert f"signed by unknown key {keys[0]['fingerprint']}" in invoke("verify", str(bundle))[1]
    # A manifest changed and re-hashed by an attacker no longer matches the signature.
    with zipfile.ZipFile(bundle) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    manifest = manifest_of(members)
    manifest["run"]["params"] = {"lr": 99}
    (tmp_path / "changed.kiln").write_bytes(forge(members, manifest=manifest))
    code, out = invoke("verify", str(tmp_path / "changed.kiln"))
    assert code == 1 and "signature does not match" in out


HOSTILE = st.sampled_from([
    "../../evil", "/abs/path", "", "a\nb", "a\x00b", "x" * 600, None, 2**70, -1, 1.5,
    [], {}, {"nested": ["deep"]}, "blobs/" + "0" * 64, "0" * 32, "f" * 64,
])  # fmt: skip
FIELDS = st.sampled_from([
    ("run", "id"), ("run", "app"), ("run", "status"), ("run", "parent_id"), ("run", "params"),
    ("run", "evil_column"), ("artifacts", 0, "run_id"), ("artifacts", 0, "name"),
    ("artifacts", 0, "sha256"), ("artifacts", 0, "size"), ("artifacts", 0, "direction"),
    ("summary", "accuracy"), ("summary", "x" * 300), ("blobs", "included"), ("files",),
    ("format",),
])  # fmt: skip


def _set(manifest: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    target: Any = manifest
    for key in path[:-1]:
        target = target[key]
    if path == ("files",):
        manifest["files"] = {str(value)[:80]: "0" * 64}
        return
    target[path[-1]] = value


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(changes=st.lists(st.tuples(FIELDS, HOSTILE), min_size=1, max_size=3))
def test_hostile_manifests_never_escape_or_corrupt(
    original: Any, tmp_path_factory: pytest.TempPathFactory, changes: list[Any]
) -> None:
    members, _ = original
    manifest = copy.deepcopy(manifest_of(members))
    for path, value in changes:
        _set(manifest, path, value)
    root = tmp_path_factory.mktemp("hostile")
    home = root / "home"
    os.environ["KILN_HOME"] = str(home)
    try:
        with kiln.App("bystander").run() as bystander:
            kiln.save("model.bin", b"bystander")
        before = kiln.get_run(bystander.id).to_dict()
        path = root / "crafted.kiln"
        path.write_bytes(forge(members, manifest=manifest))
        rec = recorder.recorder_for(Settings.from_env())
        with contextlib.suppress(KilnError):  # refused, as most must be
            import_bundle(rec.store, rec.blobs, path)
        assert kiln.get_run(bystander.id).to_dict() == before
        assert sorted(p.name for p in root.iterdir()) == ["crafted.kiln", "home"]
        assert not Path("/abs/path").exists() and not (root.parent / "evil").exists()
        assert invoke("audit", "verify")[0] == 0
    finally:
        recorder.close_all()
        os.environ["KILN_HOME"] = str(root / "unused")


def test_a_killed_export_or_import_leaves_nothing_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with kiln.App("big").run() as run:
        kiln.save("weights.bin", os.urandom(24 << 20))
    recorder.close_all()
    out = tmp_path / "bundles" / "big.kiln"
    out.parent.mkdir()
    rng = random.Random(7)
    kiln_cli = [sys.executable, "-m", "kiln"]
    for _ in range(3):
        proc = subprocess.Popen([*kiln_cli, "export", run.id, "-o", str(out)])
        time.sleep(rng.uniform(0.3, 1.5))  # where it dies, not what is asserted
        proc.kill()
        proc.wait()
        assert not out.exists() or invoke("verify", str(out))[0] == 0
    invoke("gc", "--json")  # its writer is gone: the temporary file goes at once
    assert [p.name for p in out.parent.iterdir()] in ([], ["big.kiln"])
    if not out.exists():
        assert invoke("export", run.id, "-o", str(out))[0] == 0
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "importer"))
    for _ in range(3):
        proc = subprocess.Popen([*kiln_cli, "import", str(out)], env={**os.environ})
        time.sleep(rng.uniform(0.3, 1.5))
        proc.kill()
        proc.wait()
        found = kiln.runs(app="big") if (tmp_path / "importer" / "kiln.db").exists() else []
        assert found == [] or found[0].artifact("weights.bin").size == 24 << 20
    assert invoke("import", str(out))[0] == 0
    assert invoke("audit", "verify")[0] == 0
