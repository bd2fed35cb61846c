"""Run bundles: one self-contained file with a run's whole record, portable between stores.

A bundle is a zip::

    manifest.json      the run row, its summary and artifacts, the blobs it names,
                       and the sha256 of every other file in the bundle
    manifest.sha256    the sha256 of manifest.json
    metrics.json       every metric point: [key, step, time, value]
    logs.json          what the run printed: [time, stream, text] chunks, in order
                       (absent from bundles of runs that printed nothing)
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
import re
import secrets
import stat
import zipfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import pydantic

from kiln._hashing import sha256_bytes
from kiln.errors import KilnError, NotFoundError
from kiln.record.blobs import FileBlobStore
from kiln.record.model import RunStatus
from kiln.record.store.base import LOG_CHUNK_CHARS, LOG_STREAMS, LogRow, MetricRow, WriteBatch
from kiln.record.store.rows import ArtifactRow, RunRow
from kiln.record.values import (
    ARTIFACT_NAME_MAX,
    artifact_name,
    check_name,
    check_text,
    metric_key,
    metric_step,
)

if TYPE_CHECKING:
    from kiln.record.store.base import BlobStore, KilnStore

FORMAT = "kiln-bundle/1"
_CHUNK = 1 << 20
_SEAL = b"kiln-sha256:"
_SEAL_LEN = len(_SEAL) + 64
SIGNATURE = "signature.json"  # a signature of manifest.json's sha256 (kiln export --sign)
# A bundle is hostile input: only these members, and these sizes, are read.
_MEMBER = re.compile(
    r"manifest\.json|manifest\.sha256|metrics\.json|logs\.json|signature\.json|"
    r"blobs/[0-9a-f]{64}"
)
MAX_MANIFEST = 64 << 20
MAX_METRICS = 1 << 30
MAX_LOGS = 128 << 20  # logs.json: a run keeps 16 MiB of output (at most 3x as text), in JSON
MAX_LOG_CHUNKS = 1_000_000
_SHA = re.compile(r"[0-9a-f]{64}")
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_RUN_COLUMNS = set(RunRow.model_fields)
_Row = TypeVar("_Row", RunRow, ArtifactRow)


# What each blob a run's record points at is, as `kiln export` names one it left out.
_BLOB_NAMES = {"patch_sha256": "code patch", "source_blob": "module source",
               "packages_sha256": "package list", "lock_sha256": "environment lock"}  # fmt: skip


class BundleError(KilnError):
    """A bundle is corrupt, incomplete or conflicts with the store; the message says how."""


def export_bundle(
    store: KilnStore,
    blobs: BlobStore,
    run_id: str,
    out: Path,
    *,
    include_artifacts: bool = True,
    sign: tuple[Path, str] | None = None,
) -> dict[str, Any]:
    """Write run ``run_id`` as a bundle at ``out``; return its manifest. ``sign`` is
    (keys folder, key name): the bundle then holds that key's signature."""
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
    logs_json = json.dumps([list(r) for r in rows.get("logs", [])]).encode()
    if rows.get("logs"):
        files["logs.json"] = sha256_bytes(logs_json)
    included, omitted, left_out = [], [], []
    with _temp_beside(blobs, out) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr("metrics.json", metrics_json, compress_type=zipfile.ZIP_DEFLATED)
            if "logs.json" in files:
                zf.writestr("logs.json", logs_json, compress_type=zipfile.ZIP_DEFLATED)
            for sha, why in sorted(wanted.items()):
                skipped = why.startswith("artifact ") and not include_artifacts
                path = None if skipped else _local(blobs, sha)
                if path is None:
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
            if sign is not None:
                from kiln.record import signing

                signature = signing.sign(*sign, sha256_bytes(manifest_bytes).encode())
                zf.writestr(SIGNATURE, json.dumps(signature))
            zf.comment = _SEAL + b"0" * 64  # replaced by the hash of everything before it
        with tmp.open("r+b") as f:
            size = f.seek(0, 2)
            digest = _sha256_prefix(f, size - _SEAL_LEN)
            f.seek(size - 64)
            f.write(digest.encode())
        tmp.replace(out)
    return manifest


@dataclass
class Checked:
    """What :func:`check` found: the problems (none if every hash matches), the
    manifest (if it could be read) and who signed the bundle."""

    problems: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    signer: str | None = None  # the fingerprint of a valid signature's key
    signed_by: str = "unsigned: integrity only"  # in words, with the key's name if known
    known_signer: bool = False  # signed by a key in the keys folder


def verify(path: Path) -> list[str]:
    """Every problem with the bundle at ``path`` (empty when every hash checks out)."""
    return check(path).problems


