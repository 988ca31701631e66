"""End to end with the real toy backend: the CLI, a hard-killed run that resumes, and the tiny
shards shipped in data/toy_shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from consolver.backends.toy import ToyBackend
from consolver.config import load_config
from consolver.data import ShardDataModule, load_prompts, make_noise, sample_seed
from consolver.data.writer import fingerprint
from consolver.rewards import build_rewards

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "conf" / "toy_shards_tiny.yaml"
FAST = ["reference.num_steps=8", "data.num_samples=12", "data.samples_per_shard=4", "data.solve_batch_size=4",
        "rewards=[{name: pixel_psnr}]", "backend.toy.renders_per_prompt=4", "backend.toy.num_train_prompts=3",
        "backend.toy.num_heldout_prompts=1"]  # a small toy world: the default one takes seconds to render


def _cli(shard_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--config", str(TINY), "--no-progress",
            f"data.shard_dir={shard_dir}", *FAST, *extra]


def _shard_bytes(shard_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(shard_dir.glob("shard-*"))}


@pytest.mark.slow
def test_killed_make_shards_resumes_to_the_uninterrupted_result(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_cli(tmp_path / "killed"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    partial = tmp_path / "killed" / "shard-000001.tar.partial"
    deadline = time.monotonic() + 120
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # no cleanup runs: shard 0 is complete, shard 1 half-written
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert (tmp_path / "killed" / "shard-000000.tar").is_file()
    assert not (tmp_path / "killed" / "shard-000001.tar").exists()
    # resume in-process (same code path as the CLI), then an uninterrupted run for comparison
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from make_shards import main
    finally:
        sys.path.remove(str(ROOT / "tools"))
    resumed = main(_cli(tmp_path / "killed")[2:])
    assert resumed["made"] == [1, 2] and resumed["skipped"] == 1
    assert not partial.exists()
    main(_cli(tmp_path / "clean")[2:])
    assert _shard_bytes(tmp_path / "killed") == _shard_bytes(tmp_path / "clean")
    # torchrun-style split: two ranks make disjoint shard sets giving the same bytes
    for rank in ("0", "1"):
        main(_cli(tmp_path / "ranks", "--rank", rank, "--world-size", "2")[2:])
    assert _shard_bytes(tmp_path / "ranks") == _shard_bytes(tmp_path / "clean")


def _tiny_cfg():
    return load_config(TINY, [f"data.shard_dir={ROOT / 'data' / 'toy_shards'}"])


@pytest.mark.slow
def test_shipped_tiny_toy_shards_are_what_their_config_makes(tmp_path):
    shard_dir = ROOT / "data" / "toy_shards"
    assert sum(p.stat().st_size for p in shard_dir.iterdir()) <= 2_000_000
    cfg = _tiny_cfg()
    backend = ToyBackend.from_config(cfg.backend)
    manifest = json.loads((shard_dir / "dataset.json").read_text())["fingerprint"]
    assert manifest == fingerprint(cfg, backend, load_prompts(cfg.data, backend), build_rewards(cfg.rewards)), (
        "data/toy_shards are stale (toy backend, reward weights or config changed): delete them and run "
        "python tools/make_shards.py --config conf/toy_shards_tiny.yaml")
    dm = ShardDataModule(cfg, backend=backend)
    dm.setup()
    batches = list(dm.train_dataloader())
    keys = sorted(k for b in batches for k in b["key"])
    assert keys == [f"{i:010d}" for i in range(32)] and dm.stats == {"skipped_samples": 0, "shard_errors": 0}
    batch = batches[0]
    assert batch["noise"].shape == batch["target_latent"].shape == (8, 3, 32, 32)
    assert set(batch["features"]) == {"toy_depth", "toy_seg", "pixel_psnr"}
    seeds = [sample_seed(cfg.data.seed, int(i)) for i in batch["index"]]
    assert batch["noise_seed"].tolist() == seeds
    torch.testing.assert_close(batch["noise"], make_noise(seeds, backend.latent_shape), rtol=0, atol=1e-6)
    train = backend.prompts("train")
    assert batch["prompt"] == [train[int(i) % len(train)] for i in batch["index"]]
    # regenerate shard 0 here: same samples (float results may differ in the last bits across CPUs)
    from consolver.data import ShardStream, StreamSpec, make_shards

    make_shards(load_config(TINY, [f"data.shard_dir={tmp_path}", "data.num_samples=8"]), backend=backend)
    spec = dict(expected_meta=backend.meta(), batch_size=8, shard_shuffle=False, load_target_image=True)
    new = next(iter(ShardStream(StreamSpec(urls=[str(tmp_path / "shard-000000.tar")], **spec))))
    old = next(iter(ShardStream(StreamSpec(urls=[str(shard_dir / "shard-000000.tar")], **spec))))
    assert new["key"] == old["key"] and new["prompt"] == old["prompt"]
    for name in ("noise", "target_latent"):
        torch.testing.assert_close(new[name], old[name], rtol=0, atol=1e-4)
    assert (new["target_image"].int() - old["target_image"].int()).abs().max() <= 1
