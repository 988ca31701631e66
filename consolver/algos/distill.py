"""``distill``: the paper's "Ours-Distill". A deterministic (mode) rollout, backpropagated
through the K-step solve (backend included) to a loss against the full-step target. On a fixed
grid this bounds what any coefficient policy can reach.

Losses (``algo.distill_loss``): ``log_mse`` (default; the log of each sample's latent MSE, i.e.
-PSNR, so the few samples that land on another mode do not dominate), ``mse``, or ``reward``
(minus the configured reward, which must be differentiable).

Memory: the backward pass keeps every backend call's activations for all K steps (the backend
weights are frozen; the gradient flows through the latents to the coefficients). With
``algo.gradient_checkpointing=true`` each differentiable ``predict`` runs under
``torch.utils.checkpoint`` and is recomputed in the backward pass instead (same gradient, about
one extra forward per step), which is what makes ``distill`` fit on SD1.5 at 512 px.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from consolver.algos.base import PreviewAlgorithm


def distill_loss(latents: torch.Tensor, target: torch.Tensor, reward: torch.Tensor, kind: str) -> torch.Tensor:
    """Scalar loss of final latents ``[N, ...]`` against targets ``[N, ...]`` (``reward [N]``)."""
    mse = (latents.float() - target.float()).square().flatten(1).mean(1)
    if kind == "log_mse":
        return torch.log(mse + 1e-10).mean()
    if kind == "mse":
        return mse.mean()
    if kind == "reward":
        return -reward.mean()
    raise ValueError(f"unknown algo.distill_loss {kind!r}; valid: log_mse, mse, reward")


class Distill(PreviewAlgorithm):
    name = "distill"

    def train_on(self, batch: Dict[str, Any], num_steps: int) -> Optional[Dict[str, float]]:
        data = self.reset_input(batch, num_steps, 1)
        roll, env = self.rollout(data, num_steps, deterministic=True)
        reward = roll["next", "reward"][:, -1, 0]
        loss = distill_loss(env.final_latents, data["target_latent"], reward, self.cfg.algo.distill_loss)
        norm = self.apply_gradients(loss, self.optimizers())
        stats = {"loss": float(loss.detach()), "reward_mean": float(self.gather_mean(reward)),
                 f"reward_K{num_steps}": float(self.gather_mean(reward))}
        if norm is not None:
            stats["grad_norm"] = norm
        return stats
