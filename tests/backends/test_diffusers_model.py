"""The generic ``diffusers`` backend on tiny randomly initialised models of the real classes
(UNet2DModel in pixel space, unconditional and class-conditional; UNet2DModel + VQModel /
AutoencoderKL; DiTTransformer2DModel + AutoencoderKL), each saved with ``save_pretrained`` as a
pipeline directory and loaded through ``backend.model`` exactly as a user's download is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from consolver.backends import build_backend
from consolver.backends.diffusers_model import DiffusersModelBackend
from consolver.backends.model_source import BackendModelNotFoundError
from consolver.config import ConfigError, load_config
from tests.tiny_models import TINY_ID2LABEL, tiny_ddpm_dir, tiny_dit_dir, tiny_ldm_dir

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Pipeline directories of every supported family, built once."""
    tmp = tmp_path_factory.mktemp("diffusers_models")
    return {
        "ddpm": tiny_ddpm_dir(tmp / "ddpm"),
        # the toy world's trained-model layout: DDPMPipeline dir, SD1.5 betas, id2label in model_index.json
        "classes": tiny_ddpm_dir(tmp / "classes", num_class_embeds=6, sd15_betas=True),
        "ldm_vq": tiny_ldm_dir(tmp / "ldm_vq", "vq"),
        "ldm_kl": tiny_ldm_dir(tmp / "ldm_kl", "kl"),
        "dit": tiny_dit_dir(tmp / "dit"),
    }


@pytest.fixture(scope="module")
def backends(dirs):
    return {name: DiffusersModelBackend(str(path), device="cpu") for name, path in dirs.items()}


