"""The sd15 backend on a tiny randomly initialised SD1.5-shaped pipeline, saved with
``save_pretrained`` and loaded through ``backend.model`` exactly as a user's download is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from consolver.backends import backend_class, build_backend
from consolver.backends.model_source import BackendModelNotFoundError
from consolver.backends.sd15 import SD15Backend
from consolver.config import load_config
from tests.tiny_models import tiny_sd_pipeline

ROOT = Path(__file__).resolve().parents[2]
RES = 32  # tiny VAE downsamples by 2: latents [4, 16, 16]
PROMPTS = ["a red apple on a table", "a dog on a beach"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A tiny StableDiffusionPipeline (SD1.5's PNDM scheduler config) written by save_pretrained."""
    from diffusers import PNDMScheduler

    tmp = tmp_path_factory.mktemp("sd15")
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                              skip_prk_steps=True, steps_offset=1)
    tiny_sd_pipeline(tmp / "build", scheduler).save_pretrained(tmp / "pipe", safe_serialization=True)
    return tmp / "pipe"


@pytest.fixture(scope="module")
def backend(pipeline_dir):
    return SD15Backend(str(pipeline_dir), resolution=RES, device="cpu")


def load_pipeline(directory, scheduler=None):
    from diffusers import StableDiffusionPipeline

    extra = {} if scheduler is None else {"scheduler": scheduler}
    pipe = StableDiffusionPipeline.from_pretrained(directory, safety_checker=None, requires_safety_checker=False, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_guided_output(pipe, prompts, x, t, guidance):
    """What StableDiffusionPipeline.__call__ computes at one step: [uncond; cond] in one UNet
    batch, then guidance."""
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
    with torch.no_grad():
        out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    u, c = out.chunk(2)
    return u + guidance * (c - u)


def test_loads_schedule_shapes_and_frozen_weights_from_a_local_pipeline_dir(backend):
    assert backend.latent_shape == (4, RES // 2, RES // 2) and backend.vae_scale_factor == 2
    assert backend.model_prediction_type == "epsilon" and backend.prediction_type == "epsilon"
    from consolver.schedules import VPSchedule

    torch.testing.assert_close(backend.schedule.alphas_cumprod, VPSchedule.sd15().alphas_cumprod)
    assert backend.schedule.final_alphas_cumprod == 1.0  # lands on x0, whatever the pipeline's set_alpha_to_one
    assert not any(p.requires_grad for m in (backend.unet, backend.vae, backend.text_encoder) for p in m.parameters())
    assert backend.meta()["latent_shape"] == [4, RES // 2, RES // 2]


def test_predict_equals_the_pipelines_guided_model_output(backend, pipeline_dir):
    pipe = load_pipeline(pipeline_dir)
    x = torch.randn(2, *backend.latent_shape, generator=torch.Generator().manual_seed(1))
    cond = backend.encode(PROMPTS)
    for t, guidance in ((torch.tensor(801), 3.0), (torch.tensor(121), 7.5)):
        got = backend.predict(x, t, cond, guidance)
        assert got.dtype == torch.float32 and got.shape == x.shape
        torch.testing.assert_close(got, pipeline_guided_output(pipe, PROMPTS, x, t, guidance), rtol=0, atol=1e-5)
    # guidance 1: the conditional branch alone; per-sample timesteps broadcast like a scalar
    cond_only = pipe.unet(x, 500, encoder_hidden_states=pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]).sample
    torch.testing.assert_close(backend.predict(x, torch.tensor([500, 500]), cond, 1.0), cond_only.detach(), rtol=0, atol=1e-5)


def test_v_prediction_model_returns_epsilon_and_exports_its_own_prediction_type(pipeline_dir, tmp_path):
    """A v-prediction UNet: predict gives eps = s x + a v; the exported scheduler carries
    v_prediction, so a pipeline fed the raw v output solves exactly what training solved."""
    from consolver.algos.base import solver_scheduler
    from consolver.sampling import sample

    vdir = tmp_path / "vpipe"
    shutil.copytree(pipeline_dir, vdir)
    config_path = vdir / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, prediction_type="v_prediction")))
    backend = SD15Backend(str(vdir), resolution=RES, device="cpu")
    assert backend.model_prediction_type == "v_prediction" and backend.prediction_type == "epsilon"
    pipe = load_pipeline(vdir)
    x = torch.randn(2, *backend.latent_shape, generator=torch.Generator().manual_seed(2))
    v = pipeline_guided_output(pipe, PROMPTS, x, torch.tensor(601), 3.0)
    a, s = (float(z) for z in backend.schedule.alpha_sigma(601))
    torch.testing.assert_close(backend.predict(x, 601, backend.encode(PROMPTS), 3.0), s * x + a * v, rtol=0, atol=1e-5)

    cfg = load_config(None, ["solver.order=2", "solver.base_solver=adams_bashforth"])
    trained = sample(backend, solver_scheduler(cfg, backend.schedule), x, backend.encode(PROMPTS), 3.0, 3)
    exported = solver_scheduler(cfg, backend.schedule, backend.model_prediction_type)
    assert exported.config.prediction_type == "v_prediction"
    pipe.scheduler = exported
    out = pipe(PROMPTS, latents=x, num_inference_steps=3, guidance_scale=3.0, height=RES, width=RES, output_type="latent")
    torch.testing.assert_close(out.images, trained, rtol=0, atol=1e-5)


