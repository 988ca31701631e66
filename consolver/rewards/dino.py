"""DINOv2 reward (``dino``): cosine similarity of DINOv2 CLS tokens, ``(cos + 1) * 50``.

Network: a transformers ViT-style backbone (``AutoModel``; by default ``facebook/dinov2-base``);
the embedding is the CLS token of the final (layer-normed) hidden states,
``last_hidden_state[:, 0]``. The reward of the paper's FLUX.1-Kontext runs.

    reward = DinoReward()                                    # [B] in [0, 100]
    feats = reward.features(target)                          # [B, D] unit-norm, cacheable
"""

from __future__ import annotations

import torch
from torch import nn

from consolver.rewards.base import register_reward
from consolver.rewards.hf import IMAGENET_MEAN, IMAGENET_STD, EmbeddingReward, load_transformers


@register_reward("dino")
class DinoReward(EmbeddingReward):
    """``(cos + 1) * 50`` of DINOv2 CLS tokens; ``[B]`` in [0, 100].

    Args:
        model: hub id, local directory, or a built backbone whose output has
            ``last_hidden_state`` ``[B, 1 + N, D]``. Default: ``facebook/dinov2-base``.
        dtype: autocast dtype for the network: ``None``/``float32``, ``float16``, ``bfloat16``.
        processor: image-processor config keys overriding the checkpoint's.
    """

    default_model = "facebook/dinov2-base"
    processor_defaults = {
        "size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
        "resample": 3, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
    }

    def load_model(self, source: str) -> nn.Module:
        from transformers import AutoModel

        return load_transformers(AutoModel, source, self.name)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLS tokens ``[B, D]`` (not normalised)."""
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


__all__ = ["DinoReward"]
