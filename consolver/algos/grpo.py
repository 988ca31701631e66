"""``grpo``: group-relative advantage (no critic), clipped ratio. The advantage is ``r`` minus
the group mean, divided by ``max(group std, algo.min_group_std)`` (``algo.normalize_std``, on by
default): the floor keeps near-tie groups from being inflated to unit scale. With the newest
coefficient implied, this measured better than the plain group mean at K >= 6 on the toy
(docs/benchmarks.md)."""

from consolver.algos.policy_gradient import PolicyGradient


class GRPO(PolicyGradient):
    name = "grpo"
