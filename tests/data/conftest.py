"""A tiny closed-form backend and reward behind the real protocols, and shard fixtures.

The fake backend's data distribution per prompt is one Gaussian ``N(mu_prompt, c^2 I)``, so its
epsilon prediction is exact and cheap: the reference solve is a real PF-ODE solve.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch
from tensordict import TensorDict

from consolver.backends.base import Backend, apply_guidance
from consolver.config import Config, RewardConfig, load_config
from consolver.rewards.base import Reward
from consolver.schedules import VPSchedule

PROMPTS = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square")]


class FakeBackend(Backend):
    """Latents ``[2, 4, 4]``, images ``[3, 8, 8]``; ``mu`` of a prompt from its hash."""

    name = "fake"

    def __init__(self, editing: bool = False, c: float = 0.3):
        self.schedule = VPSchedule.sd15()
        self.latent_shape, self.resolution, self.editing, self.c = (2, 4, 4), 8, editing, c

    def prompts(self, split: str) -> list[str]:
        return PROMPTS if split == "train" else PROMPTS[:2]

    def _mu(self, text: str) -> torch.Tensor:
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        return torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(seed))

    def encode(self, prompts: Sequence[str], ref_images: Optional[torch.Tensor] = None) -> TensorDict:
        mu = torch.stack([self._mu(p) for p in prompts])
        if self.editing:
            assert ref_images is not None and ref_images.shape[1:] == (3, 8, 8)
            mu = mu + ref_images.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
        return TensorDict({"mu": mu}, batch_size=[len(prompts)])

    def _eps(self, x: torch.Tensor, t, mu: torch.Tensor) -> torch.Tensor:
        a, s = (v.to(x.dtype) for v in self.schedule.alpha_sigma(int(t)))
        var = a**2 * self.c**2 + s**2
        x0 = mu + a * self.c**2 / var * (x - a * mu)
        return (x - a * x0) / s

    def predict(self, x, t, cond, guidance):
        return apply_guidance(self._eps(x, t, torch.zeros_like(cond["mu"])), self._eps(x, t, cond["mu"]), guidance)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        rgb = torch.cat([latents, latents.mean(1, keepdim=True)], dim=1)
        return torch.sigmoid(torch.nn.functional.interpolate(rgb, scale_factor=2, mode="nearest"))


class FakeReward(Reward):
    """Channel means as features ``[B, 3]`` float32; reward = minus their squared distance."""

    name = "fake_mean"

    def __init__(self):
        super().__init__()
        self.freeze()

    def features(self, target: torch.Tensor) -> torch.Tensor:
        return target.mean(dim=(2, 3))

    def score(self, preview: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        return -((preview.mean(dim=(2, 3)) - target_features) ** 2).sum(1)


def make_cfg(shard_dir: Path, *overrides: str) -> Config:
    """A test config: fake-backend-sized shards in ``shard_dir`` (8 shards x 4 samples)."""
    base = [f"data.shard_dir={shard_dir}", "data.num_samples=32", "data.samples_per_shard=4",
            "data.solve_batch_size=3", "reference.num_steps=8", "data.batch_size=4", "data.num_workers=0",
            "data.shuffle_buffer=0", "backend.resolution=8"]
    cfg = load_config(None, base + list(overrides))
    cfg.rewards = [RewardConfig(name="fake_mean")]  # type: ignore[assignment]
    return cfg


@pytest.fixture(scope="session")
def fake_shards(tmp_path_factory) -> Path:
    """32 samples in 8 shards made by ``make_shards`` with the fake backend (made once)."""
    from consolver.data import make_shards

    shard_dir = tmp_path_factory.mktemp("fake") / "shards"
    make_shards(make_cfg(shard_dir), 0, 1, backend=FakeBackend(), reward=FakeReward())
    return shard_dir


@pytest.fixture
def shard_copy(fake_shards, tmp_path) -> Path:
    """A private copy of the fake shards, free to corrupt."""
    return Path(shutil.copytree(fake_shards, tmp_path / "shards"))
