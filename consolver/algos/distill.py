"""``distill``: the paper's "Ours-Distill". A deterministic (mode) rollout, backpropagated
through the K-step solve (backend included) to a loss against the full-step target. On a fixed
grid this bounds what any coefficient policy can reach.

Losses (``algo.distill_loss``): ``log_mse`` (default; the log of each sample's latent MSE, i.e.
-PSNR, so the few samples that land on another mode do not dominate), ``mse``, ``pixel_mse``
(MSE of the decoded images), or ``reward`` (minus the configured reward, which must be
differentiable: toy depth, DINO/CLIP features). The RL algorithms can add the same loss to
their updates (``algo.distill_coef``).

Memory: the backward pass keeps every backend call's activations for all K steps (the backend
weights are frozen; the gradient flows through the latents to the coefficients). With
``algo.gradient_checkpointing=true`` each differentiable ``predict`` runs under
``torch.utils.checkpoint`` and is recomputed in the backward pass instead (same gradient, about
one extra forward per step), which is what makes ``distill`` fit on SD1.5 at 512 px.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from tensordict import TensorDict

from consolver.algos.base import PreviewAlgorithm


def distill_loss(latents: torch.Tensor, target: torch.Tensor, reward: torch.Tensor, kind: str,
                 decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Scalar loss of final latents ``[N, ...]`` against targets ``[N, ...]`` (``reward [N]``;
    ``decode``: latents -> images in [0, 1], for ``pixel_mse``)."""
    if kind == "pixel_mse":
        with torch.no_grad():
            target_images = decode(target)
        return (decode(latents).float() - target_images.float()).square().mean()
    mse = (latents.float() - target.float()).square().flatten(1).mean(1)
    if kind == "log_mse":
        return torch.log(mse + 1e-10).mean()
    if kind == "mse":
        return mse.mean()
    if kind == "reward":
        return -reward.mean()
    raise ValueError(f"unknown algo.distill_loss {kind!r}; valid: log_mse, mse, pixel_mse, reward")


def mode_rollout_loss(module: PreviewAlgorithm, data: TensorDict, num_steps: int):
    """``(loss, reward [B])``: the actor's mode rolled out on a reset input ``data [B]`` (one
    rollout per sample, see :meth:`PreviewAlgorithm.reset_input`) with the gradient through the
    solve, and its ``algo.distill_loss``."""
    roll, env = module.rollout(data, num_steps, deterministic=True)
    reward = roll["next", "reward"][:, -1, 0]
    loss = distill_loss(env.final_latents, data["target_latent"], reward, module.cfg.algo.distill_loss,
                        module.runtime["backend"].decode)
    return loss, reward


class Distill(PreviewAlgorithm):
    name = "distill"

    def train_on(self, batch: Dict[str, Any], num_steps: int) -> Optional[Dict[str, float]]:
        loss, reward = mode_rollout_loss(self, self.reset_input(batch, num_steps), num_steps)
        norm = self.apply_gradients(loss, self.optimizers())
        stats = {"loss": float(loss.detach()), "reward_mean": float(self.gather_mean(reward)),
                 f"reward_K{num_steps}": float(self.gather_mean(reward))}
        if norm is not None:
            stats["grad_norm"] = norm
        return stats
