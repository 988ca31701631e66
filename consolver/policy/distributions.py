"""Action distributions over the free multistep coefficients, with a per-row mask.

Step ``i`` of a solve of order ``m`` has ``min(i, m - 1)`` free coefficients in use; the rest
of the ``m - 1`` action columns are ignored by the environment, so they add nothing to the
log-probability or the entropy (``mask [..., m - 1]`` bool, True = in use). Actions are the
coefficient *values* ``[..., m - 1]`` float32 for both distributions, so the environment
never needs to know the bins.
"""

from __future__ import annotations

import math

import torch
from torch import distributions as D


class BinnedCoefficients(D.Distribution):
    """Independent categoricals, one per free coefficient, over fixed coefficient values.

    Args:
        logits: ``[..., d, nb]`` unnormalised log-probabilities of the bins.
        values: ``[..., d, nb]`` the coefficient value of each bin (ascending along the last dim).
        mask: ``[..., d]`` bool, the coefficients in use.
    """

    arg_constraints = {}
    has_rsample = False

    def __init__(self, logits: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, validate_args=None):
        self.logits = logits - logits.logsumexp(-1, keepdim=True)
        self.values = values.expand_as(logits)
        self.mask = mask.to(torch.bool).expand(logits.shape[:-1])
        super().__init__(batch_shape=logits.shape[:-2], event_shape=logits.shape[-2:-1], validate_args=False)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            probs = self.logits.exp()
            flat = probs.reshape(-1, probs.shape[-1])
            index = torch.multinomial(flat, math.prod(sample_shape) if sample_shape else 1, replacement=True)
            index = index.T.reshape(*sample_shape, *probs.shape[:-1])
            values = self.values.expand(*sample_shape, *self.values.shape)
            return values.gather(-1, index.unsqueeze(-1)).squeeze(-1)

    def bin_index(self, value: torch.Tensor) -> torch.Tensor:
        """Index ``[..., d]`` of the bin nearest to each value."""
        return (value.unsqueeze(-1) - self.values).abs().argmin(-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``[...]``: sum over the coefficients in use of their bin's log-probability."""
        index = self.bin_index(value)
        logp = self.logits.expand(*index.shape, self.logits.shape[-1]).gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return (logp * self.mask).sum(-1)

    def entropy(self) -> torch.Tensor:
        per_coefficient = -(self.logits.exp() * self.logits).sum(-1)
        return (per_coefficient * self.mask).sum(-1)

    @property
    def mode(self) -> torch.Tensor:
        return self.values.gather(-1, self.logits.argmax(-1, keepdim=True)).squeeze(-1)

    @property
    def deterministic_sample(self) -> torch.Tensor:
        return self.mode


class MaskedNormal(D.Distribution):
    """Independent Gaussians per free coefficient; ``loc, scale, mask [..., d]``. Differentiable
    samples (``rsample``) and mode (``loc``), as the ``distill`` algorithm needs."""

    arg_constraints = {}
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor, validate_args=None):
        self.loc, self.scale = loc, scale.expand_as(loc)
        self.mask = mask.to(torch.bool).expand_as(loc)
        super().__init__(batch_shape=loc.shape[:-1], event_shape=loc.shape[-1:], validate_args=False)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        eps = torch.randn(*sample_shape, *self.loc.shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + eps * self.scale

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        z = (value - self.loc) / self.scale
        logp = -0.5 * z * z - self.scale.log() - 0.5 * math.log(2 * math.pi)
        return (logp * self.mask).sum(-1)

    def entropy(self) -> torch.Tensor:
        per_coefficient = 0.5 + 0.5 * math.log(2 * math.pi) + self.scale.log()
        return (per_coefficient * self.mask).sum(-1)

    @property
    def mode(self) -> torch.Tensor:
        return self.loc

    @property
    def deterministic_sample(self) -> torch.Tensor:
        return self.loc


DISTRIBUTIONS = {"bins": BinnedCoefficients, "gaussian": MaskedNormal}
