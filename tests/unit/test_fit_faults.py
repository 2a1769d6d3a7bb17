"""A fit killed with SIGKILL at any point resumes to the very same artifact, byte for byte, and leaves no temporary file.

Each run is its own process (tests/fit_job.py on a tiny model); the test kills it inside a chosen
stage (extraction, search and training, the artifact write) and at seeded random moments, resumes,
and compares every file of the artifact with an uninterrupted fit's.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.test_fit import write_log

ROOT = Path(__file__).resolve().parents[2]
ARTIFACT_FILES = ("config.json", "router.safetensors", "README.md")


def start(log: Path, out: Path, cache: Path, stage: Path, slow: str | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "tests.fit_job", str(log), str(out), str(cache), str(stage)] + ([slow] if slow else [])
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(process: subprocess.Popen, stage: Path, wanted: str | None, after: float | None = None) -> bool:
    """SIGKILL ``process`` once it reports ``wanted`` (or after ``after`` seconds); False if it finished first."""
    started = time.monotonic()
    while process.poll() is None:
        reached = wanted is not None and stage.is_file() and stage.read_text() == wanted
        if reached or (after is not None and time.monotonic() - started >= after):
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.005)
    return False


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted fit, and how long one takes."""
    folder = tmp_path_factory.mktemp("reference")
    log = write_log(folder / "log.jsonl", count=24)
    begun = time.monotonic()
    finish(start(log, folder / "router", folder / "cache", folder / "stage"))
    return log, folder / "router", time.monotonic() - begun


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".lock")]


def test_killed_anywhere_the_fit_resumes_to_the_same_artifact(reference, tmp_path):
    log, expected, duration = reference
    out, cache, stage = tmp_path / "router", tmp_path / "cache", tmp_path / "stage"
    killed_in = []
    for wanted, slow in (("extract", "extract"), ("search + train", "search + train"), ("write", "write")):
        stage.unlink(missing_ok=True)
        if kill_when(start(log, out, cache, stage, slow), stage, wanted):
            killed_in.append(wanted)
    rng = random.Random(0)
    for _ in range(3):  # and at random moments of a whole run
        stage.unlink(missing_ok=True)
        if kill_when(start(log, out, cache, stage), stage, None, after=rng.uniform(0.2, duration)):
            killed_in.append("random")
    assert killed_in[:3] == ["extract", "search + train", "write"], killed_in  # each stage was hit
    finish(start(log, out, cache, stage))
    for name in ARTIFACT_FILES:
        assert (out / name).read_bytes() == (expected / name).read_bytes(), name
    assert leftovers(tmp_path) == []
