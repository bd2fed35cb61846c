"""``kiln export`` of a run with 100,000 metric points and 100 MB of artifacts.

Baseline: ``tar -cf`` of the same blob files, in the same run. Goal: under 3 s.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import kiln
from kiln.config import Settings
from kiln.record import recorder
from kiln.record.bundle import export_bundle, verify

from _common import Row, emit

POINTS = 100_000
ARTIFACTS = 10  # of 10 MB each


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        settings = Settings.from_env({"KILN_HOME": str(base / "home")})
        with kiln.App("bench-bundle", settings=settings).run() as run:
            for step in range(POINTS // 4):
                kiln.log({"a": step, "b": 1.0, "c": 2.0, "d": 3.0}, step=step)
            for i in range(ARTIFACTS):
                kiln.save(f"shard-{i}.bin", os.urandom(10 << 20))
        recorder.close_all()
        rec = recorder.recorder_for(settings)
        out = base / "run.kiln"
        t = time.perf_counter()
        export_bundle(rec.store, rec.blobs, run.id, out)
        kiln_s = time.perf_counter() - t
        assert verify(out) == []
        blob_files = [
            str(rec.blobs.path(a.sha256)) for a in kiln.get_run(run.id, settings=settings).artifacts
        ]
        t = time.perf_counter()
        subprocess.run(["tar", "-cf", str(base / "blobs.tar"), *blob_files], check=True,
                       stderr=subprocess.DEVNULL)  # fmt: skip
        tar_s = time.perf_counter() - t
        recorder.close_all()
    emit(
        [
            Row(
                "bundle",
                "kiln export: 100k points + 100 MB artifacts (s)",
                kiln_s,
                tar_s,
                "tar -cf of the same blobs",
                "s",
                "< 3 s",
                kiln_s < 3,
            )
        ]
    )


if __name__ == "__main__":
    main()
