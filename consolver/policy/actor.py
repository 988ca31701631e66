"""Actors (coefficient policies for RL) and the critic, as TorchRL modules.

An actor reads the environment's step inputs (see :mod:`consolver.env`) and outputs a
distribution over the ``d = order - 1`` free coefficients (:mod:`.distributions`):

- ``table`` (default): independent parameters for every (K, step), so each K's table is
  learned on its own; K outside the trained set is an error.
- ``mlp``: the paper's MLP on the step features ``(t_i/T, t_{i+1}/T, i/K, 1/K)`` (plus sample
  features when enabled), shared across K.

Both centre on the base solver: they output offsets from ``base_action`` (the base solver's
free coefficients at this step), with zero-initialised offsets, so the untrained mode *is* the
base solver and samples spread around it with std ``init_std``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from tensordict.nn import InteractionType, TensorDictModule
from torch import nn
from torchrl.modules import ProbabilisticActor, ValueOperator

from consolver.policy.base import OBSERVATION_DIM, CoefficientPolicy, history_similarity, register_policy
from consolver.policy.distributions import DISTRIBUTIONS

OBSERVATION = "observation"
STEP_INDEX = "step_index"
NUM_STEPS = "num_steps"
BASE_ACTION = "base_action"
ACTION_MASK = "action_mask"
ACTION = "action"
LOG_PROB = "action_log_prob"
DIST_KEYS = {"bins": ("logits", "values", "mask"), "gaussian": ("loc", "scale", "mask")}


def bin_offsets(ranges: Sequence[Sequence[float]], width: int, num_bins: int) -> torch.Tensor:
    """``[width, num_bins]`` offsets from the base solver, evenly spaced over each coefficient's
    ``[lo, hi]`` (the last range repeats), with 0 moved onto its nearest bin so the base solver
    is exactly representable."""
    rows = []
    for j in range(width):
        lo, hi = ranges[min(j, len(ranges) - 1)]
        values = torch.linspace(float(lo), float(hi), num_bins, dtype=torch.float64)
        values[(values.abs()).argmin()] = 0.0
        rows.append(values)
    return torch.stack(rows).float() if rows else torch.zeros(0, num_bins)


def initial_logits(offsets: torch.Tensor, init_std: float) -> torch.Tensor:
    """A discretised Gaussian of std ``init_std`` centred on offset 0 (the base solver)."""
    return -0.5 * (offsets / init_std) ** 2


class TableHead(nn.Module):
    """Distribution parameters from a table indexed by (K, step).

    Bins: logits ``[R, d, nb]``; Gaussian: mean offsets and log-stds ``[R, d]``; ``R = sum(K)``.
    """

    def __init__(self, num_steps: Sequence[int], width: int, distribution: str, offsets: torch.Tensor, init_std: float):
        super().__init__()
        self.num_steps = sorted(int(k) for k in set(num_steps))
        self.distribution, self.width = distribution, width
        row_of = torch.full((max(self.num_steps) + 1,), -1, dtype=torch.long)
        start = 0
        for K in self.num_steps:
            row_of[K] = start
            start += K
        self.register_buffer("row_of", row_of)
        if distribution == "bins":
            self.register_buffer("offsets", offsets)
            self.logits = nn.Parameter(initial_logits(offsets, init_std).expand(start, -1, -1).clone())
        else:
            self.mean = nn.Parameter(torch.zeros(start, width))
            self.log_std = nn.Parameter(torch.full((start, width), math.log(init_std)))

    def rows(self, step_index: torch.Tensor, num_steps: torch.Tensor) -> torch.Tensor:
        K = num_steps.reshape(-1).long()
        if bool((K >= len(self.row_of)).any()) or bool((self.row_of[K.clamp(max=len(self.row_of) - 1)] < 0).any()):
            raise ValueError(f"the table policy has parameters for K in {self.num_steps} only, got K="
                             f"{sorted(set(K.tolist()))}")
        return self.row_of[K] + step_index.reshape(-1).long()

    def forward(self, step_index, num_steps, base, mask):
        rows = self.rows(step_index, num_steps).reshape(step_index.shape)
        if self.distribution == "bins":
            return self.logits[rows], base.unsqueeze(-1) + self.offsets, mask
        return base + self.mean[rows], self.log_std[rows].exp(), mask


class MLPHead(nn.Module):
    """The paper's MLP ``obs -> hidden -> hidden -> d x nb`` (bins) or ``d`` mean offsets
    (Gaussian, with a learned state-independent log-std), zero-initialised output layer."""

    def __init__(self, observation_dim: int, width: int, distribution: str, offsets: torch.Tensor, init_std: float,
                 hidden: int = 256):
        super().__init__()
        self.distribution, self.width = distribution, width
        nb = offsets.shape[-1]
        out = width * nb if distribution == "bins" else width
        self.net = nn.Sequential(nn.Linear(observation_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, max(out, 1)))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.register_buffer("offsets", offsets)
        if distribution == "bins":
            self.register_buffer("prior_logits", initial_logits(offsets, init_std))
        else:
            self.log_std = nn.Parameter(torch.full((width,), math.log(init_std)))

    def forward(self, observation, base, mask):
        out = self.net(observation)
        if self.distribution == "bins":
            logits = out[..., : self.width * self.offsets.shape[-1]].reshape(*out.shape[:-1], *self.offsets.shape)
            return self.prior_logits + logits, base.unsqueeze(-1) + self.offsets, mask
        return base + out[..., : self.width], self.log_std.exp().expand_as(base), mask


def make_actor(policy_cfg, order: int, num_steps: Sequence[int], observation_dim: int,
               extra_columns: int = 0) -> ProbabilisticActor:
    """The actor for ``policy_cfg`` (a :class:`~consolver.config.PolicyConfig`): reads the step
    inputs, writes ``action [N, order - 1 + extra_columns]`` (coefficient values, then e.g. the
    next grid position's logit of a learned grid) and ``action_log_prob [N]``; samples by
    default, acts by its mode under ``set_interaction_type(DETERMINISTIC)``."""
    width = order - 1 + int(extra_columns)
    dist = policy_cfg.distribution
    offsets = bin_offsets(policy_cfg.ranges, width, policy_cfg.num_bins)
    if policy_cfg.name == "table":
        head = TableHead(num_steps, width, dist, offsets, policy_cfg.init_std)
        in_keys = [STEP_INDEX, NUM_STEPS, BASE_ACTION, ACTION_MASK]
    elif policy_cfg.name == "mlp":
        head = MLPHead(observation_dim, width, dist, offsets, policy_cfg.init_std, policy_cfg.hidden)
        in_keys = [OBSERVATION, BASE_ACTION, ACTION_MASK]
    else:
        raise ValueError(f"unknown policy {policy_cfg.name!r}; valid policies: table, mlp")
    keys = list(DIST_KEYS[dist])
    module = TensorDictModule(head, in_keys=in_keys, out_keys=keys)
    return ProbabilisticActor(module, in_keys=keys, out_keys=[ACTION], distribution_class=DISTRIBUTIONS[dist],
                              return_log_prob=True, log_prob_key=LOG_PROB,
                              default_interaction_type=InteractionType.RANDOM)


def make_critic(observation_dim: int, hidden: int = 64) -> ValueOperator:
    """``V(observation)`` -> ``state_value [N, 1]``."""
    net = nn.Sequential(nn.Linear(observation_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                        nn.Linear(hidden, 1))
    return ValueOperator(net, in_keys=[OBSERVATION])


@register_policy("consolver_mlp")
class SampleMLPPolicy(CoefficientPolicy):
    """An ``mlp`` actor whose observation has sample features, as a policy a scheduler carries
    (weights in ``policy.safetensors``; acts by its mode, per sample). Its base solver is constant
    over steps (DDIM/Euler), given as ``base`` free coefficients ``[order - 1]``."""

    depends_on_sample = True

    def __init__(self, order: int, distribution: str, offsets: Sequence[Sequence[float]], init_std: float,
                 hidden: int, implied: str, base: Sequence[float]):
        super().__init__(order)
        self.implied = implied
        self._kwargs = {"order": order, "distribution": distribution, "offsets": [list(map(float, r)) for r in offsets],
                        "init_std": float(init_std), "hidden": int(hidden), "implied": implied,
                        "base": [float(b) for b in base]}
        self.head = MLPHead(OBSERVATION_DIM + order - 1, order - 1, distribution,
                            torch.tensor(offsets, dtype=torch.float32).reshape(order - 1, -1), init_std, hidden)
        self.register_buffer("base", torch.tensor(list(base), dtype=torch.float32).reshape(order - 1))

    def mode_free(self, observation, history=None):
        sims = history_similarity(history, self.order)
        obs = torch.cat([observation.to(sims).expand(sims.shape[0], -1), sims], -1)
        base = self.base.expand(obs.shape[0], -1)
        params = self.head(obs, base, torch.ones_like(base, dtype=torch.bool))
        return DISTRIBUTIONS[self.head.distribution](*params).mode

    def export_kwargs(self) -> dict:
        return dict(self._kwargs)
