"""The toy backend's closed-form denoiser against the exact mixture density (autograd),
guidance, sampling, determinism, prompts and resolutions."""

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from consolver.backends import build_backend, toy_scenes
from consolver.backends.toy import ToyBackend
from consolver.config import load_config
from consolver.sampling import sample  # a plain diffusers sampling loop

R = 8


@pytest.fixture(scope="module")
def vp():
    return ToyBackend(renders_per_prompt=R, num_train_prompts=3, num_heldout_prompts=1)


@pytest.fixture(scope="module")
def flow():
    return ToyBackend(renders_per_prompt=R, num_train_prompts=3, num_heldout_prompts=1, schedule="flow")


def reference_score_outputs(backend, x, t, prompt_index=None):
    """``(eps, E[x0|x])`` from autograd of the exact log-density, built the slow way
    (explicit ``B x N x D`` distances, float64): ``eps = -s grad log p_t(x)``."""
    a, s = (float(v) for v in backend.alpha_sigma(t, 1))
    means = backend._means.double()[: backend.num_configured * R]
    if prompt_index is None:
        mu = means.expand(x.shape[0], *means.shape)  # unconditional: every configured component
    else:
        mu = means[prompt_index[:, None] * R + torch.arange(R)]  # [B, R, D]
    var = a * a * backend.component_std**2 + s * s
    x = x.reshape(x.shape[0], -1).double().requires_grad_(True)
    d2 = (x[:, None, :] - a * mu).square().sum(-1)
    logp = torch.logsumexp(-d2 / (2 * var), dim=1) - 0.5 * x.shape[1] * torch.log(torch.tensor(2 * torch.pi * var))
    (grad,) = torch.autograd.grad(logp.sum(), x)
    eps = -s * grad
    return eps, (x.detach() - s * eps) / a


def relative_error(out, ref):
    return float((out.reshape(ref.shape) - ref).norm() / ref.norm())


def _points(backend, t, prompt_index, seed=0):
    """Noisy points around renders at noise level t, plus midpoints between two renders."""
    g = torch.Generator().manual_seed(seed)
    a, s = (float(v) for v in backend.alpha_sigma(t, 1))
    x0 = backend._means.double()[prompt_index * R + torch.randint(R, prompt_index.shape, generator=g)]
    other = backend._means.double()[prompt_index * R + torch.randint(R, prompt_index.shape, generator=g)]
    x0[::2] = 0.5 * (x0[::2] + other[::2])  # between modes: weights far from one-hot
    x = a * x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x.reshape(-1, *backend.latent_shape)


@pytest.mark.parametrize("t", [999, 700, 400, 150, 40, 5, 0])
def test_vp_epsilon_is_exact_score(vp, t):
    cond = vp.encode(vp.prompts() * 2)
    x = _points(vp, t, cond["prompt_index"])
    eps_c, _ = reference_score_outputs(vp, x, t, cond["prompt_index"])
    eps_u, _ = reference_score_outputs(vp, x, t)
    assert relative_error(vp.predict(x, t, cond, 1.0), eps_c) < 1e-4
    assert relative_error(vp.predict(x, t, cond, 0.0), eps_u) < 1e-4
    assert relative_error(vp.predict(x, torch.full((8,), t), cond, 1.0), eps_c) < 1e-4  # [B] timesteps


@pytest.mark.parametrize("sigma", [0.999, 0.8, 0.5, 0.2, 0.05, 0.002])
def test_flow_velocity_is_exact(flow, sigma):
    t = sigma * flow.schedule.num_train_timesteps
    cond = flow.encode(flow.prompts() * 2)
    x = _points(flow, t, cond["prompt_index"])
    for guidance, index in ((1.0, cond["prompt_index"]), (0.0, None)):
        eps, x0 = reference_score_outputs(flow, x, t, index)
        assert relative_error(flow.predict(x, t, cond, guidance), eps - x0) < 1e-4


