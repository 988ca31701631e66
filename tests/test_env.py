import pytest
import torch
from torchrl.envs.utils import check_env_specs

from consolver.algos.base import solver_scheduler
from consolver.env import PreviewEnv, expand_groups, reset_batch
from consolver.sampling import sample
from tests.training import predict_counter, runtime, sample_batch, tiny_config


def make_env(cfg, n, base_solver="ddim", implied="newest", sample_features=False, num_steps=4):
    rt = runtime()
    cfg.solver.base_solver = base_solver
    batch = sample_batch(cfg, n)
    data = reset_batch(batch["noise"], rt["backend"].encode(batch["prompt"]), batch["features"], num_steps,
                       batch["target_latent"])
    env = PreviewEnv(rt["backend"], rt["reward"], ["toy_depth"], solver_scheduler(cfg, rt["backend"].schedule),
                     cfg.guidance, n, implied=implied, sample_features=sample_features, batch=data)
    return env, data, batch


def base_policy(td):
    td["action"] = td["base_action"].clone()
    return td


@pytest.mark.parametrize("sample_features", [False, True])
def test_check_env_specs_passes(tmp_path, sample_features):
    env, _, _ = make_env(tiny_config(tmp_path), 3, sample_features=sample_features)
    check_env_specs(env)


@pytest.mark.parametrize("base_solver,implied", [("ddim", "newest"), ("ddim", "oldest"),
                                                 ("adams_bashforth", "newest"), ("adams_bashforth", "oldest")])
def test_base_action_rollout_is_the_schedulers_sampling_loop(tmp_path, base_solver, implied):
    """DDIM: bit for bit. Adams-Bashforth: to float32 rounding (the env completes float32 free
    coefficients, the scheduler reads its float64 table)."""
    cfg = tiny_config(tmp_path)
    env, data, batch = make_env(cfg, 4, base_solver, implied, num_steps=5)
    start = env.reset(data).select(*env.observation_spec.keys())
    env.rollout(5, base_policy, tensordict=start, auto_reset=False)
    rt = runtime()
    loop = sample(rt["backend"], solver_scheduler(cfg, rt["backend"].schedule), batch["noise"],
                  rt["backend"].encode(batch["prompt"]), cfg.guidance, 5)
    if base_solver == "ddim":
        assert torch.equal(env.final_latents, loop)
    else:
        torch.testing.assert_close(env.final_latents, loop, rtol=0, atol=2e-5)
        assert not torch.equal(loop, sample(rt["backend"], solver_scheduler(tiny_config(tmp_path), rt["backend"].schedule),
                                            batch["noise"], rt["backend"].encode(batch["prompt"]), cfg.guidance, 5))


def test_episode_spends_k_evaluations_rewards_at_the_end_and_records_no_latents(tmp_path):
    env, data, _ = make_env(tiny_config(tmp_path), 4, num_steps=6)
    calls, restore = predict_counter(env.backend)
    try:
        start = env.reset(data).select(*env.observation_spec.keys(), "done", "terminated")
        roll = env.rollout(6, base_policy, tensordict=start, auto_reset=False, return_contiguous=True)
    finally:
        restore()
    assert len(calls) == 6 and calls == sorted(calls, reverse=True)
    reward = roll["next", "reward"][..., 0]
    assert roll.shape == (4, 6) and torch.all(reward[:, :-1] == 0) and torch.all(reward[:, -1] > 10)
    assert roll["next", "done"][:, -1].all() and not roll["next", "done"][:, :-1].any()
    latent_numel = 3 * 32 * 32
    assert all(v.shape[-1] < latent_numel for v in roll.values(True, True)), "latents must stay in the env"
    # masks: step i has min(i, 3) free coefficients in use
    assert roll["action_mask"].sum(-1)[0].tolist() == [0, 1, 2, 3, 3, 3]


def test_one_k_per_batch_and_groups_repeat_samples(tmp_path):
    env, data, _ = make_env(tiny_config(tmp_path), 4)
    grouped = expand_groups(data[:2], 2)
    assert torch.equal(grouped["noise"][0], grouped["noise"][1]) and torch.equal(grouped["noise"][2], data["noise"][1])
    data["num_steps"][1] = 5
    with pytest.raises(ValueError, match="one K per batch"):
        env.reset(data)
