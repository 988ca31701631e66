"""Classifier-free-guided sampling from the toy diffusion model with a diffusers scheduler.

Guidance runs as one doubled batch: rows ``[x, x]`` with labels ``[class_ids, null]``, and
``eps = eps_null + guidance (eps_class - eps_null)`` (``guidance = 1``: the conditional model
alone, one batch). Timesteps are spaced ``trailing`` (the first step starts at t = 999).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from consolver.toy_diffusion.model import null_class_id

logger = logging.getLogger(__name__)

SAMPLERS = ("dpmsolver++", "ddim")


def make_sampler(name: str, scheduler_config):
    """A fresh inference scheduler ``name`` (one of :data:`SAMPLERS`) on the model's noise schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++", solver_order=2,
                                                       timestep_spacing="trailing")
    if name == "ddim":
        return DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing", clip_sample=False,
                                         set_alpha_to_one=False)
    raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")


def guided_eps(unet, x: torch.Tensor, t, class_ids: torch.Tensor, guidance: float) -> torch.Tensor:
    """Guided epsilon ``[B, 3, H, W]`` for ``x [B, 3, H, W]`` at timestep ``t`` (int or 0-dim tensor)."""
    if guidance == 1:
        return unet(x, t, class_labels=class_ids).sample
    null = torch.full_like(class_ids, null_class_id(unet.config.num_class_embeds - 1))
    eps_class, eps_null = unet(torch.cat([x, x]), t, class_labels=torch.cat([class_ids, null])).sample.chunk(2)
    return eps_null + guidance * (eps_class - eps_null)


@torch.no_grad()
def sample(unet, scheduler_config, class_ids: torch.Tensor, num_steps: int = 20, guidance: float = 2.0,
           sampler: str = "dpmsolver++", generator: Optional[torch.Generator] = None,
           noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] of classes ``class_ids [B]`` (long; the null class id
    gives unconditional samples).

    Args:
        scheduler_config: the model's scheduler config (``scheduler.config``).
        noise: initial ``x_T [B, 3, H, W]``; drawn from ``generator`` when None.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    num_embeds = unet.config.num_class_embeds
    class_ids = class_ids.long()
    if class_ids.numel() and (class_ids.min() < 0 or class_ids.max() >= num_embeds):
        raise ValueError(f"class ids must be in [0, {num_embeds - 1}] (the last one is the null class), "
                         f"got {class_ids.tolist()}")
    size = unet.config.sample_size
    shape = (len(class_ids), unet.config.in_channels, size, size)
    x = noise.clone() if noise is not None else torch.randn(shape, generator=generator)
    scheduler = make_sampler(sampler, scheduler_config)
    scheduler.set_timesteps(num_steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = guided_eps(unet, scheduler.scale_model_input(x, t), t, class_ids, guidance)
        x = scheduler.step(eps, t, x).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


__all__ = ["SAMPLERS", "guided_eps", "make_sampler", "sample"]