def check(path: Path, keys: Path | None = None) -> Checked:
    """Check every byte of the bundle at ``path``, offline, as hostile input: its seal,
    its member names and sizes, its manifest, every file against the manifest and
    every blob against its name, and its signature (named from the keys in ``keys``)."""
    out = Checked()
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - _SEAL_LEN))
            seal = f.read()
            if size < _SEAL_LEN or not seal.startswith(_SEAL):
                out.problems.append(
                    f"{path} has no kiln seal: it is not a bundle, or its end was changed"
                )
                return out
            if _sha256_prefix(f, size - _SEAL_LEN) != seal[len(_SEAL) :].decode("ascii", "replace"):
                out.problems.append(f"{path} was changed: its bytes do not match the seal")
    except OSError as exc:
        out.problems.append(f"{path} cannot be read: {exc.strerror or exc}")
        return out
    # A corrupt or crafted zip can fail in many ways (bad headers, unknown compression,
    # flags): every one of them is a finding to report, not an error to raise.
    try:
        with zipfile.ZipFile(path) as zf:
            _check_members(zf, out, keys)
    except Exception as exc:
        out.problems.append(f"{path} is not a readable bundle: {str(exc)[:200]}")
    return out


def _check_members(zf: zipfile.ZipFile, out: Checked, keys: Path | None) -> None:
    infos = zf.infolist()
    names = [i.filename for i in infos]
    out.problems += [
        f"member {n[:100]!r} is not one a bundle holds" for n in names if not _MEMBER.fullmatch(n)
    ][:10]
    if len(set(names)) != len(names):
        out.problems.append("the bundle holds a member twice")
    out.problems += [
        f"member {i.filename[:100]!r} is a folder or a link"
        for i in infos
        if i.is_dir() or stat.S_ISLNK(i.external_attr >> 16)
    ]
    if out.problems:
        return
    try:
        manifest_bytes = _read(zf, "manifest.json", MAX_MANIFEST)
        recorded = _read(zf, "manifest.sha256", 128).decode("ascii", "replace").strip()
    except (KeyError, ValueError) as exc:
        out.problems.append(f"the manifest cannot be read: {exc}")
        return
    digest = sha256_bytes(manifest_bytes)
    if digest != recorded:
        out.problems.append("manifest.json does not match manifest.sha256: it was changed")
        return
    try:
        out.manifest = _manifest(json.loads(manifest_bytes))
    except (ValueError, RecursionError) as exc:
        out.problems.append(f"the manifest is not valid: {str(exc)[:200]}")
        return
    files = out.manifest["files"]
    listed = {*files, "manifest.json", "manifest.sha256", SIGNATURE}
    out.problems += [
        f"{n} is in the bundle but not in its manifest" for n in names if n not in listed
    ]
    for name, sha in sorted(files.items()):
        if name.startswith("blobs/") and name != f"blobs/{sha}":
            out.problems.append(f"{name} is listed with another sha256 than its name")
        elif name not in names:
            out.problems.append(f"{name} is missing")
        elif _sha256_member(zf, name) != sha:
            out.problems.append(f"{name} does not match its sha256: it was changed")
    if SIGNATURE in names:
        _check_signature(zf, digest, out, keys)


def _check_signature(zf: zipfile.ZipFile, digest: str, out: Checked, keys: Path | None) -> None:
    from kiln.record import signing

    try:
        signature = json.loads(_read(zf, SIGNATURE, 4096))
        out.signer = signing.check_signature(signature, digest.encode())
    except ValueError as exc:
        out.problems.append(f"{SIGNATURE}: {exc}")
        return
    known = {k.fingerprint: k.name for k in signing.list_keys(keys)} if keys else {}
    name = known.get(out.signer)
    out.known_signer = name is not None
    out.signed_by = (
        f"signed by {name} ({out.signer})" if name else f"signed by unknown key {out.signer}"
    )


