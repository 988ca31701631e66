"""Shared pieces of the training tests: a small config on the shipped tiny shards and a cached
toy runtime (backend + reward), so each test builds them once."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from consolver.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_SHARDS = ROOT / "data" / "toy_shards"


def tiny_config(tmp_path, *overrides: str):
    """conf/toy_depth.yaml on data/toy_shards: 4 samples x 4 rollouts per batch, quiet trainer, no
    validation gate at export (tests/evaluation/test_gate.py and test_train.py test it)."""
    return load_config(ROOT / "conf" / "toy_depth.yaml", [
        f"data.shard_dir={TINY_SHARDS}", "data.batch_size=4", "data.shuffle_buffer=8", "algo.group_size=4",
        "trainer.eval_every=0", "trainer.image_every=0", "trainer.checkpoint_every=1000", "trainer.log_every_n_steps=1000",
        "trainer.progress_bar=false", "trainer.num_threads=0", "validation.gate=off", f"output_dir={tmp_path}",
        *overrides])


@lru_cache(maxsize=None)
def toy_runtime():
    """``{"backend", "reward"}`` of conf/toy_depth.yaml (toy_depth reward), built once."""
    from consolver.backends import build_backend
    from consolver.rewards import build_rewards

    cfg = load_config(ROOT / "conf" / "toy_depth.yaml")
    return {"backend": build_backend(cfg.backend), "reward": build_rewards(cfg.rewards)}


def runtime():
    return dict(toy_runtime())


def sample_batch(cfg, n: int, seed: int = 0):
    """A loader-like batch of ``n`` train samples with fresh noise and 8-step DDIM "targets"
    (the tests need shapes and features, not real targets)."""
    from consolver.data.writer import make_noise
    from consolver.sampling import make_scheduler, sample

    rt = toy_runtime()
    backend, reward = rt["backend"], rt["reward"]
    prompts = (backend.prompts("train") * n)[:n]
    noise = make_noise(range(seed, seed + n), backend.latent_shape)
    cond = backend.encode(prompts)
    target = sample(backend, make_scheduler("ddim", backend.schedule), noise, cond, cfg.guidance, 8)
    return {"prompt": prompts, "noise": noise, "target_latent": target,
            "features": {"toy_depth": reward.features(backend.decode(target))}}


def predict_counter(backend):
    """Wrap ``backend.predict`` to count calls; returns the list of timesteps seen."""
    calls = []
    original = backend.predict

    def counted(x, t, cond, guidance):
        calls.append(float(torch.as_tensor(t).reshape(-1)[0]))
        return original(x, t, cond, guidance)

    backend.predict = counted
    return calls, lambda: setattr(backend, "predict", original)


def mode_preview(module, cfg, num_steps: int, n: int = 6, seed: int = 100):
    """``(batch, env)``: the training module's mode rollout (its training-time preview) on a
    :func:`sample_batch`; the final latents are ``env.final_latents``."""
    batch = sample_batch(cfg, n, seed=seed)
    _, env = module.rollout(module.reset_input(batch, num_steps), num_steps, deterministic=True)
    return batch, env
