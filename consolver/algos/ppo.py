"""``ppo``: clipped PPO with several epochs and minibatches per batch; the advantage is
group-relative (``algo.advantage=group``) or GAE with a critic (``algo.advantage=gae``), with an
optional entropy bonus and KL penalty to the initial policy."""

from consolver.algos.policy_gradient import PolicyGradient


class PPO(PolicyGradient):
    name = "ppo"

    @property
    def uses_critic(self) -> bool:  # type: ignore[override]
        return self.cfg.algo.advantage == "gae"
