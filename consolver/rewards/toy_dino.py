"""``toy_dino``: a DINO-like feature reward for the toy worlds, with no downloads.

A fixed, seeded random network stands in for DINOv2 where its weights are absent: a 4x4
patch embedding (a ViT's stem) followed by a 1x1 mixing layer, both random (He-initialised from
a fixed generator, so every machine builds the same weights), with GELU. The embedding of an
image is its patch tokens ``[C, h, w]``, centred per channel over the patches and flattened: it
compares *where* which colours and edges are, much as DINO patch features do, and is blind to a
global brightness offset. Score: ``(cos + 1) * 50`` in [0, 100], as the ``dino`` reward.

    reward = ToyDinoReward()                 # [B] in [0, 100]
    feats = reward.features(target)          # [B, F] unit-norm float32, cacheable in shards
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from consolver.rewards.base import Reward, register_reward


@register_reward("toy_dino")
class ToyDinoReward(Reward):
    """``(cos + 1) * 50`` of fixed random patch features; ``[B]`` in [0, 100].

    Args:
        resolution: images are resized (area) to this side first (32).
        patch: patch size of the stem (4: 8x8 tokens at 32 px).
        width: channels of the stem and of the output tokens.
        seed: the weights' generator seed.
    """

    def __init__(self, resolution: int = 32, patch: int = 4, width: int = 64, seed: int = 0):
        super().__init__()
        if resolution % patch:
            raise ValueError(f"toy_dino: resolution {resolution} must be a multiple of patch {patch}")
        g = torch.Generator().manual_seed(int(seed))
        self.resolution, self.patch = int(resolution), int(patch)
        self.register_buffer("stem", torch.randn(width, 3, patch, patch, generator=g) * (2.0 / (3 * patch * patch)) ** 0.5)
        self.register_buffer("mix", torch.randn(width, width, 1, 1, generator=g) * (2.0 / width) ** 0.5)
        self.freeze()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm features ``[B, width * (r / patch)^2]`` float32 of images ``[B, 3, H, W]`` in [0, 1]."""
        x = images.float()
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="area")
        x = F.gelu(F.conv2d((x - 0.5) / 0.25, self.stem.float(), stride=self.patch))
        x = F.conv2d(x, self.mix.float())
        x = x - x.mean(dim=(2, 3), keepdim=True)
        return F.normalize(x.flatten(1), dim=1)

    def features(self, target: torch.Tensor) -> torch.Tensor:
        return self.embed(target)

    def score(self, preview: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        cos = (self.embed(preview) * target_features.to(preview.device).float()).sum(1)
        return (cos + 1) * 50


__all__ = ["ToyDinoReward"]
