import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import InteractionType, set_interaction_type

from consolver.config import load_config
from consolver.policy.actor import bin_offsets, make_actor
from consolver.policy.distributions import BinnedCoefficients, MaskedNormal

MASKS = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)


def inputs(n_per_step=1, K=4, base=None):
    base = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [-0.3, 0.2, 0.0], [0.1, -0.1, 0.05]]) if base is None else base
    td = TensorDict(step_index=torch.arange(K), num_steps=torch.full((K,), K), base_action=base,
                    action_mask=MASKS, observation=torch.rand(K, 4), batch_size=[K])
    return td.repeat_interleave(n_per_step, 0)


@pytest.mark.parametrize("name", ["table", "mlp"])
@pytest.mark.parametrize("distribution", ["bins", "gaussian"])
def test_untrained_mode_is_the_base_solver_and_samples_centre_there(name, distribution):
    torch.manual_seed(0)
    cfg = load_config(None, [f"policy.name={name}", f"policy.distribution={distribution}", "policy.init_std=0.2"])
    actor = make_actor(cfg.policy, 4, [4], 4)
    td = inputs(4000)
    with set_interaction_type(InteractionType.DETERMINISTIC):
        mode = actor(td.clone())["action"]
    torch.testing.assert_close(mode, td["base_action"])
    sampled = actor(td.clone())["action"].reshape(4, 4000, 3)
    spread = sampled - td["base_action"].reshape(4, 4000, 3)
    assert spread.mean(1).abs().max() < 0.02  # centred on the base solver
    assert 0.12 < spread.std(1).mean() < 0.3  # with about init_std of spread


def test_log_prob_and_entropy_count_only_the_coefficients_in_use():
    logits = torch.randn(4, 3, 5)
    values = torch.linspace(-1, 1, 5).expand(4, 3, 5)
    dist = BinnedCoefficients(logits, values, MASKS)
    action = dist.sample()
    changed = action.clone()
    changed[~MASKS] = 1.0 - changed[~MASKS]  # unused coefficients must not matter
    torch.testing.assert_close(dist.log_prob(action), dist.log_prob(changed))
    assert dist.log_prob(action)[0] == 0 and dist.entropy()[0] == 0
    logp = torch.log_softmax(logits, -1)
    idx = (action.unsqueeze(-1) - values).abs().argmin(-1)
    expected = (logp.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * MASKS).sum(-1)
    torch.testing.assert_close(dist.log_prob(action), expected)
    normal = MaskedNormal(torch.zeros(4, 3), torch.ones(4, 3), MASKS)
    full = torch.distributions.Normal(0.0, 1.0)
    a = torch.randn(4, 3)
    torch.testing.assert_close(normal.log_prob(a), (full.log_prob(a) * MASKS).sum(-1))
    torch.testing.assert_close(normal.entropy(), full.entropy() * MASKS.sum(-1).float())


def test_bins_contain_zero_and_span_the_ranges():
    offsets = bin_offsets([[-1.0, 1.0], [-2.0, 0.5]], 3, 11)
    assert offsets.shape == (3, 11)
    assert (offsets == 0).any(1).all()
    assert offsets[0, 0] == -1 and offsets[0, -1] == 1 and offsets[1, 0] == -2 and offsets[2, -1] == 0.5


def test_table_policy_refuses_an_untrained_k():
    cfg = load_config(None)
    actor = make_actor(cfg.policy, 4, [3, 4], 4)
    with pytest.raises(ValueError, match=r"K in \[3, 4\]"):
        actor(inputs(1, K=4).set("num_steps", torch.full((4,), 6)))
