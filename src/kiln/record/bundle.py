"""Run bundles: one self-contained file with a run's whole record, portable between stores.

A bundle is a zip::

    manifest.json      the run row, its summary and artifacts, the blobs it names,
                       and the sha256 of every other file in the bundle
    manifest.sha256    the sha256 of manifest.json
    metrics.json       every metric point: [key, step, time, value]
    blobs/<sha256>     code patch, module source, environment lists, artifacts
                       (artifacts are left out with ``include_artifacts=False``)

The zip's comment (its last bytes) is ``kiln-sha256:`` and the sha256 of every byte
before it, so any change to any byte of the bundle is found by :func:`verify`,
offline; the files inside are checked one by one as well, to say which changed.
:func:`import_bundle` writes the identical record (same ids and hashes) into another
store; importing it again changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from pathlib import Path
from typing import IO, Any

from kiln._hashing import sha256_bytes
from kiln.errors import KilnError
from kiln.record.blobs import BlobStore

FORMAT = "kiln-bundle/1"
_CHUNK = 1 << 20
_SEAL = b"kiln-sha256:"
_SEAL_LEN = len(_SEAL) + 64


# What each blob a run's record points at is, as `kiln export` names one it left out.
_BLOB_NAMES = {"patch_sha256": "code patch", "source_blob": "module source",
               "packages_sha256": "package list", "lock_sha256": "environment lock"}  # fmt: skip


class BundleError(KilnError):
    """A bundle is corrupt, incomplete or conflicts with the store; the message says how."""


def export_bundle(
    store: Any, blobs: BlobStore, run_id: str, out: Path, *, include_artifacts: bool = True
) -> dict[str, Any]:
    """Write run ``run_id`` as a bundle at ``out``; return its manifest."""
    rows = store.export_rows(store.get_run(run_id).id)
    run = rows["run"]
    wanted: dict[str, str] = {}  # sha -> what it is, as the export names it
    for a in rows["artifacts"]:
        wanted.setdefault(a["sha256"], f"artifact {a['name']}")
    code, env = run.get("code") or {}, run.get("environment") or {}
    for key, owner in (("patch_sha256", code), ("source_blob", code),
                       ("packages_sha256", env), ("lock_sha256", env)):  # fmt: skip
        if owner.get(key):
            wanted[owner[key]] = _BLOB_NAMES[key]
    metrics_json = json.dumps(
        [[k, s, t, _encode(v)] for k, s, t, v in rows["metrics"]], separators=(",", ":")
    ).encode()
    files = {"metrics.json": sha256_bytes(metrics_json)}
    included, omitted, left_out = [], [], []
    with blobs.temp_beside(out) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr("metrics.json", metrics_json, compress_type=zipfile.ZIP_DEFLATED)
            for sha, why in sorted(wanted.items()):
                path = blobs.path(sha)
                skipped = why.startswith("artifact ") and not include_artifacts
                if skipped or not path.is_file():
                    omitted.append(sha)
                    reason = "--no-blobs" if skipped else "not in this store's blobs"
                    left_out.append({"sha256": sha, "what": why, "why": reason})
                    continue
                zf.write(path, f"blobs/{sha}")
                files[f"blobs/{sha}"] = sha  # a blob's name is its hash
                included.append(sha)
            manifest = {
                "format": FORMAT,
                "run": run,
                "summary": rows["summary"],
                "artifacts": rows["artifacts"],
                "blobs": {"included": included, "omitted": omitted, "left_out": left_out},
                "files": files,
            }
            manifest_bytes = json.dumps(manifest, sort_keys=True, indent=1).encode()
            zf.writestr("manifest.json", manifest_bytes, compress_type=zipfile.ZIP_DEFLATED)
            zf.writestr("manifest.sha256", sha256_bytes(manifest_bytes) + "\n")
            zf.comment = _SEAL + b"0" * 64  # replaced by the hash of everything before it
        with tmp.open("r+b") as f:
            size = f.seek(0, 2)
            digest = _sha256_prefix(f, size - _SEAL_LEN)
            f.seek(size - 64)
            f.write(digest.encode())
        tmp.replace(out)
    return manifest


def verify(path: Path) -> list[str]:
    """Every problem with the bundle at ``path`` (empty when every hash checks out)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - _SEAL_LEN))
            seal = f.read()
            if size < _SEAL_LEN or not seal.startswith(_SEAL):
                return [f"{path} has no kiln seal: it is not a bundle, or its end was changed"]
            if _sha256_prefix(f, size - _SEAL_LEN) != seal[len(_SEAL) :].decode("ascii", "replace"):
                whole = f"{path} was changed: its bytes do not match the seal"
            else:
                whole = None
    except OSError as exc:
        return [f"{path} cannot be read: {exc}"]
    problems = _verify_members(path)
    if whole:
        problems.insert(0, whole)
    return problems