def _read(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A member's bytes, refused past ``limit`` whatever its header claims."""
    with zf.open(name) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{name} is larger than {limit:,} bytes")
    return data


def _manifest(data: Any) -> dict[str, Any]:
    """The manifest, its shape checked (its rows are checked again on import)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        what = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"unknown bundle format {str(what)[:40]!r} (this Kiln reads {FORMAT})")
    for key, kind in (("run", dict), ("summary", dict), ("artifacts", list), ("blobs", dict),
                      ("files", dict)):  # fmt: skip
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{key!r} is not a {kind.__name__}")
    for name, sha in data["files"].items():
        if not (isinstance(sha, str) and _SHA.fullmatch(sha) and _MEMBER.fullmatch(name)):
            raise ValueError(f"files: {str(name)[:100]!r} is not a member with a sha256")
        if name in ("manifest.json", "manifest.sha256", SIGNATURE):
            raise ValueError(f"files: {name} cannot be listed")
    included = data["blobs"].get("included")
    if not isinstance(included, list) or any(
        not isinstance(s, str) or f"blobs/{s}" not in data["files"] for s in included
    ):
        raise ValueError("blobs: an included blob is not among the files")
    omitted = data["blobs"].get("omitted", [])
    if not isinstance(omitted, list) or any(
        not isinstance(s, str) or not _SHA.fullmatch(s) for s in omitted
    ):
        raise ValueError("blobs: omitted is not a list of sha256 digests")
    return data


def _check_blobs_accounted(manifest: dict[str, Any], rows: WriteBatch) -> None:
    """Every blob the rows name is in the bundle or declared left out: a manifest that
    drops one silently would import a run whose bytes are lost without a word."""
    run = rows.new_runs[0]
    code, env = run.code or {}, run.environment or {}
    named = {a["sha256"] for a in manifest["artifacts"] if a.get("direction") == "out"}
    named |= {owner[key] for key, owner in (("patch_sha256", code), ("source_blob", code),
              ("packages_sha256", env), ("lock_sha256", env)) if owner.get(key)}  # fmt: skip
    blobs = manifest["blobs"]
    missing = named - set(blobs["included"]) - set(blobs.get("omitted", []))
    if missing:
        raise ValueError(f"blob {min(missing)} is named but neither included nor left out")


def import_bundle(
    store: KilnStore,
    blobs: BlobStore,
    path: Path,
    *,
    keys: Path | None = None,
    require_signed: bool = False,
) -> tuple[str, bool]:
    """Import the bundle at ``path``; return the run id and whether anything was written.

    Refused, with nothing written, unless every check of :func:`check` passes (and,
    with ``require_signed``, a key in ``keys`` signed it) and every row is the
    bundle's own run's, each value as Kiln would have recorded it. The run is recorded
    as imported (``run.import``, by this store's actor; the bundle's author is kept
    as claimed), and ``kiln reproduce`` will not run its code unless trusted.
    """
    checked = check(path, keys)
    if not checked.problems and require_signed and not checked.known_signer:
        checked.problems.append(f"it is not signed by a known key ({checked.signed_by})")
    if checked.problems or checked.manifest is None:
        raise BundleError(f"{path} is not imported: " + "; ".join(checked.problems))
    manifest = checked.manifest
    from kiln.errors import RunNotFoundError

    with zipfile.ZipFile(path) as zf:
        try:
            rows = _rows(manifest, json.loads(_read(zf, "metrics.json", MAX_METRICS)))
            if "logs.json" in manifest["files"]:
                rows.logs = _logs(rows.new_runs[0].id, json.loads(_read(zf, "logs.json", MAX_LOGS)))
            _check_blobs_accounted(manifest, rows)
        except (KeyError, ValueError, TypeError, RecursionError, OverflowError) as exc:
            raise BundleError(f"{path} is not imported: {str(exc)[:300]}") from None
        run_id = rows.new_runs[0].id
        try:
            existing = store.export_rows(run_id)
        except RunNotFoundError:
            existing = None
        if existing is not None:
            if existing["run"] != manifest["run"] or existing["artifacts"] != manifest["artifacts"]:
                raise BundleError(
                    f"run {run_id} is already in this store with other contents; not imported"
                )
            return run_id, False
        for sha in manifest["blobs"]["included"]:
            with zf.open(f"blobs/{sha}") as src:
                blobs.put_stream(src, sha)  # hashed again as it is stored
    rows.origin = {
        "bundle_sha256": _seal_of(path),
        "signed_by": checked.signer,
        "claimed_actor": manifest["run"].get("actor"),
        "omitted": manifest["blobs"].get("omitted", []),  # audit verify expects these absent
    }
    store.write(rows)
    return run_id, True


def _local(blobs: BlobStore, sha: str) -> Path | None:
    """A local file with the blob's bytes (downloaded, from a server); None if missing."""
    try:
        return blobs.fetch(sha)
    except NotFoundError:
        return None


def _temp_beside(blobs: BlobStore, out: Path) -> AbstractContextManager[Path]:
    """A temporary file next to ``out``; noted for ``kiln gc`` where the blobs are local."""
    if isinstance(blobs, FileBlobStore):
        return blobs.temp_beside(out)
    return _plain_temp(out)


@contextmanager
def _plain_temp(out: Path) -> Iterator[Path]:
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(8)}.tmp")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _seal_of(path: Path) -> str:
    with path.open("rb") as f:
        f.seek(-64, 2)
        return f.read().decode("ascii")


