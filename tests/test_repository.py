"""The repository itself: nothing large in git outside ``data/`` (no wheels, no outputs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 1_000_000


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_outside_data_is_larger_than_1_mb():
    files = tracked_files()
    assert any(f.name == "setup.py" for f in files)  # the listing really is the repository's
    large = [f"{f.relative_to(ROOT)} ({f.stat().st_size / 1e6:.1f} MB)" for f in files
             if f.is_file() and f.relative_to(ROOT).parts[0] != "data" and f.stat().st_size > MAX_BYTES]
    assert not large, f"large files tracked outside data/: {large}"


def test_wheels_and_checkpoints_are_ignored():
    ignored = subprocess.run(["git", "check-ignore", "x.whl", "outputs/a/last.ckpt", "b.ckpt"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert ignored == ["x.whl", "outputs/a/last.ckpt", "b.ckpt"]