def test_chunked_decode_equals_unchunked_and_is_in_unit_range(backend):
    latents = torch.randn(5, *backend.latent_shape, generator=torch.Generator().manual_seed(3))
    backend.decode_chunk = 2
    chunked = backend.decode(latents)
    backend.decode_chunk = 64
    try:
        whole = backend.decode(latents)
    finally:
        backend.decode_chunk = 8
    assert chunked.shape == (5, 3, RES, RES) and chunked.dtype == torch.float32
    assert 0.0 <= float(chunked.min()) and float(chunked.max()) <= 1.0
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_with_float32_outputs(pipeline_dir, backend, dtype):
    half = SD15Backend(str(pipeline_dir), resolution=RES, device="cpu", dtype=dtype)
    want = getattr(torch, dtype)
    assert {p.dtype for m in (half.unet, half.vae, half.text_encoder) for p in m.parameters()} == {want}
    x = torch.randn(2, *half.latent_shape, generator=torch.Generator().manual_seed(4))
    got = half.predict(x, 701, half.encode(PROMPTS), 3.0)
    ref = backend.predict(x, 701, backend.encode(PROMPTS), 3.0)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert float((got - ref).norm() / ref.norm()) < 0.05  # a smoke test of the half-precision path
    images = half.decode(x)
    assert images.dtype == torch.float32 and float(images.min()) >= 0 and float(images.max()) <= 1
    assert half.meta()["backend"] == "sd15" and half.dtype == dtype


def test_offline_without_a_local_copy_names_the_id_and_backend_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, ["backend.name=sd15", "backend.model=nobody-here/no-such-sd15-model", "backend.device=cpu"])
    with pytest.raises(BackendModelNotFoundError) as err:
        build_backend(cfg.backend)
    message = str(err.value)
    assert "'nobody-here/no-such-sd15-model' could not be found offline" in message, message
    assert "`backend.model`" in message and "local directory" in message


