"""What ``python tools/fit.py`` prints: progress, results and warnings to act on, nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Lines other libraries print that a user cannot act on (each seen before the console was fixed).
NOISE = ("GPU available", "TPU available", "litlogger", "val_dataloader", "_pytree", "LeafSpec", "weights_only",
         "ModelCheckpoint", "fontManager", "accelerate", "Detected KeyboardInterrupt", "max_steps=", "Epoch ",
         "INFO:", "FutureWarning", "UserWarning")


@pytest.mark.slow
def test_fit_console_shows_progress_results_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "fit.py"), f"data.shard_dir={ROOT / 'data' / 'toy_shards'}",
         "data.batch_size=4", "data.shuffle_buffer=8", "algo.group_size=4", "trainer.max_steps=3",
         "trainer.eval_every=3", "trainer.eval_num_noises=1", "trainer.image_every=2", "trainer.checkpoint_every=2",
         f"output_dir={out}"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    noisy = [line for line in console.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, noisy
    assert "fit: 100%" in proc.stderr and "3/3" in proc.stderr  # iterations out of max_steps
    assert "held-out eval at iteration 3" in console
    assert f"solver exported to {out / 'scheduler'}" in proc.stdout
    lines = [line for line in console.replace("\r", "\n").splitlines() if line.strip()]
    assert len(set(lines)) == len([line for line in lines if not line.startswith("fit:")]) + len(
        {line for line in lines if line.startswith("fit:")})  # no message printed twice
