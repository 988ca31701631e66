"""Pixel-space rewards: PSNR and SSIM between a preview and its target, batched.

Both treat images as ``[B, C, H, W]`` with data range 1 (values in [0, 1]); the target-side
features are the target images themselves.

- ``pixel_psnr``: ``10 log10(1 / MSE)`` in dB, capped at ``MAX_PSNR_DB`` (identical images).
- ``pixel_ssim``: ``100 x`` mean SSIM (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, 'valid'
  windows, per channel), so 100 for identical images, on the 0..100 scale of the other rewards.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from consolver.rewards.base import Reward, register_reward

MAX_PSNR_DB = 100.0  # PSNR of identical images (MSE floored at 1e-10)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, max_db: float = MAX_PSNR_DB) -> torch.Tensor:
    """Per-sample PSNR in dB ``[B]`` of ``x, y [B, ...]``; ``max_db`` when identical."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    mse = (x.to(dtype) - y.to(dtype)).square().flatten(1).mean(1)
    floor = data_range**2 * 10 ** (-max_db / 10)
    return 10 * torch.log10(data_range**2 / mse.clamp(min=floor))


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-sample min-max normalisation of ``[B, ...]`` to [0, 1] (constant maps become 0).

    The tiny ``eps`` keeps it scale-free for networks whose raw outputs span very small ranges.
    """
    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp(min=eps)).reshape(maps.shape)


def normalized_map_psnr(pred_maps: torch.Tensor, target_normalized: torch.Tensor) -> torch.Tensor:
    """The depth rewards' scale (``depth``, ``toy_depth``, as the paper's code): PSNR in dB of
    min-max normalised ``pred_maps [B, h, w]`` against already normalised target maps, ``[B]``
    in [0, ``MAX_PSNR_DB``] (clamped at 0)."""
    pred = minmax_normalize(pred_maps)
    return psnr(pred, target_normalized.to(pred)).clamp(min=0)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian ``[size]``."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM per sample ``[B]`` of images ``x, y [B, C, H, W]`` (Wang et al. 2004), in [-1, 1].

    The separable Gaussian window shrinks to the image side if the image is smaller.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two [B, C, H, W] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32 (float64 stays float64)
    x, y = x.to(dtype), y.to(dtype)
    C = x.shape[1]
    size = min(window, x.shape[-1], x.shape[-2])
    g = gaussian_window(size, sigma, x.dtype, x.device)
    kernel_h = g.reshape(1, 1, 1, size).expand(C, 1, 1, size)
    kernel_v = g.reshape(1, 1, size, 1).expand(C, 1, size, 1)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(z, kernel_h, groups=C), kernel_v, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


class _PixelReward(Reward):
    """Shared plumbing: no network, target features = target images ``[B, 3, H, W]``."""

    def __init__(self, model: Optional[str] = None, dtype: Optional[str] = None):
        super().__init__()
        if model is not None:
            raise ValueError(f"reward {self.name!r} has no model; remove `model` from its config entry")
        if dtype is not None:  # nothing runs in a lower precision: refuse rather than ignore it
            raise ValueError(f"reward {self.name!r} has no network, so `dtype` has no effect; remove `dtype` from "
                             f"its config entry")
        self.freeze()

    def features(self, target: torch.Tensor) -> torch.Tensor:
        return target


@register_reward("pixel_psnr")
class PixelPSNR(_PixelReward):
    """PSNR in dB (data range 1), ``[B]``; ``MAX_PSNR_DB`` for identical images."""

    def score(self, preview: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        return psnr(preview, target_features)


@register_reward("pixel_ssim")
class PixelSSIM(_PixelReward):
    """``100 x`` SSIM, ``[B]`` in [-100, 100]; 100 for identical images."""

    def score(self, preview: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        return 100 * ssim(preview, target_features)


__all__ = ["MAX_PSNR_DB", "PixelPSNR", "PixelSSIM", "gaussian_window", "minmax_normalize", "normalized_map_psnr", "psnr",
           "ssim"]
