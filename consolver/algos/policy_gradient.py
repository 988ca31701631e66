"""Clipped policy-gradient training over groups of rollouts (the shared core of ``ppo``,
``grpo`` and ``rloo``).

A batch of B (prompt, noise, target) samples becomes ``N = B x G`` rollouts, G per sample
(``algo.group_size``), sampled from the actor. The reward arrives at the last step; each
rollout's advantage (group-relative, or GAE with a critic) applies to every step it acted on.
The update is torchrl's ``ClipPPOLoss`` for ``algo.epochs`` epochs of ``algo.minibatches``
minibatches; with one epoch the clipped objective's gradient is exactly REINFORCE's.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Dict, Optional

import torch
from tensordict import TensorDict
from torchrl.objectives import ClipPPOLoss, ValueEstimators

from consolver.algos.base import PreviewAlgorithm
from consolver.env import expand_groups
from consolver.policy.actor import ACTION, LOG_PROB, make_critic

logger = logging.getLogger(__name__)


def group_advantage(reward: torch.Tensor, normalize_std: bool = False, min_std: float = 0.0,
                    leave_one_out: bool = False) -> torch.Tensor:
    """Advantages ``[B, G]`` of rewards ``[B, G]`` (G rollouts that share a prompt and noise).

    ``r - mean(group)``; leave-one-out scales it by ``G / (G - 1)`` (= ``r`` minus the mean of the
    *other* rollouts); ``normalize_std`` divides by ``max(std(group), min_std)``, so groups whose
    rewards barely differ get no inflated advantage.
    """
    G = reward.shape[1]
    adv = reward - reward.mean(1, keepdim=True)
    if leave_one_out:
        adv = adv * (G / (G - 1))
    if normalize_std:
        adv = adv / reward.std(1, keepdim=True).clamp(min=max(min_std, 1e-8))
    return adv


class PolicyGradient(PreviewAlgorithm):
    """Group-structured clipped policy gradient. Subclasses set the advantage and the epochs."""

    leave_one_out = False
    uses_critic = False

    def __init__(self, cfg, runtime=None):
        super().__init__(cfg, runtime)
        algo = cfg.algo
        self.critic = make_critic(self.obs_dim, max(32, cfg.policy.hidden // 4)) if self.uses_critic else None
        loss = ClipPPOLoss(self.actor, self.critic, clip_epsilon=algo.clip_epsilon, entropy_bonus=algo.entropy_coef > 0,
                           entropy_coeff=algo.entropy_coef if algo.entropy_coef > 0 else None,
                           normalize_advantage=False)
        loss.set_keys(sample_log_prob=LOG_PROB, action=ACTION)
        if self.uses_critic:
            loss.make_value_estimator(ValueEstimators.GAE, gamma=algo.gamma, lmbda=algo.lmbda)
        self.__dict__["loss_module"] = loss  # not a submodule: it shares the actor's parameters
        self.__dict__["initial_actor"] = copy.deepcopy(self.actor).requires_grad_(False) if algo.kl_coef > 0 else None

    @property
    def epochs(self) -> int:
        return int(self.cfg.algo.epochs)

    @property
    def updates_per_batch(self) -> int:
        return self.epochs * int(self.cfg.algo.minibatches)

    def advantage(self, reward: torch.Tensor) -> torch.Tensor:
        """``[B, G]`` advantages of ``[B, G]`` rewards (the group baseline)."""
        algo = self.cfg.algo
        return group_advantage(reward, algo.normalize_std, algo.min_group_std, self.leave_one_out)

    def train_on(self, batch: Dict[str, Any], num_steps: int) -> Optional[Dict[str, float]]:
        algo, G = self.cfg.algo, int(self.cfg.algo.group_size)
        B = batch["noise"].shape[0]
        samples = self.reset_input(batch, num_steps)  # encoded once: the groups and the distill term share it
        data = expand_groups(samples, G)
        with torch.no_grad():
            roll, _ = self.rollout(data, num_steps, deterministic=False)
        reward = roll["next", "reward"][:, -1, 0]  # [N]
        if self.skip_if_not_finite("reward", reward):
            return None
        ceiling = self.cfg.algo.reward_ceiling
        shaped = reward if ceiling is None else reward.clamp(max=float(ceiling))
        steps = self._with_advantage(roll, shaped.view(B, G))
        aux = None
        if algo.distill_coef > 0:  # the gradient bound's loss on the mode, added to the first update
            from consolver.algos.distill import mode_rollout_loss

            aux = mode_rollout_loss(self, samples, num_steps)[0]
        stats = self._update(steps, aux)
        if aux is not None:
            stats["distill_loss"] = float(aux.detach())
        if "entropy" not in stats:
            with torch.no_grad():
                stats["entropy"] = float(self.actor.get_dist(steps.clone(False)).entropy().mean())
        mean = float(self.gather_mean(reward))
        std = float(self.gather_mean(reward.std().reshape(1)))
        stats.update(reward_mean=mean, reward_group_std=float(reward.view(B, G).std(1).mean()),
                     **{f"reward_K{num_steps}": mean, f"reward_std_K{num_steps}": std})
        return stats

    def _with_advantage(self, roll: TensorDict, reward: torch.Tensor) -> TensorDict:
        """Steps that act (step 0 has no free coefficient), flattened ``[N * (K - 1)]``, with
        ``advantage [.., 1]`` (and ``init_log_prob`` for the KL penalty)."""
        if self.uses_critic:
            with torch.no_grad():
                self.loss_module.value_estimator(roll)
            steps = roll
        else:
            adv = self.advantage(reward).reshape(-1)  # [N]
            # step 0 has no free coefficient, but with a learned grid it places the next time
            steps = roll[:, 1:] if roll.shape[1] > 1 and not self.learn_timesteps else roll
            steps.set("advantage", adv[:, None, None].expand(*steps.shape, 1).clone())
        steps = steps.reshape(-1)
        if self.initial_actor is not None:
            with torch.no_grad():
                dist = self.initial_actor.get_dist(steps.clone(False))
                steps.set("init_log_prob", dist.log_prob(steps[ACTION]))
        return steps

    def _update(self, steps: TensorDict, aux: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """PPO epochs x minibatches over ``steps``; ``aux`` (a scalar loss with its graph, e.g.
        ``algo.distill_coef`` x the distill loss) joins the first update."""
        algo = self.cfg.algo
        opt = self.optimizers()
        n, mb = steps.shape[0], int(algo.minibatches)
        sums: Dict[str, float] = {}
        count = 0
        for _ in range(self.epochs):
            order = torch.randperm(n, device=steps.device) if mb > 1 else torch.arange(n, device=steps.device)
            for chunk in order.chunk(mb):
                part = steps[chunk]
                out = self.loss_module(part)
                loss = out["loss_objective"]
                for key in ("loss_entropy", "loss_critic"):
                    if key in out.keys():
                        loss = loss + out[key]
                if aux is not None:
                    loss, aux = loss + algo.distill_coef * aux, None
                if self.initial_actor is not None:
                    log_ratio = part["init_log_prob"] - self.actor.get_dist(part).log_prob(part[ACTION])
                    kl = (log_ratio.exp() - 1 - log_ratio).mean()  # k3 estimator of KL(pi || pi_0)
                    loss = loss + algo.kl_coef * kl
                    sums["kl_initial"] = sums.get("kl_initial", 0.0) + float(kl)
                norm = self.apply_gradients(loss, opt)
                if norm is not None:
                    sums["grad_norm"] = sums.get("grad_norm", 0.0) + norm
                for key in ("clip_fraction", "kl_approx", "entropy", "loss_objective", "loss_critic"):
                    if key in out.keys():
                        sums[key] = sums.get(key, 0.0) + float(out[key].detach().mean())
                count += 1
        stats = {k: v / max(count, 1) for k, v in sums.items()}
        adv = steps["advantage"]
        stats.update(advantage_mean=float(adv.mean()), advantage_std=float(adv.std()), advantage_abs=float(adv.abs().mean()))
        return stats