def noise(backend, n=2, seed=1):
    return torch.randn(n, *backend.latent_shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- loading

@pytest.mark.parametrize("name,shape,res,conditional,null", [
    ("ddpm", (3, 8, 8), 8, False, None), ("classes", (3, 8, 8), 8, True, 5), ("ldm_vq", (3, 8, 8), 16, False, None),
    ("ldm_kl", (3, 8, 8), 16, False, None), ("dit", (4, 8, 8), 16, True, 1000)])
def test_the_pipeline_directory_decides_the_classes_shapes_and_null_class(backends, name, shape, res, conditional, null):
    b = backends[name]
    assert b.latent_shape == shape and b.resolution == res
    assert b.conditional == conditional and b.null_class == null
    assert b.prediction_type == "epsilon" and b.schedule.kind == "vp"
    modules = [m for m in (b.denoiser, b.autoencoder) if m is not None]
    assert not any(p.requires_grad for m in modules for p in m.parameters())
    assert {"ldm_vq": "VQModel", "ldm_kl": "AutoencoderKL", "dit": "AutoencoderKL"}.get(name) == (
        type(b.autoencoder).__name__ if b.autoencoder is not None else None)
    meta = b.meta()
    assert meta["backend"] == "diffusers" and meta["latent_shape"] == list(shape) and meta["resolution"] == res


def test_the_schedule_comes_from_the_scheduler_config(backends):
    from consolver.schedules import VPSchedule

    torch.testing.assert_close(backends["classes"].schedule.alphas_cumprod, VPSchedule.sd15().alphas_cumprod)
    cifar = VPSchedule.from_betas("linear", 0.0001, 0.02, 1000, True)
    torch.testing.assert_close(backends["ddpm"].schedule.alphas_cumprod, cifar.alphas_cumprod)


def test_built_from_config_and_resolution_must_be_the_models(dirs):
    cfg = load_config(ROOT / "conf" / "cifar10_ddpm.yaml", [f"backend.model={dirs['ddpm']}", "backend.resolution=8",
                                                            "backend.device=cpu"])
    backend = build_backend(cfg.backend)
    assert isinstance(backend, DiffusersModelBackend) and backend.resolution == 8
    from consolver.backends import config_meta

    assert {k: backend.meta()[k] for k in config_meta(cfg.backend)} == config_meta(cfg.backend)
    with pytest.raises(ValueError, match=r"backend.resolution=32 but .* generates 8 px .*set backend.resolution=8"):
        DiffusersModelBackend(str(dirs["ddpm"]), resolution=32, device="cpu")


# ---------------------------------------------------------------- the model call equals the pipeline's

def test_unconditional_unet_equals_ddpm_pipeline_model_call(backends, dirs):
    from diffusers import DDPMPipeline

    b = backends["ddpm"]
    pipe = DDPMPipeline.from_pretrained(dirs["ddpm"])
    x = noise(b)
    cond = b.encode(["none", "unconditional"])
    assert cond["class_labels"].tolist() == [-1, -1]
    for t in (999, 500, 3):
        want = pipe.unet(x, t).sample
        torch.testing.assert_close(b.predict(x, torch.tensor(t), cond, 1.0), want, rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match="unconditional: guidance=3.0 is ignored"):
        b._warned_guidance = False
        got = b.predict(x, 500, cond, 3.0)
    torch.testing.assert_close(got, pipe.unet(x, 500).sample, rtol=0, atol=1e-6)
    # pixel space: decode is the pipeline's [-1, 1] -> [0, 1]
    torch.testing.assert_close(b.decode(x), (x / 2 + 0.5).clamp(0, 1))


def test_class_conditional_unet_guides_with_its_last_class_embedding(backends, dirs):
    from diffusers import UNet2DModel

    b = backends["classes"]
    unet = UNet2DModel.from_pretrained(dirs["classes"], subfolder="unet")
    x = noise(b)
    cond = b.encode(["crimson disc", "TABBY"])  # synonyms, any case
    labels = torch.tensor([0, 3])
    assert cond["class_labels"].tolist() == [0, 3]
    null = torch.full((2,), 5)  # num_class_embeds - 1 (class 4 has no name: ids work)
    for t, g in ((801, 3.0), (121, 7.5)):
        out = unet(torch.cat([x, x]), t, class_labels=torch.cat([null, labels])).sample
        u, c = out.chunk(2)
        torch.testing.assert_close(b.predict(x, t, cond, g), u + g * (c - u), rtol=0, atol=1e-5)
    # guidance 1: the conditional branch alone; the classes really change the output
    torch.testing.assert_close(b.predict(x, 500, cond, 1.0), unet(x, 500, class_labels=labels).sample, rtol=0, atol=1e-6)
    assert float((b.predict(x, 500, b.encode(["2", "2"]), 1.0) - b.predict(x, 500, cond, 1.0)).abs().max()) > 1e-3
    # "none" is the null class; backend.null_class moves it
    assert b.encode(["none"])["class_labels"].tolist() == [5]
    other = DiffusersModelBackend(str(dirs["classes"]), device="cpu", null_class=4, resolution=8)
    out = unet(torch.cat([x, x]), 300, class_labels=torch.tensor([4, 4, 0, 3])).sample
    u, c = out.chunk(2)
    torch.testing.assert_close(other.predict(x, 300, other.encode(["red circle", "tabby cat"]), 2.0), u + 2 * (c - u),
                               rtol=0, atol=1e-5)


def test_null_class_rows_skip_the_doubled_batch_and_equal_guided_output(backends, dirs, monkeypatch):
    """Prompt ``none`` under guidance: cond = uncond, so the guided output is the null-class output;
    the backend makes one plain call (half the cost) and gets the same numbers."""
    from diffusers import UNet2DModel

    b = backends["classes"]
    unet = UNet2DModel.from_pretrained(dirs["classes"], subfolder="unet")
    x = noise(b, n=3)
    cond = b.encode(["none"] * 3)
    sizes = []
    forward = b._forward
    monkeypatch.setattr(b, "_forward", lambda sample, steps, labels: sizes.append(sample.shape[0]) or forward(
        sample, steps, labels))
    out = b.predict(x, 640, cond, 2.0)
    null = torch.full((3,), 5)
    doubled = unet(torch.cat([x, x]), 640, class_labels=torch.cat([null, null])).sample
    u, c = doubled.chunk(2)
    torch.testing.assert_close(out, u + 2.0 * (c - u), rtol=0, atol=1e-5)
    assert sizes == [3]  # one plain call, not a doubled batch
    b.predict(x, 640, b.encode(["none", "red circle", "none"]), 2.0)
    assert sizes == [3, 6]  # a mixed batch still guides in one doubled batch


@pytest.mark.parametrize("name", ["ldm_vq", "ldm_kl"])
def test_latent_unet_equals_the_ldm_pipelines_model_call_and_decode(backends, dirs, name):
    from diffusers import AutoencoderKL, UNet2DModel, VQModel

    b = backends[name]
    unet = UNet2DModel.from_pretrained(dirs[name], subfolder="unet")
    x = noise(b)
    torch.testing.assert_close(b.predict(x, 640, b.encode(["none", "none"]), 1.0), unet(x, 640).sample, rtol=0, atol=1e-6)
    if name == "ldm_vq":  # LDMPipeline: latents / scaling_factor, VQModel.decode (quantises)
        vae = VQModel.from_pretrained(dirs[name], subfolder="vqvae")
    else:
        vae = AutoencoderKL.from_pretrained(dirs[name], subfolder="vae")
    want = (vae.decode(x / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert vae.config.scaling_factor != 1.0
    images = b.decode(x)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    torch.testing.assert_close(images, want, rtol=0, atol=1e-6)


def dit_pipeline_step(pipe, x, t, class_ids, guidance):
    """What DiTPipeline.__call__ computes at one step: [cond; null(1000)] in one transformer
    batch, guidance on the epsilon half, the learned-sigma half dropped."""
    C = pipe.transformer.config.in_channels
    labels = torch.cat([torch.tensor(class_ids), torch.full((len(class_ids),), 1000)])
    with torch.no_grad():
        out = pipe.transformer(torch.cat([x, x]), timestep=torch.tensor([t]).expand(2 * len(x)), class_labels=labels).sample
    eps = out[:, :C]
    cond_eps, uncond_eps = eps.chunk(2)
    return uncond_eps + guidance * (cond_eps - uncond_eps)


def test_dit_equals_the_dit_pipelines_guided_epsilon(backends, dirs):
    from diffusers import DiTPipeline

    b = backends["dit"]
    pipe = DiTPipeline.from_pretrained(dirs["dit"])
    assert pipe.transformer.config.out_channels == 2 * b.latent_shape[0]  # learned sigma
    x = noise(b)
    cond = b.encode(["blue square", "tabby cat"])
    for t, g in ((999, 1.5), (250, 4.0)):
        torch.testing.assert_close(b.predict(x, t, cond, g), dit_pipeline_step(pipe, x, t, [1, 3], g), rtol=0, atol=1e-5)
    want = (pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(b.decode(x), want, rtol=0, atol=1e-6)


def test_a_legacy_transformer2dmodel_dit_loads_as_dit(backends, dirs, tmp_path):
    """The hub's DiT-XL-2-256 names its transformer Transformer2DModel (ada_norm_zero), with that
    class's extra config keys: it loads as the same DiT and predicts the same."""
    from tests.tiny_models import add_to_model_index

    path = tmp_path / "legacy"
    shutil.copytree(dirs["dit"], path)
    config_path = path / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(_class_name="Transformer2DModel", cross_attention_dim=None, num_vector_embeds=None,
                  only_cross_attention=False, use_linear_projection=False, double_self_attention=False)
    config_path.write_text(json.dumps(config))
    add_to_model_index(path, transformer=["diffusers", "Transformer2DModel"])
    legacy = DiffusersModelBackend(str(path), device="cpu")
    assert type(legacy.denoiser).__name__ == "DiTTransformer2DModel" and legacy.null_class == 1000
    x = noise(legacy)
    cond = legacy.encode(["blue square", "green triangle"])
    torch.testing.assert_close(legacy.predict(x, 500, cond, 1.5), backends["dit"].predict(x, 500, cond, 1.5), rtol=0, atol=0)


def test_unsupported_denoiser_class_is_named(dirs, tmp_path):
    from tests.tiny_models import add_to_model_index

    path = tmp_path / "other"
    shutil.copytree(dirs["ddpm"], path)
    add_to_model_index(path, unet=["diffusers", "UNet2DConditionModel"])
    with pytest.raises(ValueError, match=r"has a UNet2DConditionModel as its denoiser \(unet/\); supported: UNet2DModel"):
        DiffusersModelBackend(str(path), device="cpu")


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_v_and_sample_prediction_models_return_epsilon(dirs, tmp_path, prediction_type):
    from diffusers import UNet2DModel

    path = tmp_path / prediction_type
    shutil.copytree(dirs["ddpm"], path)
    config_path = path / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), prediction_type=prediction_type)))
    b = DiffusersModelBackend(str(path), device="cpu")
    assert b.model_prediction_type == prediction_type and b.prediction_type == "epsilon"
    unet = UNet2DModel.from_pretrained(path, subfolder="unet")
    x = noise(b)
    raw = unet(x, 601).sample
    a, s = (float(z) for z in b.schedule.alpha_sigma(601))
    want = s * x + a * raw if prediction_type == "v_prediction" else (x - a * raw) / s
    torch.testing.assert_close(b.predict(x, 601, b.encode(["none"] * 2), 1.0), want, rtol=1e-5, atol=1e-5)


