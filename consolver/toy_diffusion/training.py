"""Training of the toy diffusion model: fresh jittered renders every batch, epsilon-prediction
loss on SD1.5's schedule, label dropout to the null class, warmup + cosine LR, EMA weights.

Every batch draws class ids uniformly, renders new jittered scenes of those prompts
(``toy_scenes``: position, size, color and background jitter) and noises them at uniform
timesteps ``t in [0, 1000)``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with ``x0`` in
[-1, 1]. A fraction ``label_dropout`` of the labels becomes the null class. The objective is
the epsilon MSE, optionally Min-SNR weighted (``min(snr, gamma) / snr``, Hang et al. 2023),
which converges faster on a small compute budget.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from consolver.backends import toy_scenes
from consolver.toy_diffusion.model import ToyUNetSpec, build_scheduler, build_unet, null_class_id, num_parameters

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of :func:`train` (``steps`` optimizer steps of ``batch_size`` renders)."""

    steps: int = 4000
    batch_size: int = 32
    lr: float = 1.5e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    label_dropout: float = 0.12
    snr_gamma: Optional[float] = 5.0
    grad_clip: float = 1.0
    seed: int = 0
    #: Wall-clock budget (None: none). With one, the LR schedule's progress is
    #: ``max(step / steps, elapsed / max_seconds)`` and training stops when it reaches 1, so a run
    #: on a slower or busier machine still anneals and ends on time (with fewer steps).
    max_seconds: Optional[float] = None
    #: Train in channels-last memory format (faster oneDNN convolutions on CPU); saved weights are the same.
    channels_last: bool = True

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class TrainResult:
    """What :func:`train` returns: the EMA UNet (eval mode), per-step losses and timing."""

    unet: torch.nn.Module
    losses: list[float] = field(default_factory=list)  # objective per step
    mses: list[float] = field(default_factory=list)  # unweighted epsilon MSE per step
    seconds: float = 0.0
    steps: int = 0
    num_parameters: int = 0

    def final_mse(self, window: int = 200) -> float:
        """Mean unweighted epsilon MSE over the last ``window`` steps."""
        tail = self.mses[-window:]
        return sum(tail) / len(tail)


# ---------------------------------------------------------------- data

def render_batch(scenes: Sequence, class_ids: torch.Tensor, generator: torch.Generator,
                 resolution: int = 32) -> torch.Tensor:
    """Fresh jittered renders ``x0 [B, 3, r, r]`` in [-1, 1] of ``scenes[class_ids[b]]``."""
    params = toy_scenes.jittered_params([scenes[int(i)] for i in class_ids], generator)
    image, _, _ = toy_scenes.render(params, resolution)
    return 2 * image - 1


def drop_labels(class_ids: torch.Tensor, p: float, null_id: int, generator: torch.Generator) -> torch.Tensor:
    """``class_ids [B]`` with each entry replaced by ``null_id`` with probability ``p``."""
    drop = torch.rand(class_ids.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(class_ids, null_id), class_ids)


# ---------------------------------------------------------------- objective

def snr_weights(alphas_cumprod_t: torch.Tensor, gamma: Optional[float]) -> torch.Tensor:
    """Min-SNR loss weights ``[B]`` for epsilon prediction: ``min(snr, gamma) / snr`` (ones if
    ``gamma`` is None); ``snr = abar / (1 - abar)``."""
    if gamma is None:
        return torch.ones_like(alphas_cumprod_t)
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    return snr.clamp(max=gamma) / snr