def test_missing_or_incomplete_local_directory_names_backend_model(tmp_path, pipeline_dir):
    with pytest.raises(BackendModelNotFoundError, match=r"does not exist; set the config key `backend.model`"):
        SD15Backend(str(tmp_path / "no" / "such" / "dir"), resolution=RES, device="cpu")
    partial = tmp_path / "partial"
    shutil.copytree(pipeline_dir, partial, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(BackendModelNotFoundError, match=r"is not a diffusers pipeline directory: it lacks vae/"):
        SD15Backend(str(partial), resolution=RES, device="cpu")
    pickled = tmp_path / "pickled"  # weights only as a pickle file: refused, never unpickled
    shutil.copytree(pipeline_dir, pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(BackendModelNotFoundError, match=r"could not load the local pipeline directory .*safetensors only"):
        SD15Backend(str(pickled), resolution=RES, device="cpu")


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'sdxl'; valid backends: toy, sd15"):
        backend_class("sdxl")


# ---------------------------------------------------------------- make_shards -> fit -> export -> pipeline

def sd15_config(pipeline_dir, tmp_path, *overrides):
    """conf/sd15_depth.yaml pointed at the tiny pipeline directory, CPU-sized."""
    return load_config(ROOT / "conf" / "sd15_depth.yaml", [
        f"backend.model={pipeline_dir}", f"backend.resolution={RES}", "backend.dtype=float32", "backend.device=cpu",
        "backend.decode_chunk=3", "rewards=[{name: pixel_psnr}]", "reference.num_steps=6", "solver.num_steps=[3]",
        "data.num_samples=4", "data.samples_per_shard=4", "data.solve_batch_size=4", "data.batch_size=2",
        "data.shuffle_buffer=0", "data.num_workers=0", f"data.shard_dir={tmp_path / 'shards'}", "trainer.eval_every=0",
        "trainer.image_every=0", "trainer.checkpoint_every=1000", "trainer.log_every_n_steps=1000",
        "trainer.progress_bar=false", "trainer.accelerator=cpu", "validation.num_samples=4",
        f"output_dir={tmp_path / 'run'}", *overrides])


def training_preview(module, seeds, num_steps):
    """``(noise, final latents)`` of the training module's mode rollout for PROMPTS from ``seeds``."""
    from consolver.data.writer import make_noise

    backend, reward = module.runtime["backend"], module.runtime["reward"]
    noise = make_noise(seeds, backend.latent_shape)
    batch = {"prompt": PROMPTS, "noise": noise, "target_latent": noise,
             "features": {"pixel_psnr": reward.features(backend.decode(noise))}}
    with torch.no_grad():
        _, env = module.rollout(module.reset_input(batch, num_steps), num_steps, deterministic=True)
    return noise, env.final_latents


@pytest.fixture(scope="module")
def trained(pipeline_dir, tmp_path_factory):
    """Shards from a user's JSONL (column ``text``), then 3 distill iterations with gradient
    checkpointing through the UNet, then export."""
    from consolver.data.writer import make_shards
    from consolver.train import fit

    tmp = tmp_path_factory.mktemp("sd15_fit")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "text": p}) + "\n" for i, p in enumerate(PROMPTS)))
    cfg = sd15_config(pipeline_dir, tmp, f"data.prompts={prompts}", "data.prompt_column=text", "algo.name=distill",
                      "algo.gradient_checkpointing=true", "algo.lr=0.05", "trainer.max_steps=3")
    summary = make_shards(cfg)
    torch.manual_seed(0)
    result = fit(cfg)
    return cfg, summary, result


@pytest.mark.slow
def test_make_shards_fit_export_into_a_real_stable_diffusion_pipeline(trained, pipeline_dir):
    """The exported scheduler, loaded with from_pretrained into StableDiffusionPipeline (same
    directory), reproduces the training-time mode preview for the same prompts and noise."""
    from consolver.scheduler import ConsistencySolverScheduler

    cfg, summary, result = trained
    assert summary["made"] == [0] and result.scheduler_dir.is_dir()
    module = result.module
    backend, reward = module.runtime["backend"], module.runtime["reward"]
    assert isinstance(backend, SD15Backend)
    assert {p.device for p in reward.parameters()} <= {backend.device}  # rewards live on the backend's device
    loaded = ConsistencySolverScheduler.from_pretrained(result.scheduler_dir)
    assert loaded.available_num_steps == [3] and loaded.config.prediction_type == "epsilon"
    table = np.asarray(loaded.config.coefficient_tables["3"])
    assert np.abs(table - loaded.base_table(3)).max() > 1e-3  # training moved the solver away from DDIM

    noise, preview = training_preview(module, [11, 12], 3)
    pipe = load_pipeline(pipeline_dir, scheduler=loaded)
    out = pipe(PROMPTS, latents=noise.clone(), num_inference_steps=3, guidance_scale=cfg.guidance, height=RES, width=RES,
               output_type="latent")
    torch.testing.assert_close(out.images, preview, rtol=0, atol=1e-5)


