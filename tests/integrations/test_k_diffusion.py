"""consolver.integrations.k_diffusion against the k-diffusion package itself (its ``sampling`` and
``external`` modules): with the DDIM table the sampler is ``sample_euler``; a solver with a learned
table and grid, run through k-diffusion's contract and a ``k_diffusion.external`` denoiser wrapper,
reproduces the diffusers scheduler's preview on the toy backend and in a tiny SD1.5 pipeline; its
learned grid as sigmas maps back to the scheduler's timesteps."""

import importlib
import importlib.util
import sys
import warnings

import numpy as np
import pytest
import torch

from consolver.backends.toy import ToyBackend
from consolver.integrations.k_diffusion import load_sampler, load_sigmas, on_learned_grid, sigma_timesteps
from consolver.sampling import sample as solve
from consolver.scheduler import ConsistencySolverScheduler
from consolver.schedules import FlowMatchingSchedule, time_shift

pytestmark = pytest.mark.usefixtures("one_thread")


def import_k_diffusion():
    """``(k_diffusion.sampling, k_diffusion.external)`` of the installed package. Its ``__init__``
    also imports its training and evaluation code, whose CLIP (clip-anytorch) imports
    ``pkg_resources``, gone from setuptools >= 81; the sampler contract lives in these two modules,
    so they are loaded under the package without running its ``__init__``."""
    if "k_diffusion" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            raise ImportError("k-diffusion is not installed: pip install -e '.[test]'")
        sys.modules["k_diffusion"] = importlib.util.module_from_spec(spec)
    return importlib.import_module("k_diffusion.sampling"), importlib.import_module("k_diffusion.external")


kd_sampling, kd_external = import_k_diffusion()

K = 4
TABLE = [[1.0, 0, 0], [1.2, -0.2, 0], [1.1, -0.05, -0.05], [1.5, -0.3, -0.2]]
VP_GRID = [999, 880, 650, 26]
FLOW_GRID = [1.0, 0.7, 0.33, 0.05]  # unshifted sigmas
SHIFT = 3.0
GUIDANCE = 3.0
ATOL = 1e-4  # the same solve in two float32 parametrisations (k-diffusion's x = x_vp / a_t)


def learned_solver(directory, schedule="vp", **config):
    """A solver as training exports one: a coefficient table (order 3) and a learned grid for K=4,
    saved with save_pretrained into ``directory`` (returned)."""
    solver = ConsistencySolverScheduler(solver_order=3, schedule=schedule, **config)
    solver.set_coefficient_tables({K: TABLE})
    solver.set_step_grids({K: VP_GRID if schedule == "vp" else FLOW_GRID})
    solver.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def vp_dir(tmp_path_factory):
    return learned_solver(tmp_path_factory.mktemp("vp_solver"))


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory):
    return learned_solver(tmp_path_factory.mktemp("flow_solver"), "flow", shift=SHIFT)


@pytest.fixture(scope="module")
def toy():
    return ToyBackend(resolution=16, renders_per_prompt=8, num_train_prompts=2, num_heldout_prompts=0)


@pytest.fixture(scope="module")
def toy_flow():
    return ToyBackend(resolution=16, renders_per_prompt=8, num_train_prompts=2, num_heldout_prompts=0,
                      schedule=FlowMatchingSchedule(shift=SHIFT))


class ToyEpsDenoiser(kd_external.DiscreteEpsDDPMDenoiser):
    """k-diffusion's wrapper of a discrete epsilon model (CompVisDenoiser's base) around the toy's
    exact epsilon; records the timesteps the model is called at."""

    def __init__(self, backend, alphas_cumprod):
        super().__init__(backend, alphas_cumprod, quantize=True)
        self.calls = []

    def get_eps(self, x, t, cond, guidance):
        self.calls.append(t[0].item())
        return self.inner_model.predict(x, t, cond, guidance)