def test_half_precision_weights_with_float32_outputs(dirs, backends):
    half = DiffusersModelBackend(str(dirs["dit"]), device="cpu", dtype="bfloat16")
    assert {p.dtype for m in (half.denoiser, half.autoencoder) for p in m.parameters()} == {torch.bfloat16}
    x = noise(half)
    got = half.predict(x, 701, half.encode(["blue square", "none"]), 1.5)
    ref = backends["dit"].predict(x, 701, half.encode(["blue square", "none"]), 1.5)
    assert got.dtype == torch.float32 and float((got - ref).norm() / ref.norm()) < 0.05
    images = half.decode(x)
    assert images.dtype == torch.float32 and 0 <= float(images.min()) and float(images.max()) <= 1


def test_chunked_decode_equals_unchunked(backends):
    b = backends["ldm_kl"]
    x = noise(b, n=5, seed=3)
    b.decode_chunk = 2
    try:
        chunked = b.decode(x)
    finally:
        b.decode_chunk = 8
    torch.testing.assert_close(chunked, b.decode(x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- conditions and errors

def test_class_names_ids_and_none(backends):
    b = backends["dit"]
    assert b.class_ids(["red circle", "crimson disc", "Blue Square", "3", "none", "", "Unconditional"]).tolist() == [
        0, 0, 1, 3, 1000, 1000, 1000]
    assert b.prompts() == ["red circle", "blue square", "green triangle", "tabby cat"]
    assert backends["ddpm"].prompts() == ["none"]


def test_toy_world_style_labels_with_commas_and_a_labelled_null_class(dirs, tmp_path):
    """A class-conditional DDPMPipeline dir (SD1.5 betas) whose id2label holds whole prompts, some
    with commas, and names the null class 'unconditional': whole prompts and their parts resolve."""
    from tests.tiny_models import add_to_model_index

    path = tmp_path / "toy"
    shutil.copytree(dirs["classes"], path)
    id2label = {"0": "a red circle on the left", "1": "a blue square, small", "5": "unconditional"}
    add_to_model_index(path, id2label=id2label)
    b = DiffusersModelBackend(str(path), device="cpu")
    assert b.class_ids(["a red circle on the left", "a blue square, small", "a blue square", "unconditional"]).tolist() == [
        0, 1, 1, 5]
    assert b.prompts() == ["a red circle on the left", "a blue square"]
    add_to_model_index(path, labels={"a blue square, small": 1, "a red circle on the left": 0})
    assert DiffusersModelBackend(str(path), device="cpu").prompts() == ["a red circle on the left", "a blue square, small"]


def test_bad_class_name_lists_valid_ones(backends):
    with pytest.raises(ValueError, match=r"unknown class name 'tabby dog' .*closest: 'tabby'.*Valid names include "
                                         r"'red circle', 'crimson disc'"):
        backends["dit"].encode(["tabby dog"])
    with pytest.raises(ValueError, match=r"class id 1000 is not a class .*valid ids are 0..1000 except the null class"):
        backends["dit"].encode(["1000"])
    with pytest.raises(ValueError, match=r"is an unconditional model: its only condition is 'none'"):
        backends["ddpm"].encode(["red circle"])
    from consolver.backends.class_labels import ClassConditions

    unnamed = ClassConditions(6, 5, {}, "m")
    assert unnamed.class_id("4") == 4 and unnamed.class_id("none") == 5
    with pytest.raises(ValueError, match=r"'m' has no class names .*write class ids 0..5 \(except the null class 5\)"):
        unnamed.class_id("cat")
    from consolver.data.prompts import PromptRecord
    from consolver.data.writer import check_prompts

    with pytest.raises(ConfigError, match=r"prompt 1 of data.prompts='x.txt' cannot be used: unknown class name 'purple'"):
        check_prompts(backends["classes"], [PromptRecord("blue square"), PromptRecord("purple")], "x.txt")


def test_offline_without_a_local_copy_names_the_id_and_backend_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(ROOT / "conf" / "dit_imagenet256.yaml", ["backend.model=nobody-here/no-such-dit", "backend.device=cpu"])
    with pytest.raises(BackendModelNotFoundError) as err:
        build_backend(cfg.backend)
    message = str(err.value)
    assert "'nobody-here/no-such-dit' could not be found offline" in message, message
    assert "`backend.model`" in message and "local directory" in message


def test_missing_or_incomplete_local_directory_names_backend_model(tmp_path, dirs):
    with pytest.raises(BackendModelNotFoundError, match=r"does not exist; set the config key `backend.model`"):
        DiffusersModelBackend(str(tmp_path / "no" / "such" / "dir"), device="cpu")
    partial = tmp_path / "partial"
    shutil.copytree(dirs["dit"], partial, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(BackendModelNotFoundError, match=r"is not a diffusers pipeline directory: it lacks vae/"):
        DiffusersModelBackend(str(partial), device="cpu")
    pickled = tmp_path / "pickled"
    shutil.copytree(dirs["ddpm"], pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(BackendModelNotFoundError, match=r"could not load the local pipeline directory .*safetensors only"):
        DiffusersModelBackend(str(pickled), device="cpu")


def test_null_class_is_a_diffusers_key():
    with pytest.raises(ConfigError, match=r"backend.null_class=3 .* read only by backend.name=diffusers"):
        load_config(ROOT / "conf" / "sd15_depth.yaml", ["backend.null_class=3"])
    with pytest.raises(ConfigError, match=r"backend.null_class=-1 must be a class id >= 0"):
        load_config(ROOT / "conf" / "dit_imagenet256.yaml", ["backend.null_class=-1"])
    assert load_config(ROOT / "conf" / "dit_imagenet256.yaml", ["backend.null_class=7"]).backend.null_class == 7


def test_null_class_outside_the_embedding_is_refused(dirs):
    with pytest.raises(ValueError, match=r"backend.null_class=6 is not a row of .*class embedding \(0..5\)"):
        DiffusersModelBackend(str(dirs["classes"]), device="cpu", null_class=6)
    with pytest.raises(ValueError, match=r"name ids that are not classes .*'green triangle': 2"):
        DiffusersModelBackend(str(dirs["classes"]), device="cpu", null_class=2)
    with pytest.raises(ValueError, match=r"unconditional UNet2DModel"):
        DiffusersModelBackend(str(dirs["ddpm"]), device="cpu", null_class=0)


# ---------------------------------------------------------------- learned grids: d(preview)/d(grid logits)

def grid_preview_loss(backend, cond, x0, logits, guidance, weights, integer=True):
    """A fixed scalar of the K-step preview (AB2 after the first step) solved on the grid of
    ``logits [K-1]`` (float64) by :class:`~consolver.solvers.batched.GridSolve`, exactly as the
    training environment solves a learned grid; ``integer=False`` keeps the positions real (no
    straight-through rounding) so the function is smooth and a finite difference is its derivative."""
    from consolver.algos.base import solver_scheduler
    from consolver.solvers.batched import GridSolve

    scheduler = solver_scheduler(load_config(None, ["solver.order=2"]), backend.schedule)
    solve = GridSolve(scheduler)
    solve.integer = integer
    K, N = logits.shape[0] + 1, x0.shape[0]
    t = solve.start(K, float(scheduler.step_positions(K)[0]), N, x0.device)
    x = x0
    for i in range(K):
        w = torch.tensor([1.0, 0.0] if i == 0 else [1.5, -0.5]).expand(N, 2)
        z = logits[i].expand(N) if i < K - 1 else torch.zeros(N, dtype=torch.float64)
        x, t = solve.step(x, backend.predict(x, t, cond, guidance), w, z)
    return (x * weights).sum()


def start_logits(backend, K=3):
    from consolver.solvers.grid import logits_from_grid

    trailing = np.append(backend.schedule.timesteps(K, "trailing"), -1)
    return logits_from_grid(trailing, 1.0) + 0.3


def check_grid_gradient(backend, prompts, guidance, h=2e-3, tolerance=0.05):
    """Autograd d(loss)/d(logits) through the backend (t differentiable) equals a finite difference
    (4-point central stencil; the real-valued solve, see :func:`grid_preview_loss`), and differs
    from the gradient with t detached at the model, so d(model)/dt is what makes them agree.
    Returns ``(error, error with t detached at the model)``, relative to the finite difference."""
    x0 = torch.randn(len(prompts), *backend.latent_shape, generator=torch.Generator().manual_seed(7))
    weights = torch.randn(x0.shape, generator=torch.Generator().manual_seed(8))
    cond = backend.encode(prompts)
    # the tiny model's time embedding matters: d(output)/dt is not zero
    t = torch.tensor([400.0] * len(prompts), requires_grad=True)
    (dt,) = torch.autograd.grad((backend.predict(x0, t, cond, guidance) * weights).sum(), t)
    assert float(dt.abs().min()) > 1e-6, dt
    loss = lambda z: grid_preview_loss(backend, cond, x0, z, guidance, weights, integer=False)  # noqa: E731
    backend.integer_timesteps = False
    try:
        z = start_logits(backend).requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(z), z)
        fd = torch.zeros_like(grad)
        with torch.no_grad():
            for j in range(len(z)):
                e = torch.zeros_like(z)
                e[j] = h
                fd[j] = (8 * (loss(z + e) - loss(z - e)) - (loss(z + 2 * e) - loss(z - 2 * e))) / (12 * h)
        original = backend.predict
        backend.predict = lambda x, t, c, g: original(x, torch.as_tensor(t).detach(), c, g)
        try:
            (schedule_only,) = torch.autograd.grad(loss(z), z)
        finally:
            del backend.predict
    finally:
        backend.integer_timesteps = True
    error = float((grad - fd).norm() / fd.norm())
    without_model_t = float((schedule_only - fd).norm() / fd.norm())
    assert error < tolerance, (grad, fd)
    assert without_model_t > 4 * max(error, tolerance / 2), (schedule_only, grad, fd)
    # the straight-through rounded solve (what training runs) also reaches the model's time embedding
    z = start_logits(backend).requires_grad_(True)
    (st,) = torch.autograd.grad(grid_preview_loss(backend, cond, x0, z, guidance, weights), z)
    assert torch.isfinite(st).all() and float(st.abs().min()) > 0
    return error, without_model_t


@pytest.mark.slow
@pytest.mark.parametrize("name,prompts,guidance", [
    ("ddpm", ["none", "none"], 1.0), ("classes", ["red circle", "blue square"], 2.0),
    ("dit", ["tabby cat", "green triangle"], 1.5)])
def test_grid_gradient_through_the_diffusers_backend_matches_finite_differences(backends, name, prompts, guidance):
    check_grid_gradient(backends[name], prompts, guidance)


@pytest.fixture(scope="module")
def sd15_backend(tmp_path_factory):
    from diffusers import PNDMScheduler

    from consolver.backends.sd15 import SD15Backend
    from tests.tiny_models import tiny_sd_pipeline

    tmp = tmp_path_factory.mktemp("sd15_grad")
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                              skip_prk_steps=True, steps_offset=1)
    tiny_sd_pipeline(tmp / "build", scheduler).save_pretrained(tmp / "pipe", safe_serialization=True)
    return SD15Backend(str(tmp / "pipe"), resolution=32, device="cpu")


@pytest.mark.slow
def test_grid_gradient_through_the_sd15_backend_matches_finite_differences(sd15_backend):
    check_grid_gradient(sd15_backend, ["a red apple", "a dog"], 3.0, h=1e-3)


def test_v_prediction_conversion_is_differentiable_in_t():
    """eps = s(t) x + a(t) v (sd15 and diffusers backends): the noise levels take t's gradient too."""
    from consolver.backends.timesteps import epsilon_from
    from consolver.schedules import VPSchedule

    schedule = VPSchedule.sd15()
    x = torch.randn(2, 4, 4, 4)
    v = torch.randn(2, 4, 4, 4)
    t = torch.tensor([300.0, 301.0], requires_grad=True)
    out = epsilon_from("v_prediction", v, x, t, schedule)
    a, s = schedule.alpha_sigma(torch.tensor([300, 301]))
    torch.testing.assert_close(out, s.float().view(2, 1, 1, 1) * x + a.float().view(2, 1, 1, 1) * v)
    (g,) = torch.autograd.grad(out.sum(), t)
    assert float(g.abs().min()) > 0


# ---------------------------------------------------------------- make_shards -> fit -> export -> the model's pipeline

def fit_config(base, model_dir, tmp_path, *overrides):
    """A shipped config pointed at a tiny pipeline directory, CPU-sized: 3 distill iterations
    learning K=3's coefficients and step grid."""
    return load_config(ROOT / "conf" / base, [
        f"backend.model={model_dir}", "backend.resolution=" + ("8" if "cifar" in base else "16"), "backend.dtype=float32",
        "backend.device=cpu", "backend.decode_chunk=3", "rewards=[{name: pixel_psnr}]", "reference.num_steps=6",
        "solver.num_steps=[3]", "solver.learn_timesteps=true", "data.num_samples=4", "data.samples_per_shard=4",
        "data.solve_batch_size=4", "data.batch_size=2", "data.shuffle_buffer=0", "data.num_workers=0",
        f"data.shard_dir={tmp_path / 'shards'}", "algo.name=distill", "algo.lr=0.3", "trainer.max_steps=3",
        "trainer.eval_every=0", "trainer.image_every=0", "trainer.checkpoint_every=1000", "trainer.log_every_n_steps=1000",
        "trainer.progress_bar=false", "trainer.accelerator=cpu", "trainer.num_threads=0", "validation.gate=off",
        f"output_dir={tmp_path / 'run'}",
        *overrides])


def make_fit_export(cfg):
    from consolver.data.writer import make_shards
    from consolver.scheduler import ConsistencySolverScheduler
    from consolver.train import fit

    summary = make_shards(cfg)
    torch.manual_seed(0)
    result = fit(cfg)
    assert summary["made"] == [0] and result.scheduler_dir.is_dir()
    loaded = ConsistencySolverScheduler.from_pretrained(result.scheduler_dir)
    assert loaded.available_num_steps == [3] and loaded.config.prediction_type == "epsilon"
    grid = loaded.step_grids[3].tolist()
    table = np.asarray(loaded.config.coefficient_tables["3"])
    assert grid != [999, 666, 333], grid  # trailing: training moved the grid ...
    assert np.abs(table - loaded.base_table(3)).max() > 1e-3  # ... and the coefficients
    return result.module, loaded, grid


def training_preview(module, prompts, noise, num_steps=3):
    """Decoded images ``[B, 3, H, W]`` of the training module's mode rollout (its training-time preview)."""
    backend, reward = module.runtime["backend"], module.runtime["reward"]
    batch = {"prompt": prompts, "noise": noise, "target_latent": noise,
             "features": {"pixel_psnr": reward.features(backend.decode(noise))}}
    with torch.no_grad():
        _, env = module.rollout(module.reset_input(batch, num_steps), num_steps, deterministic=True)
        return backend.decode(env.final_latents)


def record_timesteps(model):
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        float(torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).reshape(-1)[0])), with_kwargs=True)
    return seen


