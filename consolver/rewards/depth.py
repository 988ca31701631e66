"""Depth reward (``depth``): PSNR between min-max normalised depth maps of preview and target.

The paper's most robust reward. Network: a transformers depth-estimation model
(``AutoModelForDepthEstimation``), by default Depth-Anything-V2-Small. Scale as in the paper's
code: ``PSNR = 10 log10(1 / MSE)`` of the two maps, each min-max normalised to [0, 1] per
image, clamped at >= 0 (and at most 100 dB, for identical maps).

    reward = DepthReward()                                   # hub id (default) or local dir
    reward = DepthReward(model="/models/depth-anything-small", dtype="bfloat16")
    reward = DepthReward(model=my_depth_module)              # an already built nn.Module
    feats = reward.features(target)                          # [B, h, w] in [0, 1], cacheable
    r = reward.score(preview, feats)                         # [B] in [0, 100]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from consolver.rewards.base import register_reward
from consolver.rewards.hf import IMAGENET_MEAN, IMAGENET_STD, PretrainedReward, load_transformers
from consolver.rewards.pixel import minmax_normalize, normalized_map_psnr


@register_reward("depth")
class DepthReward(PretrainedReward):
    """PSNR of min-max normalised depth maps; see the module docstring.

    Args:
        model: hub id, local directory (``from_pretrained``) or a built depth network whose
            output has ``predicted_depth`` ``[B, h, w]``. Default: Depth-Anything-V2-Small.
        dtype: autocast dtype for the network: ``None``/``float32``, ``float16``, ``bfloat16``.
        processor: image-processor config keys overriding the checkpoint's
            (e.g. ``{"size": {"height": 518, "width": 518}}``).
    """

    default_model = "depth-anything/Depth-Anything-V2-Small-hf"
    processor_defaults = {
        "size": {"height": 518, "width": 518}, "keep_aspect_ratio": True, "ensure_multiple_of": 14,
        "resample": 3, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
    }

    def load_model(self, source: str) -> nn.Module:
        from transformers import AutoModelForDepthEstimation

        return load_transformers(AutoModelForDepthEstimation, source, self.name)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        depth = self.model(pixel_values=pixel_values).predicted_depth
        return depth[:, 0] if depth.dim() == 4 else depth

    def features(self, target: torch.Tensor) -> torch.Tensor:
        """Normalised target depth ``[B, h, w]`` float32 in [0, 1] (h, w: the network's input size)."""
        return minmax_normalize(self.run(target))

    def score(self, preview: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        """PSNR ``[B]`` in [0, 100] dB of the preview's normalised depth against the cached one."""
        pred = self.run(preview)
        if pred.shape[-2:] != target_features.shape[-2:]:  # features cached at another input size
            pred = F.interpolate(pred[:, None], size=target_features.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return normalized_map_psnr(pred, target_features)


__all__ = ["DepthReward"]