def test_prompts_are_encoded_once_per_batch_not_per_rollout(trained):
    """A group of G rollouts per sample repeats the batch's conditioning: one text-encoder call."""
    from consolver.data.writer import make_noise

    _, _, result = trained
    module = result.module
    backend, reward = module.runtime["backend"], module.runtime["reward"]
    noise = make_noise([1, 2], backend.latent_shape)
    batch = {"prompt": PROMPTS, "noise": noise, "target_latent": noise,
             "features": {"pixel_psnr": reward.features(backend.decode(noise))}}
    calls = []
    hook = backend.text_encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            data = module.reset_input(batch, 3, group_size=4)
            roll, env = module.rollout(data, 3, deterministic=False)
    finally:
        hook.remove()
    assert calls == [2]  # one call, both prompts; the 8 rollouts reuse it
    assert data["cond", "prompt_embeds"].shape[0] == 8 and env.final_latents.shape[0] == 8
    torch.testing.assert_close(data["cond", "prompt_embeds"][0], data["cond", "prompt_embeds"][3])


def test_gradient_checkpointing_gives_the_same_distill_gradient(trained, monkeypatch):
    """algo.gradient_checkpointing wraps each differentiable predict in torch.utils.checkpoint
    (all but the first, which sees only noise) and changes no gradient."""
    import torch.utils.checkpoint as ckpt

    from consolver.algos.distill import distill_loss
    from consolver.data.writer import make_noise

    _, _, result = trained
    module = result.module
    backend, reward = module.runtime["backend"], module.runtime["reward"]
    noise = make_noise([5, 6], backend.latent_shape)
    batch = {"prompt": PROMPTS, "noise": noise, "target_latent": torch.zeros_like(noise),
             "features": {"pixel_psnr": reward.features(backend.decode(noise))}}
    calls, original = [], ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    env = module.env(2)
    grads = {}
    for flag in (False, True):
        env.gradient_checkpointing = flag
        _, env = module.rollout(module.reset_input(batch, 3), 3, deterministic=True)
        loss = distill_loss(env.final_latents, batch["target_latent"], None, "log_mse")
        params = [p for p in module.actor.parameters() if p.requires_grad]
        grads[flag] = [torch.zeros_like(p) if g is None else g
                       for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]
    env.gradient_checkpointing = True
    assert len(calls) == 2
    assert any(float(g.abs().max()) > 0 for g in grads[False])
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_parquet_prompt_column_makes_shards(pipeline_dir, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from consolver.data.reader import expand_shards, peek_meta
    from consolver.data.writer import make_shards

    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"caption": ["a cat", "a boat"], "other": [1, 2]}), path)
    cfg = sd15_config(pipeline_dir, tmp_path, f"data.prompts={path}", "data.prompt_column=caption",
                      "data.num_samples=2", "data.samples_per_shard=2", "reference.num_steps=2")
    make_shards(cfg)
    assert peek_meta(expand_shards(str(tmp_path / "shards"))[0])["backend"] == "sd15"


def test_a_learned_grid_exported_into_stable_diffusion_needs_only_num_inference_steps(trained, pipeline_dir, tmp_path):
    """distill with solver.learn_timesteps on the tiny SD1.5 pipeline; the exported scheduler,
    in an unmodified StableDiffusionPipeline called with only num_inference_steps=K, evaluates
    the UNet on the learned grid and reproduces the training-time preview."""
    from consolver.scheduler import ConsistencySolverScheduler
    from consolver.train import fit

    cfg, _, _ = trained
    grid_cfg = sd15_config(pipeline_dir, tmp_path, f"data.shard_dir={cfg.data.shard_dir}", "algo.name=distill",
                           "solver.learn_timesteps=true", "algo.lr=0.3", "trainer.max_steps=3")
    torch.manual_seed(0)
    module = fit(grid_cfg).module
    loaded = ConsistencySolverScheduler.from_pretrained(tmp_path / "run" / "scheduler")
    grid = loaded.step_grids[3].tolist()
    assert grid != [999, 666, 333], grid  # trailing: training moved it
    noise, preview = training_preview(module, [21, 22], 3)
    pipe = load_pipeline(pipeline_dir, scheduler=loaded)
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(float(args[1])))
    out = pipe(PROMPTS, latents=noise.clone(), num_inference_steps=3, guidance_scale=grid_cfg.guidance, height=RES,
               width=RES, output_type="latent")
    assert seen == grid
    # per-rollout grid arithmetic in training vs the scheduler's scalars: float rounding only
    torch.testing.assert_close(out.images, preview, rtol=1e-6, atol=1e-5)