def diffusion_loss(unet, x0: torch.Tensor, class_ids: torch.Tensor, alphas_cumprod: torch.Tensor,
                   generator: torch.Generator, snr_gamma: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(objective, mse)``: scalar losses of epsilon prediction at uniform timesteps.

    Args: ``x0 [B, 3, H, W]`` in [-1, 1]; ``class_ids [B]`` long (the null class included);
    ``alphas_cumprod [T]`` float (the schedule's ``abar``).
    Returns: the (Min-SNR weighted) objective with gradient, and the detached plain MSE.
    """
    B = x0.shape[0]
    t = torch.randint(len(alphas_cumprod), (B,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    abar = alphas_cumprod[t].float()
    a, s = abar.sqrt()[:, None, None, None], (1 - abar).sqrt()[:, None, None, None]
    pred = unet(a * x0 + s * eps, t, class_labels=class_ids).sample
    per_sample = F.mse_loss(pred, eps, reduction="none").flatten(1).mean(1)
    return (snr_weights(abar, snr_gamma) * per_sample).mean(), per_sample.mean().detach()


def lr_factor(step: int, warmup_steps: int, progress: float, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup_steps``, then cosine decay in ``progress`` (0..1, the run's
    fraction done) to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def run_progress(step: int, elapsed: float, config: TrainConfig) -> float:
    """Fraction of the run done after ``step`` steps and ``elapsed`` seconds (>= 1: stop)."""
    progress = step / config.steps
    if config.max_seconds:
        progress = max(progress, elapsed / config.max_seconds)
    return progress


class EMA:
    """Exponential moving average of a module's parameters (buffers copied), in a separate copy.

    The decay warms up as ``min(decay, (1 + step) / (10 + step))`` so early weights fade quickly.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_params, params = list(self.model.parameters()), list(model.parameters())
        torch._foreach_lerp_(ema_params, params, 1 - decay)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)


# ---------------------------------------------------------------- loop

def train(spec: ToyUNetSpec, config: TrainConfig, class_prompts: Sequence[str],
          on_step: Optional[Callable[[int, dict], None]] = None,
          on_checkpoint: Optional[Callable[[int, torch.nn.Module], None]] = None,
          checkpoint_every: int = 0) -> TrainResult:
    """Train a class-conditional toy UNet on fresh renders of ``class_prompts``.

    Args:
        on_step: called after every step with ``(step, {"loss", "mse", "lr", "seconds"})``.
        on_checkpoint: called with ``(step, ema_unet)`` every ``checkpoint_every`` steps (0: never).
    Returns: :class:`TrainResult` with the EMA UNet in eval mode.
    """
    if not class_prompts:
        raise ValueError("class_prompts is empty; give at least one toy prompt")
    scenes = [toy_scenes.parse_prompt(p) for p in class_prompts]
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    num_classes, null_id = len(class_prompts), null_class_id(len(class_prompts))
    unet = build_unet(spec, num_classes).train()
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    unet = unet.to(memory_format=memory_format)
    ema = EMA(unet, config.ema_decay)
    alphas_cumprod = build_scheduler().alphas_cumprod
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    result = TrainResult(unet=ema.model, num_parameters=num_parameters(unet))
    logger.info("training toy UNet (%d parameters, %d classes + null) for %d steps of %d",
                result.num_parameters, num_classes, config.steps, config.batch_size)
    start, step, lr = time.perf_counter(), 0, 0.0
    while run_progress(step, time.perf_counter() - start, config) < 1:
        lr = config.lr * lr_factor(step, config.warmup_steps, run_progress(step, time.perf_counter() - start, config),
                                   config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        class_ids = torch.randint(num_classes, (config.batch_size,), generator=generator)
        x0 = render_batch(scenes, class_ids, generator, spec.resolution).contiguous(memory_format=memory_format)
        labels = drop_labels(class_ids, config.label_dropout, null_id, generator)
        loss, mse = diffusion_loss(unet, x0, labels, alphas_cumprod, generator, config.snr_gamma)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"toy diffusion loss is {loss.item()} at step {step}; lower lr ({config.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
        optimizer.step()
        ema.update(unet, step)
        result.losses.append(loss.item())
        result.mses.append(mse.item())
        if on_step is not None:
            on_step(step, {"loss": result.losses[-1], "mse": result.mses[-1], "lr": lr,
                           "seconds": time.perf_counter() - start})
        if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            on_checkpoint(step + 1, ema.model)
        step += 1
    result.seconds, result.steps = time.perf_counter() - start, step
    ema.model.to(memory_format=torch.contiguous_format)
    if step < config.steps:
        logger.warning("stopped by the time budget (max_seconds=%s) after %d of %d steps", config.max_seconds,
                       step, config.steps)
    logger.info("trained %d steps in %.0f s; final epsilon MSE %.4f", step, result.seconds, result.final_mse())
    return result


__all__ = ["EMA", "TrainConfig", "TrainResult", "diffusion_loss", "drop_labels", "lr_factor", "render_batch",
           "run_progress", "snr_weights", "train"]
