"""CLIP reward (``clip``): cosine similarity of CLIP image embeddings, ``(cos + 1) * 50``.

Network: transformers CLIP vision tower with its projection (``CLIPVisionModelWithProjection``),
by default ``openai/clip-vit-large-patch14``. A full ``CLIPModel`` checkpoint loads only its
vision tower and projection; a built ``CLIPModel`` or ``CLIPVisionModelWithProjection`` object
is accepted as is.

    reward = ClipReward()                                    # [B] in [0, 100]
    feats = reward.features(target)                          # [B, D] unit-norm, cacheable
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from consolver.rewards.base import register_reward
from consolver.rewards.hf import CLIP_MEAN, CLIP_STD, EmbeddingReward, check_loading_info, load_pretrained


def _load_clip_vision(source: str, reward: str, **kwargs: Any) -> nn.Module:
    from transformers import AutoConfig, CLIPVisionModelWithProjection

    config = AutoConfig.from_pretrained(source, **kwargs)
    if hasattr(config, "vision_config"):  # a full CLIPModel checkpoint: keep its projection size
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        config = vision
    model, info = CLIPVisionModelWithProjection.from_pretrained(source, config=config, output_loading_info=True,
                                                                use_safetensors=True, **kwargs)
    check_loading_info(model, info, source, reward)
    return model


@register_reward("clip")
class ClipReward(EmbeddingReward):
    """``(cos + 1) * 50`` of CLIP image embeddings; ``[B]`` in [0, 100].

    Args:
        model: hub id, local directory, or a built ``CLIPModel`` / ``CLIPVisionModelWithProjection``.
            Default: ``openai/clip-vit-large-patch14``.
        dtype: autocast dtype for the network: ``None``/``float32``, ``float16``, ``bfloat16``.
        processor: image-processor config keys overriding the checkpoint's.
    """

    default_model = "openai/clip-vit-large-patch14"
    processor_defaults = {
        "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
        "resample": 3, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
    }

    def load_model(self, source: str) -> nn.Module:
        return load_pretrained(lambda src, **kw: _load_clip_vision(src, self.name, **kw), source, self.name)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings ``[B, D]`` (not normalised)."""
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=pixel_values)
            return out if torch.is_tensor(out) else out.pooler_output
        return self.model(pixel_values=pixel_values).image_embeds


__all__ = ["ClipReward"]