def _rows(manifest: dict[str, Any], points: Any) -> WriteBatch:
    """The bundle's rows as a batch, each checked: rows of its own run only, ids and
    names as Kiln makes them, numbers where numbers belong."""
    run = manifest["run"]
    run_id = run.get("id")
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"run id {str(run_id)[:40]!r} is not one Kiln makes (32 hex digits)")
    unknown = set(run) - _RUN_COLUMNS
    if unknown:
        raise ValueError(f"the run has fields no run has: {', '.join(sorted(unknown))[:200]}")
    check_name("run.app", run.get("app"))
    if run.get("status") not in {str(s) for s in RunStatus}:
        raise ValueError(f"run.status {str(run.get('status'))[:40]!r} is not a run status")
    parent = run.get("parent_id")
    if parent is not None and not (isinstance(parent, str) and _RUN_ID.fullmatch(parent)):
        raise ValueError("run.parent_id is not a run id")
    for art in manifest["artifacts"]:
        _check_artifact(art, run_id)
    if not isinstance(points, list):
        raise ValueError("metrics.json is not a list of points")
    metrics: list[MetricRow] = []
    for key, step, at, value in points:
        if not isinstance(at, int | float):
            raise ValueError(f"metric {str(key)[:100]!r}: its time is not a number")
        metrics.append((run_id, metric_key(key), metric_step(step), float(at), _decode(value)))
    summaries = [
        (run_id, run["app"], metric_key(k), _decode(v)) for k, v in manifest["summary"].items()
    ]
    return WriteBatch(
        new_runs=[_typed(RunRow, run, "run")], metrics=metrics, summaries=summaries,
        artifacts=[_typed(ArtifactRow, a, "artifact") for a in manifest["artifacts"]],
        seal=[run_id],
    )  # fmt: skip


def _logs(run_id: str, chunks: Any) -> list[LogRow]:
    """The bundle's log chunks as rows, each checked as the capture would write it."""
    if not isinstance(chunks, list) or len(chunks) > MAX_LOG_CHUNKS:
        raise ValueError(f"logs.json is not a list of at most {MAX_LOG_CHUNKS:,} chunks")
    rows: list[LogRow] = []
    for i, chunk in enumerate(chunks):
        if not (isinstance(chunk, list) and len(chunk) == 3):
            raise ValueError(f"logs.json: chunk {i} is not [time, stream, text]")
        at, stream, text = chunk
        if not isinstance(at, float | int) or isinstance(at, bool) or not -1e12 < at < 1e12:
            raise ValueError(f"logs.json: chunk {i}'s time is not a time (Unix seconds)")
        if stream not in LOG_STREAMS:
            raise ValueError(f"logs.json: chunk {i}'s stream is not one of {LOG_STREAMS}")
        if (
            not isinstance(text, str)
            or len(text) > LOG_CHUNK_CHARS
            or "\x00" in text
            or (not text.isascii() and _not_utf8(text))
        ):
            raise ValueError(f"logs.json: chunk {i}'s text is not UTF-8 text of at most "
                             f"{LOG_CHUNK_CHARS:,} characters without NUL")  # fmt: skip
        rows.append((run_id, float(at), stream, text))
    return rows


def _not_utf8(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (no store can keep it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _typed(model: type[_Row], data: dict[str, Any], what: str) -> _Row:
    """``data`` as a row, or a ValueError naming the first field that is not valid."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise ValueError(f"{what}.{where}: {first['msg']}") from None


def _check_artifact(art: Any, run_id: str) -> None:
    if not isinstance(art, dict) or art.get("run_id") != run_id:
        raise ValueError("an artifact row names another run than the bundle's")
    if art.get("direction") == "out":
        name = artifact_name(art.get("name"))
    else:  # an input's name is where it was read: a dataset's path, say
        name = check_text("name", art.get("name"), max_len=ARTIFACT_NAME_MAX, what="input name")
    if art.get("direction") not in ("in", "out") or not _SHA.fullmatch(str(art.get("sha256"))):
        raise ValueError(f"artifact {name[:100]!r}: its direction or sha256 is not valid")
    if type(art.get("size")) is not int or art["size"] < 0 or not isinstance(art.get("kind"), str):
        raise ValueError(f"artifact {name[:100]!r}: its size or kind is not valid")
    if set(art) - {"run_id", "name", "direction", "kind", "sha256", "size", "uri"}:
        raise ValueError(f"artifact {name[:100]!r} has fields no artifact has")


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
