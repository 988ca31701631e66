"""The FLUX.1-Kontext backend on a tiny random FluxKontextPipeline saved as a local directory and
loaded through ``backend.model``, as a user's download would be: the backend's model call is the
pipeline's, and make_shards -> fit -> export -> ``FluxKontextPipeline`` reproduces the
training-time preview."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from consolver.backends import build_backend
from consolver.backends.packing import pack, unpack
from consolver.config import ConfigError, load_config
from consolver.data.writer import make_shards
from consolver.scheduler import ConsistencySolverScheduler
from consolver.train import fit
from tests.tiny_models import tiny_flux_kontext_pipeline
from tests.training import ROOT

INSTRUCTIONS = ["make the car red", "turn the sky blue"]
GUIDANCE = 2.5


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    """``(pipeline directory, JSONL of two edits, their reference images [2, 3, 32, 32] in [0, 1])``."""
    root = tmp_path_factory.mktemp("kontext")
    tiny_flux_kontext_pipeline(root / "tok").save_pretrained(root / "pipe", safe_serialization=True)
    g = np.random.default_rng(0)
    refs = []
    (root / "images").mkdir()
    rows = []
    for i, text in enumerate(INSTRUCTIONS):
        pixels = (g.random((4, 4, 3)) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)  # blocky 32x32
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        refs.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
        rows.append(json.dumps({"image": f"images/{i}.png", "instruction": text}))
    (root / "edits.jsonl").write_text("\n".join(rows) + "\n")
    return root, torch.stack(refs)


def config(root, out, *overrides):
    return load_config(ROOT / "conf" / "flux_kontext_dino.yaml", [
        f"backend.model={root / 'pipe'}", "backend.resolution=32", "backend.dtype=float32", "backend.device=cpu",
        "backend.flux.max_sequence_length=16", "rewards=[{name: toy_dino}]", f"data.prompts={root / 'edits.jsonl'}",
        f"data.shard_dir={out / 'shards'}", "data.num_samples=4", "data.samples_per_shard=4", "data.solve_batch_size=4",
        "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=4", "reference.num_steps=4",
        "solver.num_steps=[2,3]", "algo.group_size=2", "trainer.max_steps=2", "trainer.image_every=0",
        "trainer.checkpoint_every=1000", "trainer.log_every_n_steps=1000", "trainer.progress_bar=false",
        "trainer.accelerator=cpu", "validation.gate=off", f"output_dir={out}", *overrides])


def pipeline(root, scheduler=None):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(root / "pipe", use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = scheduler
    return pipe


def run_pipeline(pipe, ref, noise, steps):
    """The pipeline on packed ``noise`` [1, C, h, w] with the reference at 32x32; packed latents out."""
    return pipe(image=ref[None], prompt=INSTRUCTIONS[0], height=32, width=32, num_inference_steps=steps,
                guidance_scale=GUIDANCE, latents=pack(noise), output_type="latent", max_sequence_length=16,
                max_area=32 * 32, _auto_resize=False).images


def test_predict_is_the_pipelines_transformer_call(kontext, tmp_path):
    root, refs = kontext
    backend = build_backend(config(root, tmp_path).backend)
    assert backend.latent_shape == (2, 16, 16) and backend.image_seq_len == 64
    assert backend.schedule.use_dynamic_shifting and backend.schedule_mu() == pytest.approx(0.5 + 0.65 * (64 - 256) / 3840)
    pipe = pipeline(root)
    calls = []
    pipe.transformer.register_forward_hook(lambda m, args, kwargs, out: calls.append((kwargs, out[0])), with_kwargs=True)
    noise = torch.randn(1, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    run_pipeline(pipe, refs[0], noise, 2)
    kwargs, out = calls[0]
    assert kwargs["hidden_states"].shape[1] == 2 * 64  # latent tokens + reference tokens
    cond = backend.encode(INSTRUCTIONS[:1], refs[:1])
    torch.testing.assert_close(cond["ref_tokens"], kwargs["hidden_states"][:, 64:])
    t = kwargs["timestep"] * 1000
    ours = backend.predict(noise, t, cond, GUIDANCE)
    torch.testing.assert_close(ours, unpack(out[:, :64], 16, 16), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("learn_timesteps", [False, True])
def test_make_shards_fit_export_reproduces_the_preview_in_the_pipeline(kontext, tmp_path, learn_timesteps):
    """With a learned grid too: stored in unshifted sigma, it replaces the default sigmas the
    pipeline passes and is shifted by the pipeline's own mu."""
    root, refs = kontext
    cfg = config(root, tmp_path, f"solver.learn_timesteps={str(learn_timesteps).lower()}")
    summary = make_shards(cfg)
    assert summary["made"] == [0]
    result = fit(cfg)
    loaded = ConsistencySolverScheduler.from_pretrained(result.scheduler_dir)
    assert loaded.available_num_steps == [2, 3] and loaded.config.use_dynamic_shifting
    if learn_timesteps:
        assert sorted(loaded.step_grids) == [2, 3]
        assert not np.allclose(loaded.step_grids[3], np.linspace(1, 1 / 3, 3), atol=1e-4)  # moved by training
    module = result.module
    backend = module.runtime["backend"]
    noise = torch.randn(1, *backend.latent_shape, generator=torch.Generator().manual_seed(3))
    batch = {"prompt": INSTRUCTIONS[:1], "noise": noise, "target_latent": noise,
             "ref_image": (refs[:1] * 255).round().to(torch.uint8),
             "features": {"toy_dino": module.runtime["reward"].features(backend.decode(noise))}}
    for K in (2, 3):
        _, env = module.rollout(module.reset_input(batch, K), K, deterministic=True)
        preview = run_pipeline(pipeline(root, loaded), batch["ref_image"][0].float() / 255, noise, K)
        torch.testing.assert_close(unpack(preview, 16, 16), env.final_latents, rtol=0, atol=1e-4)
    euler = run_pipeline(pipeline(root), batch["ref_image"][0].float() / 255, noise, 3)
    assert (unpack(euler, 16, 16) - env.final_latents).abs().max() > 1e-5  # the learned table is not Euler


def test_editing_config_without_reference_column_names_the_key(kontext, tmp_path):
    root, _ = kontext
    with pytest.raises(ConfigError, match=r"data\.ref_image_column"):
        config(root, tmp_path, "data.ref_image_column=null")


def test_offline_without_local_copy_names_the_id_and_the_key(monkeypatch):
    from consolver.backends.flux_kontext import ModelNotAvailableError, load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match=r"'black-forest-labs/FLUX\.1-Kontext-dev'.*backend\.model"):
        load_pipeline("black-forest-labs/FLUX.1-Kontext-dev", torch.float32)
    with pytest.raises(ModelNotAvailableError, match=r"no such local directory.*backend\.model"):
        load_pipeline("./no/such/dir", torch.float32)