@pytest.mark.slow
def test_make_shards_fit_export_into_ddpm_pipeline(dirs, tmp_path):
    """conf/cifar10_ddpm.yaml on the tiny unconditional UNet: the exported scheduler (learned grid
    and table), loaded with from_pretrained into DDPMPipeline, reproduces the training preview."""
    from diffusers import DDPMPipeline

    cfg = fit_config("cifar10_ddpm.yaml", dirs["ddpm"], tmp_path)
    assert cfg.data.prompts is None and cfg.guidance == 1.0  # the backend's own condition list: ["none"]
    module, loaded, grid = make_fit_export(cfg)
    assert isinstance(module.runtime["backend"], DiffusersModelBackend)

    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(11))  # = DDPMPipeline's randn_tensor
    preview = training_preview(module, ["none", "none"], noise)
    pipe = DDPMPipeline.from_pretrained(dirs["ddpm"], scheduler=loaded)
    pipe.set_progress_bar_config(disable=True)
    seen = record_timesteps(pipe.unet)
    out = pipe(batch_size=2, generator=torch.Generator().manual_seed(11), num_inference_steps=3, output_type="np")
    assert seen == grid
    torch.testing.assert_close(torch.from_numpy(out.images), preview.permute(0, 2, 3, 1), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_make_shards_fit_export_into_dit_pipeline(dirs, tmp_path):
    """conf/dit_imagenet256.yaml on the tiny DiT with class names from a prompts file: the exported
    scheduler inside DiTPipeline (doubled batch, null class 1000, guidance on the epsilon half)
    reproduces the training preview's decoded images."""
    from diffusers import DiTPipeline

    prompts = tmp_path / "classes.txt"
    prompts.write_text("red circle\ntabby\n2\n")
    cfg = fit_config("dit_imagenet256.yaml", dirs["dit"], tmp_path, f"data.prompts={prompts}")
    assert cfg.guidance == 1.5
    module, loaded, grid = make_fit_export(cfg)

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(12))  # = DiTPipeline's randn_tensor
    preview = training_preview(module, ["crimson disc", "tabby cat"], noise)
    pipe = DiTPipeline.from_pretrained(dirs["dit"], scheduler=loaded)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.get_label_ids(["crimson disc", "tabby cat"]) == [0, 3]  # the same id2label, read by diffusers
    seen = record_timesteps(pipe.transformer)
    out = pipe(class_labels=[0, 3], guidance_scale=cfg.guidance, generator=torch.Generator().manual_seed(12),
               num_inference_steps=3, output_type="pt")
    assert seen == grid
    torch.testing.assert_close(out.images, preview, rtol=0, atol=1e-5)
