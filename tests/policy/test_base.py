import torch

from consolver.policy import TimeMLPPolicy, build_policy, step_observation


def test_untrained_time_mlp_policy_is_ddim_and_sums_to_one():
    policy = TimeMLPPolicy(order=4)
    obs = step_observation(torch.tensor([999.0, 500.0]), torch.tensor([749.0, 250.0]), 2, 4, 1000)
    assert obs.shape == (2, 4)
    w = policy.mode(obs, num_available=4)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2))
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    w2 = policy.mode(obs, num_available=2)
    assert torch.all(w2[:, 2:] == 0) and torch.allclose(w2.sum(-1), torch.ones(2))


def test_policy_is_deterministic_and_rebuilds_from_its_kwargs():
    torch.manual_seed(0)
    policy = TimeMLPPolicy(order=3, hidden=8)
    for p in policy.parameters():
        torch.nn.init.normal_(p)
    rebuilt = build_policy("time_mlp", **policy.export_kwargs())
    rebuilt.load_state_dict(policy.state_dict())
    obs = torch.rand(5, 4)
    assert torch.equal(policy.mode(obs, 3), policy.mode(obs, 3))
    assert torch.equal(policy.mode(obs, 3), rebuilt.mode(obs, 3))