def test_low_precision_close_to_float64(vp):
    cond = vp.encode(vp.prompts() * 2)
    for t in (900, 300, 20):
        x = _points(vp, t, cond["prompt_index"], seed=1)
        ref = vp.predict(x, t, cond, 3.0)
        out = vp.predict(x.float(), t, cond, 3.0)
        assert out.dtype == torch.float32 and relative_error(out.double(), ref) < 1e-3
    for t in (900, 20, 0):  # half precision in, half out; the logits (~1e6 near the data) stay finite
        x = _points(vp, t, cond["prompt_index"], seed=2)
        out = vp.predict(x.half(), t, cond, 3.0)
        assert out.dtype == torch.float16 and relative_error(out.double(), vp.predict(x.half().double(), t, cond, 3.0)) < 2e-3
        assert torch.equal(vp.component_index(x.half()), vp.component_index(x.half().float()))


def test_guidance(vp):
    cond = vp.encode(vp.prompts()[:2] * 2)
    x = torch.randn(4, *vp.latent_shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = 600
    conditional = reference_score_outputs(vp, x, t, cond["prompt_index"])[0].reshape(x.shape)
    unconditional = vp.predict(x, t, cond, 0.0)
    assert torch.allclose(vp.predict(x, t, cond, 1.0), conditional, rtol=1e-8, atol=1e-10)
    guided = vp.predict(x, t, cond, 3.0)
    assert torch.allclose(guided, unconditional + 3.0 * (conditional - unconditional), rtol=1e-8, atol=1e-10)


def _nearest_render_rms(backend, latents):
    k = backend.component_index(latents)
    flat = latents.reshape(latents.shape[0], -1)
    return k, (flat - backend._means[k].to(flat)).square().mean(1).sqrt()


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_500_step_solve_ends_next_to_a_render(vp, flow, guidance):
    noise = torch.randn(6, *vp.latent_shape, generator=torch.Generator().manual_seed(0))
    ddim = DDIMScheduler(**vp.schedule.diffusers_config(), timestep_spacing="trailing", clip_sample=False)
    euler = FlowMatchEulerDiscreteScheduler(**flow.schedule.diffusers_config())
    for backend, scheduler in ((vp, ddim), (flow, euler)):
        cond = backend.encode(backend.prompts()[:3] * 2)
        x = sample(backend, scheduler, noise, cond, guidance, 500)
        k, rms = _nearest_render_rms(backend, x)
        assert (rms < 2 * backend.component_std).all(), rms  # within the component's own spread
        assert torch.equal(k // R, cond["prompt_index"])  # a render of the sample's own prompt
        dist = torch.cdist(x.reshape(6, -1), backend._means) / x[0].numel() ** 0.5
        assert (dist.topk(2, largest=False).values[:, 1] > 2 * rms).all()  # and clearly not the others


def test_bit_identical(vp):
    other = ToyBackend(renders_per_prompt=R, num_train_prompts=3, num_heldout_prompts=1)
    assert torch.equal(other._means, vp._means)
    cond = vp.encode(vp.prompts())
    x = torch.randn(4, *vp.latent_shape, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([999, 500, 20, 3])
    first, second = vp.predict(x, t, cond, 3.0), other.predict(x, t, other.encode(other.prompts()), 3.0)
    assert torch.equal(first, second) and torch.equal(first, vp.predict(x, t, cond, 3.0))


def test_prompts_and_encode(vp):
    train, heldout = vp.prompts("train"), vp.prompts("heldout")
    assert train == toy_scenes.prompt_list("train", 3) and heldout == toy_scenes.prompt_list("heldout", 1)
    assert vp.prompts() == train + heldout
    cond = vp.encode([train[1], heldout[0]])
    assert cond.batch_size == torch.Size([2]) and cond["prompt_index"].tolist() == [1, 3]
    with pytest.raises(ValueError, match="unknown shape 'hexagon'.*shapes: circle"):
        vp.encode(["a red hexagon on the left"])
    with pytest.raises(ValueError, match="reference images"):
        vp.encode(train[:1], torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="valid splits"):
        vp.prompts("validation")


def test_prompt_outside_configured_set():
    backend = ToyBackend(renders_per_prompt=4, num_train_prompts=2, num_heldout_prompts=0)
    x = torch.randn(1, *backend.latent_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    uncond_before = backend.predict(x, 500, backend.encode(backend.prompts()[:1]), 0.0)
    cond = backend.encode(["a yellow square at the bottom"])
    assert int(cond["prompt_index"]) == 2 and backend.num_components == 12 and len(backend.prompts()) == 2
    assert torch.equal(backend.predict(x, 500, cond, 0.0), uncond_before)  # unconditional: configured set only
    renders = backend.renders("a yellow square at the bottom")
    assert renders.shape == (4, 3, 32, 32)
    same = ToyBackend(renders_per_prompt=4, prompts=["a yellow square at the bottom"]).renders("a yellow square at the bottom")
    assert torch.equal(renders, same)  # a prompt's renders do not depend on the prompt set


def test_component_index_recovers_renders(vp):
    latents = vp._means.reshape(-1, *vp.latent_shape)
    assert torch.equal(vp.component_index(latents), torch.arange(vp.num_components))
    prompt_index = torch.arange(vp.num_components) // R
    noisy = latents + 0.02 * torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(vp.component_index(noisy, prompt_index), torch.arange(vp.num_components))


def test_timestep_validation(vp, flow):
    cond = vp.encode(vp.prompts()[:2])
    x = torch.zeros(2, *vp.latent_shape)
    for bad in (1000, -1, 10.5, torch.tensor([1, 2, 3])):
        with pytest.raises(ValueError, match="timesteps"):
            vp.predict(x, bad, cond, 1.0)
    with pytest.raises(ValueError, match="timesteps"):
        flow.predict(x, 1001.0, flow.encode(flow.prompts()[:2]), 1.0)


def test_resolution_64_and_decode():
    backend = ToyBackend(resolution=64, renders_per_prompt=4, num_train_prompts=2, num_heldout_prompts=1)
    assert backend.latent_shape == (3, 64, 64)
    cond = backend.encode(backend.prompts())
    noise = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    scheduler = DDIMScheduler(**backend.schedule.diffusers_config(), timestep_spacing="trailing", clip_sample=False)
    x = sample(backend, scheduler, noise, cond, 3.0, 30)
    images = backend.decode(x)
    assert images.shape == (3, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    k, rms = _nearest_render_rms(backend, x)
    assert torch.equal(k // 4, cond["prompt_index"]) and (rms < 0.1).all()
    assert torch.allclose(backend.encode_images(backend.decode(x.clamp(-1, 1))), x.clamp(-1, 1), atol=1e-6)


def test_from_config():
    cfg = load_config(None, ["backend.toy.renders_per_prompt=4", "backend.toy.schedule=flow",
                             "backend.toy.num_train_prompts=2", "backend.toy.num_heldout_prompts=1"])
    backend = build_backend(cfg.backend)
    assert isinstance(backend, ToyBackend) and backend.schedule.kind == "flow"
    assert backend.prediction_type == "flow_prediction" and backend.num_components == 12
    meta = backend.meta()
    assert meta["backend"] == "toy" and meta["resolution"] == 32 and meta["toy"]["prompts"] == backend.prompts()


@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_config_meta_is_the_built_backends_meta(schedule):
    """What shards are checked against when no backend is built (ShardDataModule without one)."""
    from consolver.backends import config_meta

    cfg = load_config(None, ["backend.toy.renders_per_prompt=2", f"backend.toy.schedule={schedule}",
                             "backend.toy.num_train_prompts=3", "backend.toy.num_heldout_prompts=2",
                             "backend.resolution=16", "backend.toy.component_std=0.07", "backend.toy.seed=5"])
    meta = build_backend(cfg.backend).meta()
    assert config_meta(cfg.backend) == meta
    assert meta["prediction_type"] == ("epsilon" if schedule == "vp" else "flow_prediction")


def test_check_prompts_parses_without_rendering(vp):
    before = vp.num_components
    vp.check_prompts(["a red circle on the left", "a blue square at the top"])
    assert vp.num_components == before
    with pytest.raises(ValueError, match="unknown color 'mauve'.*Vocabulary"):
        vp.check_prompts(["a red circle on the left", "a mauve circle on the left"])
