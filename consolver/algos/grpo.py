"""``grpo``: group-relative advantage (no critic), clipped ratio. The advantage is ``r`` minus
the group mean; dividing by the group std (standard GRPO, ``algo.normalize_std=true``) is
offered but off by default: it measured worse on the toy (docs/benchmarks.md)."""

from consolver.algos.policy_gradient import PolicyGradient


class GRPO(PolicyGradient):
    name = "grpo"
