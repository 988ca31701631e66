"""Learned step grids in the scheduler: stored in the config, used by set_timesteps(K),
overridden by explicit timesteps/sigmas (said in the log), FLUX's default sigmas replaced."""

import functools
import json

import numpy as np
import pytest
import torch

from consolver.scheduler import ConsistencySolverScheduler
from consolver.schedules import time_shift
from tests.tiny_models import tiny_flux_pipeline, tiny_sd_pipeline

TABLE4 = [[1.0, 0, 0], [1.2, -0.2, 0], [1.1, -0.05, -0.05], [1.5, -0.3, -0.2]]


def learned_vp(tmp_path=None):
    s = ConsistencySolverScheduler(solver_order=3)
    s.set_coefficient_tables({4: TABLE4})
    s.set_step_grids({4: [999, 880, 650, 26]})
    if tmp_path is not None:
        s.save_pretrained(tmp_path)
        s = ConsistencySolverScheduler.from_pretrained(tmp_path)
    return s


def test_grid_round_trips_as_plain_json_and_set_timesteps_uses_it(tmp_path):
    s = learned_vp(tmp_path)
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert config["step_grids"] == {"4": [999, 880, 650, 26]}
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 880, 650, 26]
    assert s.step_positions(4).tolist() == [999, 880, 650, 26, -1]
    s.set_timesteps(4, timesteps=[999, 750, 500, 250])  # explicit timesteps win
    assert s.timesteps.tolist() == [999, 750, 500, 250]


def test_explicit_timesteps_say_which_grid_was_used():
    """A user-facing warning (warnings.warn): it reaches a script that configured no logging."""
    s = learned_vp()
    with pytest.warns(UserWarning, match="solving on the 4 timesteps given, not on a learned step grid"):
        s.set_timesteps(timesteps=[999, 750, 500, 250])
    with pytest.warns(UserWarning, match=r"solving on the 6 timesteps given.*learned grids for K in \[4\]"):
        with pytest.raises(ValueError, match=r"no coefficient table for num_inference_steps=6"):
            s.set_timesteps(timesteps=[999, 800, 600, 400, 200, 0])


def test_a_grid_whose_length_differs_from_k_is_refused_when_loaded(tmp_path):
    learned_vp(tmp_path)
    path = tmp_path / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["step_grids"] = {"4": [999, 500, 20]}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"step grid for K=4 has 3 values, not 4"):
        ConsistencySolverScheduler.from_pretrained(tmp_path)


def test_stable_diffusion_pipeline_evaluates_the_unet_on_the_learned_grid(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path, learned_vp(tmp_path / "scheduler"))
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1])))
    pipe("a red circle", num_inference_steps=4, guidance_scale=3.0, height=32, width=32,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    assert seen == [999, 880, 650, 26]


def test_flux_pipeline_default_sigmas_are_replaced_by_the_learned_grid_shifted_by_mu(tmp_path):
    s = ConsistencySolverScheduler(schedule="flow", use_dynamic_shifting=True, solver_order=2)
    s.set_coefficient_tables({4: [[1.0, 0.0], [1.3, -0.3], [1.4, -0.4], [1.5, -0.5]]})
    learned = [1.0, 0.9, 0.5, 0.04]
    s.set_step_grids({4: learned})
    pipe = tiny_flux_pipeline(tmp_path, s)
    calls = []
    original = s.set_timesteps

    @functools.wraps(original)  # the pipeline inspects the signature for `sigmas`
    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    s.set_timesteps = spy
    pipe(prompt="a red circle", num_inference_steps=4, guidance_scale=3.0, height=32, width=32, max_sequence_length=16,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    mu = calls[0]["mu"]
    assert calls[0]["sigmas"] is not None and not np.allclose(calls[0]["sigmas"], learned)  # the pipeline's defaults
    expected = np.append(time_shift(np.array(learned), mu=mu), 0.0)
    np.testing.assert_allclose(s.sigmas.numpy(), expected, rtol=0, atol=1e-6)
    other = [1.0, 0.7, 0.4, 0.1]  # sigmas a user chose still override
    original(sigmas=other, mu=mu)
    np.testing.assert_allclose(s.sigmas.numpy(), np.append(time_shift(np.array(other), mu=mu), 0.0), atol=1e-6)
