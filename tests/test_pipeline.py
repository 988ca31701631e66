"""The scheduler as a drop-in for a real diffusers pipeline (tiny random components)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from consolver.scheduler import ConsistencySolverScheduler
from tests.tiny_models import tiny_flux_pipeline, tiny_sd_pipeline


def _run(pipe, steps=4):
    out = pipe("a red circle on the left", num_inference_steps=steps, guidance_scale=3.0, height=32, width=32,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images


@pytest.mark.slow
def test_stable_diffusion_pipeline_end_to_end_is_deterministic(tmp_path):
    scheduler = ConsistencySolverScheduler(solver_order=3, base_solver="adams_bashforth")
    scheduler.save_pretrained(tmp_path / "scheduler")
    pipe = tiny_sd_pipeline(tmp_path, ConsistencySolverScheduler.from_pretrained(tmp_path / "scheduler"))
    first, second = _run(pipe), _run(pipe)
    assert first.shape == (1, 32, 32, 3) and np.isfinite(first).all()
    assert np.array_equal(first, second)  # bit-identical for the same seed
    # swapping the scheduler in from the pipeline's own config is a working drop-in: with the
    # DDIM table it gives diffusers' DDIM images, and not the order-3 images
    config = pipe.scheduler.config
    pipe.scheduler = ConsistencySolverScheduler.from_config(config, base_solver="ddim", solver_order=1)
    ours = _run(pipe)
    assert not np.array_equal(ours, first)
    pipe.scheduler = DDIMScheduler.from_config(config, clip_sample=False)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    np.testing.assert_allclose(ours, _run(pipe), atol=1e-4)


def test_flux_pipeline_drop_in_follows_flow_matching_conventions(tmp_path):
    """FLUX passes unshifted `sigmas` and a resolution-dependent `mu`; the Euler table must give
    what FlowMatchEulerDiscreteScheduler gives, and a multistep table must change the image."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = tiny_flux_pipeline(tmp_path, reference)

    def run():
        return pipe(prompt="a red circle", num_inference_steps=4, guidance_scale=3.0, height=32, width=32,
                    max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="np").images

    expected = run()
    pipe.scheduler = ConsistencySolverScheduler.from_config(reference.config)
    assert pipe.scheduler.config.schedule == "flow" and pipe.scheduler.config.use_dynamic_shifting
    euler = run()
    assert euler.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(euler, expected, atol=2e-3)  # diffusers rounds sigmas to fp32 before shifting
    assert np.array_equal(euler, run())
    pipe.scheduler = ConsistencySolverScheduler.from_config(reference.config, base_solver="adams_bashforth", solver_order=2)
    assert np.abs(run() - expected).max() > 1e-2
