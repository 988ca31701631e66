"""``rloo``: REINFORCE with the leave-one-out baseline within the group, one epoch per batch."""

from consolver.algos.policy_gradient import PolicyGradient


class RLOO(PolicyGradient):
    name = "rloo"
    leave_one_out = True

    @property
    def epochs(self) -> int:
        return 1