class ToyFlowDenoiser(torch.nn.Module):
    """The toy's velocity as a denoiser, as ComfyUI's CONST model sampling: ``x - sigma v``."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, x, sigma, cond, guidance):
        T = self.backend.schedule.num_train_timesteps
        return x - sigma[:, None, None, None] * self.backend.predict(x, sigma * T, cond, guidance)


class FlowModelSampling:
    """ComfyUI's flow model_sampling interface (``ModelSamplingDiscreteFlow``: model time
    ``sigma * 1000``, a static shift; with ``mu``, ``ModelSamplingFlux``'s shift in model time
    ``sigma``)."""

    def __init__(self, shift=1.0, mu=None):
        self.shift, self.mu, self.multiplier = shift, mu, 1.0 if mu is not None else 1000.0

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        return torch.as_tensor(time_shift(timestep / self.multiplier, self.shift, self.mu))


def noise_and_cond(backend, batch=2):
    noise = torch.randn(batch, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    return noise, backend.encode(backend.prompts()[:batch])


def kd_start(noise, sigmas):
    """The diffusers start ``x_T = noise`` in k-diffusion's scale (ComfyUI's full-denoise scaling)."""
    return noise * (1.0 + sigmas[0] ** 2) ** 0.5


# ------------------------------------------------------------------------------ DDIM is sample_euler
@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_ddim_is_k_diffusion_sample_euler_with_the_same_callbacks(toy, toy_flow, schedule):
    solver = ConsistencySolverScheduler(schedule=schedule)  # no learned table: DDIM (VP) / Euler (flow)
    if schedule == "vp":
        model, sigmas = ToyEpsDenoiser(toy, solver.alphas_cumprod), kd_sampling.get_sigmas_karras(6, 0.03, 14.6)
    else:
        model, sigmas = ToyFlowDenoiser(toy_flow), torch.linspace(1.0, 0.0, 7) ** 1.5
    noise, cond = noise_and_cond(toy)
    x, extra = noise * sigmas[0], {"cond": cond, "guidance": GUIDANCE}
    ours, theirs = [], []
    out = load_sampler(solver)(model, x, sigmas, extra_args=extra, callback=ours.append, disable=True)
    ref = kd_sampling.sample_euler(model, x, sigmas, extra_args=extra, callback=theirs.append, disable=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (out - x).abs().max() > 0.1
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys() == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert a["i"] == b["i"] and float(a["sigma"]) == float(b["sigma"]) == float(a["sigma_hat"])
        torch.testing.assert_close(a["denoised"], b["denoised"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ a learned solver
def test_learned_solver_reproduces_the_scheduler_preview_on_the_toy(toy, vp_dir):
    scheduler = ConsistencySolverScheduler.from_pretrained(vp_dir)
    noise, cond = noise_and_cond(toy)
    preview = solve(toy, scheduler, noise, cond, GUIDANCE, K)
    model = ToyEpsDenoiser(toy, scheduler.alphas_cumprod)
    sigmas = load_sigmas(vp_dir, K, model_sampling=model)
    out = load_sampler(vp_dir)(model, kd_start(noise, sigmas), sigmas, extra_args={"cond": cond, "guidance": GUIDANCE},
                               disable=True)
    torch.testing.assert_close(out, preview, rtol=0, atol=ATOL)
    assert model.calls == VP_GRID  # the model ran on the learned grid
    ddim = solve(toy, ConsistencySolverScheduler(timestep_spacing="trailing"), noise, cond, GUIDANCE, K)
    assert (preview - ddim).abs().max() > 100 * ATOL  # the table and grid matter at this tolerance


def test_learned_flow_solver_reproduces_the_scheduler_preview_on_the_toy(toy_flow, flow_dir):
    scheduler = ConsistencySolverScheduler.from_pretrained(flow_dir)
    noise, cond = noise_and_cond(toy_flow)
    preview = solve(toy_flow, scheduler, noise, cond, GUIDANCE, K)
    sigmas = load_sigmas(flow_dir, K, model_sampling=FlowModelSampling(SHIFT))
    out = load_sampler(flow_dir)(ToyFlowDenoiser(toy_flow), noise * sigmas[0], sigmas,
                                 extra_args={"cond": cond, "guidance": GUIDANCE}, disable=True)
    torch.testing.assert_close(out, preview, rtol=0, atol=ATOL)


@pytest.mark.parametrize("sample_features", [False, True])
def test_a_solver_carrying_its_policy_reproduces_the_scheduler(toy, sample_features):
    """Solvers exported with a policy instead of tables: compiled on the sigmas' grid, or acting
    step by step on the model-output history."""
    from consolver.policy.actor import SampleMLPPolicy
    from consolver.policy.base import TimeMLPPolicy

    torch.manual_seed(0)
    policy = (SampleMLPPolicy(order=2, distribution="gaussian", offsets=[[0.0]], init_std=0.1, hidden=8,
                              implied="oldest", base=[0.0]) if sample_features else TimeMLPPolicy(order=3, hidden=16))
    for p in policy.parameters():
        torch.nn.init.normal_(p, std=0.3)
    scheduler = ConsistencySolverScheduler(solver_order=policy.order)
    scheduler.attach_policy(policy)
    noise, cond = noise_and_cond(toy)
    preview = solve(toy, scheduler, noise, cond, GUIDANCE, 5)
    model = ToyEpsDenoiser(toy, scheduler.alphas_cumprod)
    sigmas = load_sigmas(scheduler, 5)
    out = load_sampler(scheduler)(model, kd_start(noise, sigmas), sigmas, extra_args={"cond": cond, "guidance": GUIDANCE},
                                  disable=True)
    torch.testing.assert_close(out, preview, rtol=0, atol=ATOL)
    ddim = solve(toy, ConsistencySolverScheduler(), noise, cond, GUIDANCE, 5)
    assert (preview - ddim).abs().max() > 100 * ATOL


class UNetEpsDenoiser(kd_external.DiscreteEpsDDPMDenoiser):
    """k-diffusion's discrete-epsilon wrapper around a diffusers UNet with classifier-free guidance
    as StableDiffusionPipeline batches it ([uncond; cond] in one call)."""

    def __init__(self, unet, alphas_cumprod):
        super().__init__(unet, alphas_cumprod, quantize=True)

    def get_eps(self, x, t, cond, uncond, guidance):
        out = self.inner_model(torch.cat([x, x]), t[0], encoder_hidden_states=torch.cat([uncond, cond])).sample
        u, c = out.chunk(2)
        return u + guidance * (c - u)


def test_learned_solver_reproduces_a_tiny_sd15_pipeline_preview(tmp_path, vp_dir):
    from tests.tiny_models import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path, ConsistencySolverScheduler.from_pretrained(vp_dir))
    prompts = ["a red apple", "a dog"]
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        preview = pipe(prompts, num_inference_steps=K, guidance_scale=GUIDANCE, latents=noise, output_type="latent").images
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
    model = UNetEpsDenoiser(pipe.unet, pipe.scheduler.alphas_cumprod)
    sigmas = load_sigmas(vp_dir, K, model_sampling=model)
    out = load_sampler(vp_dir)(model, kd_start(noise, sigmas), sigmas,
                               extra_args={"cond": cond, "uncond": uncond, "guidance": GUIDANCE}, disable=True)
    torch.testing.assert_close(out, preview, rtol=0, atol=ATOL)
    assert (out - noise).abs().max() > 0.1


# ------------------------------------------------------------------------------ sigmas
def test_learned_grid_as_sigmas_round_trips_to_the_scheduler_timesteps(vp_dir):
    scheduler = ConsistencySolverScheduler.from_pretrained(vp_dir)
    scheduler.set_timesteps(K)
    sigmas = load_sigmas(vp_dir, K)
    assert sigmas.dtype == torch.float32 and sigmas[-1] == 0
    torch.testing.assert_close(sigmas, scheduler.sigmas)  # the scheduler's rho grid
    schedule = kd_external.DiscreteSchedule(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5, False)
    assert schedule.sigma_to_t(sigmas[:-1], quantize=True).tolist() == scheduler.timesteps.tolist() == VP_GRID
    np.testing.assert_allclose(schedule.sigma_to_t(sigmas[:-1]).numpy(), VP_GRID, atol=1e-3)
    np.testing.assert_allclose(sigma_timesteps(scheduler, sigmas), VP_GRID + [-1], atol=1e-3)
    from_model = load_sigmas(vp_dir, K, model_sampling=schedule)  # the host's own float32 sigmas
    assert torch.equal(from_model[:-1], schedule.sigmas[VP_GRID]) and from_model[-1] == 0


def test_a_vp_solver_ending_at_abar0_ends_its_sigmas_there(tmp_path):
    scheduler = ConsistencySolverScheduler.from_pretrained(learned_solver(tmp_path, set_alpha_to_one=False))
    sigmas = load_sigmas(scheduler, K)
    rho0 = float(scheduler.vp_schedule.rho(0))
    assert sigmas[-1].item() == pytest.approx(rho0, rel=1e-6) and 0.02 < rho0 < 0.04
    assert sigma_timesteps(scheduler, sigmas)[-1] == -1 and on_learned_grid(scheduler, sigmas)


def test_flow_sigmas_are_the_shifted_learned_grid(flow_dir):
    scheduler = ConsistencySolverScheduler.from_pretrained(flow_dir)
    scheduler.set_timesteps(K)
    sigmas = load_sigmas(flow_dir, K)
    torch.testing.assert_close(sigmas, scheduler.sigmas)
    torch.testing.assert_close(sigmas[:-1], torch.tensor(time_shift(np.array(FLOW_GRID), SHIFT), dtype=torch.float32))
    torch.testing.assert_close(load_sigmas(flow_dir, K, model_sampling=FlowModelSampling(SHIFT)), sigmas)
    np.testing.assert_allclose(sigma_timesteps(scheduler, sigmas)[:-1], scheduler.timesteps.numpy(), rtol=1e-6)
    assert on_learned_grid(scheduler, sigmas)
    assert not on_learned_grid(scheduler, load_sigmas(flow_dir, K, model_sampling=FlowModelSampling(1.0)))


def test_a_dynamically_shifted_solver_takes_mu_or_the_model_sampling(tmp_path):
    scheduler = ConsistencySolverScheduler.from_pretrained(learned_solver(tmp_path, "flow", use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="pass `mu`"):
        load_sigmas(scheduler, K)
    scheduler.set_timesteps(K, mu=0.8)
    sigmas = load_sigmas(scheduler, K, mu=0.8)
    torch.testing.assert_close(sigmas, scheduler.sigmas)
    torch.testing.assert_close(load_sigmas(scheduler, K, model_sampling=FlowModelSampling(mu=0.8)), sigmas)
    assert on_learned_grid(scheduler, sigmas) and on_learned_grid(scheduler, load_sigmas(scheduler, K, mu=1.1))


# ------------------------------------------------------------------------------ errors and warnings
def test_a_k_the_solver_lacks_is_an_error_naming_the_k_it_has(toy, vp_dir):
    sample = load_sampler(vp_dir)
    model = ToyEpsDenoiser(toy, ConsistencySolverScheduler().alphas_cumprod)
    noise, cond = noise_and_cond(toy)
    with pytest.raises(ValueError, match=r"no coefficient table for K=5 steps.*tables for K in 4"):
        sample(model, noise, kd_sampling.get_sigmas_karras(5, 0.03, 14.6), extra_args={"cond": cond, "guidance": 1.0})
    with pytest.raises(ValueError, match=r"no coefficient table for K=6 steps.*tables for K in 4"):
        load_sigmas(vp_dir, 6)
    assert model.calls == []
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(model, noise, torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match=r"discrete sigmas `sigmas` \[1000\]"):
        load_sigmas(vp_dir, K, model_sampling=object())
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sampler(vp_dir / "missing")


def test_sigmas_off_the_learned_grid_warn_once(toy, vp_dir):
    sample = load_sampler(vp_dir)
    model = ToyEpsDenoiser(toy, ConsistencySolverScheduler().alphas_cumprod)
    noise, cond = noise_and_cond(toy, batch=1)
    extra = {"cond": cond, "guidance": 1.0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample(model, noise, load_sigmas(vp_dir, K, model_sampling=model), extra_args=extra, disable=True)
        assert caught == []  # the learned grid: no warning
        karras = kd_sampling.get_sigmas_karras(K, 0.03, 14.6)
        for _ in range(2):
            sample(model, noise * karras[0], karras, extra_args=extra, disable=True)
    assert len(caught) == 1 and caught[0].category is UserWarning
    assert "solving on the 5 sigmas given, not on a learned step grid" in str(caught[0].message)
    assert "learned grids for K in [4]" in str(caught[0].message)
