import copy

import pytest
import torch

from consolver.algos.policy_gradient import group_advantage
from consolver.train import fit
from tests.training import runtime, tiny_config


def test_group_advantage_is_relative_to_the_group():
    reward = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.01]])
    adv = group_advantage(reward)
    torch.testing.assert_close(adv.sum(1), torch.zeros(2))
    torch.testing.assert_close(adv[0], torch.tensor([-2.0, -1.0, 0.0, 3.0]))
    loo = group_advantage(reward, leave_one_out=True)  # r minus the mean of the others
    torch.testing.assert_close(loo[0, 3], torch.tensor(6.0 - (1 + 2 + 3) / 3))
    # std-normalised: a near-tie group is not blown up to unit scale, thanks to the floor
    normed = group_advantage(reward, normalize_std=True, min_std=0.5)
    assert normed[1].abs().max() < 0.02 and normed[0].std() > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo-gae", "ppo-kl", "rloo", "distill"])
def test_every_algorithm_trains_its_parameters(tmp_path, algo):
    overrides = {"ppo-gae": ["algo.name=ppo", "algo.advantage=gae", "algo.epochs=2", "algo.minibatches=2"],
                 "ppo-kl": ["algo.name=ppo", "algo.kl_coef=0.5", "algo.epochs=2", "algo.minibatches=1",
                            "algo.entropy_coef=0.01"],
                 "rloo": ["algo.name=rloo", "algo.epochs=3", "algo.minibatches=1"],
                 "distill": ["algo.name=distill", "algo.lr=0.05"]}[algo]
    cfg = tiny_config(tmp_path, "trainer.max_steps=3", "solver.num_steps=[4]", *overrides)
    result = fit(cfg, runtime=runtime())
    module = result.module
    updates = {"ppo-gae": 4, "ppo-kl": 2, "rloo": 1, "distill": 1}[algo]  # rloo: always one epoch
    assert module.updates_per_batch == updates and result.trainer.global_step == 3  # iterations, whatever the updates
    head = module.actor.module[0].module
    assert int(result.trainer.optimizers[0].state[head.mean]["step"]) == 3 * updates  # every update was applied
    assert head.mean.abs().max() > 0, "the policy did not move"
    metrics = result.trainer.logged_metrics
    assert float(metrics["train/lr"]) < 0.5 * cfg.algo.lr  # the cosine schedule is really stepped
    if algo == "ppo-gae":
        fresh = copy.deepcopy(type(module)(cfg).critic)
        moved = any(not torch.equal(a, b) for a, b in zip(module.critic.parameters(), fresh.parameters()))
        assert moved and "train/loss_critic" in metrics
    if algo == "ppo-kl":
        assert float(metrics["train/kl_initial"]) > 0 and "train/entropy" in metrics
    if algo == "distill":
        assert torch.isfinite(metrics["train/loss"])


@pytest.mark.slow
def test_a_reward_ceiling_below_every_reward_leaves_nothing_to_learn(tmp_path):
    """Rewards clamped at the ceiling before the advantages: toy depth is > 0 dB everywhere, so a
    ceiling of 0 makes every group a tie and the policy never moves; without it, it does."""
    moved = {}
    for ceiling in ("0.0", "null"):
        cfg = tiny_config(tmp_path / ceiling, "trainer.max_steps=2", "solver.num_steps=[4]", "algo.name=grpo",
                          f"algo.reward_ceiling={ceiling}")
        head = fit(cfg, runtime=runtime()).module.actor.module[0].module
        moved[ceiling] = float(head.mean.abs().max())
    assert moved["0.0"] == 0.0 and moved["null"] > 0