def _sha256_prefix(f: IO[bytes], length: int) -> str:
    f.seek(0)
    digest = hashlib.sha256()
    left = length
    while left > 0:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def _verify_members(path: Path) -> list[str]:
    # A corrupt zip can fail in many ways (bad headers, unknown compression, flags):
    # every one of them is a finding to report, not an error to raise.
    try:
        zf = zipfile.ZipFile(path)
    except Exception as exc:
        return [f"{path} is not a readable bundle: {exc}"]
    with zf:
        problems = []
        try:
            manifest_bytes = zf.read("manifest.json")
            recorded = zf.read("manifest.sha256").decode().strip()
        except Exception as exc:
            return [f"the manifest cannot be read: {exc}"]
        if sha256_bytes(manifest_bytes) != recorded:
            return ["manifest.json does not match manifest.sha256: the manifest was changed"]
        try:
            manifest = json.loads(manifest_bytes)
        except ValueError as exc:
            return [f"the manifest is not JSON: {exc}"]
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return [f"unknown bundle format {manifest.get('format')!r} (this Kiln reads {FORMAT})"]
        listed = set(manifest["files"]) | {"manifest.json", "manifest.sha256"}
        for extra in sorted(set(zf.namelist()) - listed):
            problems.append(f"{extra} is in the bundle but not in its manifest")
        for name, sha in sorted(manifest["files"].items()):
            try:
                actual = _sha256_member(zf, name)
            except KeyError:
                problems.append(f"{name} is missing")
                continue
            except Exception as exc:
                problems.append(f"{name} cannot be read: {exc}")
                continue
            if actual != sha:
                problems.append(f"{name} does not match its sha256: it was changed")
        return problems


def import_bundle(store: Any, blobs: BlobStore, path: Path) -> tuple[str, bool]:
    """Import the bundle at ``path``; return the run id and whether anything was written."""
    problems = verify(path)
    if problems:
        raise BundleError(f"{path} is not imported: " + "; ".join(problems))
    from kiln.errors import RunNotFoundError
    from kiln.record.store.base import WriteBatch

    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        run = manifest["run"]
        try:
            existing = store.export_rows(run["id"])
        except RunNotFoundError:
            existing = None
        if existing is not None:
            if existing["run"] != run or existing["artifacts"] != manifest["artifacts"]:
                raise BundleError(
                    f"run {run['id']} is already in this store with other contents; not imported"
                )
            return run["id"], False
        for sha in manifest["blobs"]["included"]:
            with zf.open(f"blobs/{sha}") as src:
                blobs.put_stream(src, sha)
        points = json.loads(zf.read("metrics.json"))
    batch = WriteBatch(
        new_runs=[run],
        metrics=[(run["id"], k, s, t, _decode(v)) for k, s, t, v in points],
        summaries=[(run["id"], run["app"], k, _decode(v)) for k, v in manifest["summary"].items()],
        artifacts=manifest["artifacts"],
        seal=[run["id"]],
    )
    store.write(batch)
    return run["id"], True


def _sha256_member(zf: zipfile.ZipFile, name: str) -> str:
    digest = hashlib.sha256()
    with zf.open(name) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _encode(value: float | None) -> float | str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return value if math.isfinite(value) else repr(value)


def _decode(value: float | str | None) -> float:
    return float(value) if value is not None else math.nan
