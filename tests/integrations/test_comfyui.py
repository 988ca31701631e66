"""The ComfyUI nodes against a ComfyUI engine: ``comfy.sample.sample_custom`` (what the
``SamplerCustom`` node runs) with our ``SAMPLER`` and ``SIGMAS`` reproduces the scheduler's solve.

The README's test command installs that engine (and CI fails this test without it); elsewhere the engine test is skipped unless ``comfy`` is importable: upstream ComfyUI is not on PyPI, and the ``comfyui`` wheel
there (0.0.1, a 2024 packaging of ComfyUI's engine) pins dependencies this project cannot take. Run
it with that wheel installed beside the project, without its dependencies::

    pip install --no-deps --target /tmp/comfy comfyui==0.0.1 ConfigArgParse
    PYTHONPATH=/tmp/comfy python -m pytest -q tests/integrations/test_comfyui.py
"""

import os

import pytest
import torch

from consolver.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from consolver.scheduler import ConsistencySolverScheduler
from tests.integrations.test_k_diffusion import ATOL, GUIDANCE, K, VP_GRID, learned_solver

pytestmark = pytest.mark.usefixtures("one_thread")


class UNetAsComfyModel(torch.nn.Module):
    """A diffusers UNet behind ComfyUI's ``diffusion_model(x, t, context=...)`` call."""

    dtype = torch.float32

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps, context=None, **kwargs):
        return self.unet(x, timesteps, encoder_hidden_states=context).sample


def comfy_model(unet):
    """A ComfyUI ``MODEL`` (ModelPatcher over an SD1.5-scheduled BaseModel, epsilon) around ``unet``,
    latents unscaled (scale factor 1) so they compare with diffusers'."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models_base

    class TinySD15(comfy.supported_models_base.BASE):
        unet_config = {}
        latent_format = comfy.latent_formats.LatentFormat

    model = comfy.model_base.BaseModel(TinySD15({"disable_unet_model_creation": True}), device="cpu")
    model.diffusion_model = UNetAsComfyModel(unet)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def test_node_mappings_name_both_nodes():
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS) == {"ConsistencySolverSampler",
                                                                           "ConsistencySolverSigmas"}
    assert NODE_CLASS_MAPPINGS["ConsistencySolverSampler"].RETURN_TYPES == ("SAMPLER",)
    assert NODE_CLASS_MAPPINGS["ConsistencySolverSigmas"].RETURN_TYPES == ("SIGMAS",)


def test_sampler_custom_with_the_nodes_reproduces_the_scheduler(tmp_path):
    if os.environ.get("CI"):  # the README's test command installs the engine: CI must run this test
        import comfy.samplers as comfy_samplers
    else:
        comfy_samplers = pytest.importorskip("comfy.samplers", reason="ComfyUI's engine (comfy) is not installed")
    import comfy.sample

    from tests.tiny_models import tiny_sd_components

    solver_dir = str(learned_solver(tmp_path / "solver"))
    unet = tiny_sd_components(tmp_path)["unet"]
    model = comfy_model(unet)
    (sampler,) = NODE_CLASS_MAPPINGS["ConsistencySolverSampler"]().get_sampler(solver_dir)
    (sigmas,) = NODE_CLASS_MAPPINGS["ConsistencySolverSigmas"]().get_sigmas(model, solver_dir, K)
    assert isinstance(sampler, comfy_samplers.KSAMPLER)
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 16, 32, generator=gen), torch.randn(1, 16, 32, generator=gen)
    noise = torch.randn(2, 4, 16, 16, generator=gen)
    steps = []
    out = comfy.sample.sample_custom(model, noise, GUIDANCE, sampler, sigmas, [[cond, {}]], [[uncond, {}]],
                                     torch.zeros_like(noise), callback=lambda i, *_: steps.append(i),
                                     disable_pbar=True, seed=0)
    scheduler = ConsistencySolverScheduler.from_pretrained(solver_dir)
    scheduler.set_timesteps(K)
    assert scheduler.timesteps.tolist() == VP_GRID
    x, context = noise.clone(), torch.cat([uncond.expand(2, -1, -1), cond.expand(2, -1, -1)])
    with torch.no_grad():
        for t in scheduler.timesteps:
            u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
            x = scheduler.step(u + GUIDANCE * (c - u), t, x).prev_sample
    assert steps == list(range(K))
    torch.testing.assert_close(out, x, rtol=0, atol=ATOL)
