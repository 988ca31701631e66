"""tools/make_shards.py as a user runs it: bad input exits with status 1 and a one-line
message, never a traceback, and leaves no dataset.json behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["backend.toy.renders_per_prompt=2", "backend.toy.num_train_prompts=2", "backend.toy.num_heldout_prompts=1",
         "reference.num_steps=4", "data.num_samples=4", "data.samples_per_shard=4", "rewards=[{name: pixel_psnr}]"]


def _run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--config", str(ROOT / "conf" / "toy_depth.yaml"),
           "--no-progress", f"data.shard_dir={tmp_path / 'shards'}", *SMALL, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _bad_word_prompts(tmp_path: Path) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle on the left\na mauve circle on the left\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("make_override,message", [
    (lambda tmp: "solver.ordr=3", "unknown config key 'solver.ordr' (did you mean 'order'?); valid keys in SolverConfig: "),
    (lambda tmp: f"data.prompts={_bad_word_prompts(tmp)}",
     "prompt 1 of data.prompts='{tmp}/prompts.txt' cannot be used: unknown color 'mauve' in toy prompt "),
], ids=["bad-key", "bad-prompt"])  # (other bad input: in-process tests of the library, which raises the same errors)
@pytest.mark.slow
def test_bad_input_exits_with_one_line(tmp_path, make_override, message):
    result = _run(tmp_path, make_override(tmp_path))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("make_shards: error: " + message.format(tmp=tmp_path)), last
    assert not (tmp_path / "shards" / "dataset.json").exists()
