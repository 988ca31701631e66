"""The toy editing world: edits, reference recognition, the Kontext code path (dynamic-shift mu,
FLUX sigmas, reference tokens), its shards, and the toy_dino reward."""

import numpy as np
import pytest
import torch

from consolver.backends import toy_edits, toy_scenes
from consolver.backends.packing import image_ids, pack, unpack
from consolver.backends.toy_edit import ToyEditBackend
from consolver.config import ConfigError, load_config
from consolver.data.prompts import load_ref_images
from consolver.rewards import build_reward
from consolver.sampling import make_scheduler, sample
from tests.training import ROOT


@pytest.fixture(scope="module")
def backend():
    return ToyEditBackend(resolution=16, renders_per_prompt=8, num_train_edits=4, num_heldout_edits=2)


def scene(prompt):
    return toy_scenes.parse_prompt(prompt)


def test_instructions_edit_the_named_object():
    src = scene("a red circle on the left and a blue square at the top")
    assert toy_scenes.scene_prompt(toy_edits.apply_instruction(src, "Make the circle green.")) == \
        "a blue square at the top and a green circle on the left"
    assert toy_scenes.scene_prompt(toy_edits.apply_instruction(src, "move the square to the right")) == \
        "a red circle on the left and a blue square on the right"
    assert toy_scenes.scene_prompt(toy_edits.apply_instruction(src, "turn the circle into a diamond")) == \
        "a blue square at the top and a red diamond on the left"
    with pytest.raises(ValueError, match="forms: make the <shape> <color>"):
        toy_edits.apply_instruction(src, "paint it black")
    with pytest.raises(ValueError, match="exactly one triangle"):
        toy_edits.apply_instruction(src, "make the triangle red")
    with pytest.raises(ValueError, match="onto another object"):
        toy_edits.apply_instruction(src, "move the circle to the top")


def test_edit_lists_are_fixed_and_split_by_heldout_pairs():
    train, heldout = toy_edits.edit_list("train", 6), toy_edits.edit_list("heldout", 3)
    assert [e.key for e in toy_edits.edit_list("train", 3)] == [e.key for e in train[:3]]
    assert all(toy_edits.edit_split(e) == "train" for e in train)
    assert all("heldout" in (toy_scenes.scene_split(e.source), toy_scenes.scene_split(e.target)) for e in heldout)


def test_kontext_schedule_mu_and_flux_sigmas(backend):
    assert backend.schedule.use_dynamic_shifting and backend.image_seq_len == 64
    assert backend.schedule_mu() == pytest.approx(0.5 + 0.65 * (64 - 256) / 3840)
    kwargs = backend.timestep_kwargs(4)
    np.testing.assert_allclose(kwargs["sigmas"], np.linspace(1, 1 / 4, 4))
    scheduler = make_scheduler("euler", backend.schedule)
    scheduler.set_timesteps(4, **kwargs)
    mu = backend.schedule_mu()
    expected = np.exp(mu) / (np.exp(mu) + 1 / np.linspace(1, 1 / 4, 4) - 1) * 1000
    np.testing.assert_allclose(scheduler.timesteps.numpy(), expected, rtol=1e-6)


def test_packing_round_trips_and_reference_ids():
    x = torch.randn(2, 3, 8, 6)
    torch.testing.assert_close(unpack(pack(x), 8, 6), x)
    assert pack(x).shape == (2, 12, 12)
    ids = image_ids(8, 6, index=1)
    assert ids.shape == (12, 3) and bool((ids[:, 0] == 1).all()) and ids[-1, 1:].tolist() == [3, 2]


def test_encode_recognises_png_references_and_carries_reference_tokens(backend, tmp_path):
    records = backend.prompt_records("train", tmp_path)
    assert len(records) == 4 and all(r.ref_image.endswith(".png") for r in records)
    refs = torch.from_numpy(load_ref_images(records, 16)).permute(0, 3, 1, 2).float() / 255
    cond = backend.encode([r.text for r in records], refs)
    assert cond["prompt_index"].tolist() == [0, 1, 2, 3]
    assert cond["ref_tokens"].shape == (4, 64, 12)
    repeated = cond.repeat_interleave(3, dim=0)  # the env's group repeat: no re-encoding
    assert repeated["ref_tokens"].shape == (12, 64, 12)
    # another instruction on a known reference becomes a new edit of the same scene and background
    source = toy_scenes.parse_prompt(backend.prompts("train")[0].split(" | ")[0])
    obj = source[0]
    other = f"turn the {obj.shape} into a {'circle' if obj.shape != 'circle' else 'square'}"
    new = backend.encode([other], refs[:1])
    assert int(new["prompt_index"][0]) == backend.num_components // backend.renders_per_prompt - 1
    with pytest.raises(ValueError, match=r"data\.ref_image_column"):
        backend.encode(["make the circle red"])
    with pytest.raises(ValueError, match="not a reference scene"):
        backend.encode([records[0].text], torch.rand(1, 3, 16, 16))


def test_guided_solve_lands_on_the_edited_scene(backend):
    key = backend.prompts("heldout")[0]
    ref = backend.reference_image(key)[None]
    cond = backend.encode([key.split(" | ")[1]], ref).repeat_interleave(4, dim=0)
    noise = torch.randn(4, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    x = sample(backend, make_scheduler("euler", backend.schedule), noise, cond, 2.5, 28)
    means = backend.renders(key).reshape(backend.renders_per_prompt, -1)
    dist = torch.cdist(backend.decode(x).reshape(4, -1), means).min(1).values / 16
    assert float(dist.max()) < 0.1  # each solve ends near one of the edited scene's renders


def test_toy_dino_reward_is_a_fixed_feature_cosine():
    reward, again = build_reward("toy_dino"), build_reward("toy_dino")
    images = toy_scenes.render_scenes([scene("a red circle on the left"), scene("a blue square on the right")], 32)[0]
    feats = reward.features(images)
    torch.testing.assert_close(feats, again.features(images))  # seeded weights: same on every machine
    torch.testing.assert_close(reward.score(images, feats), torch.full((2,), 100.0))
    cross = reward.score(images.flip(0), feats)
    assert bool((cross < 90).all()) and bool((cross >= 0).all())
    assert not any(p.requires_grad for p in reward.parameters())


def test_toy_edit_configs_validate_and_name_the_reference_column():
    cfg = load_config(ROOT / "conf" / "toy_edit_dino.yaml")
    assert cfg.backend.name == "toy_edit" and cfg.solver.order == 2 and list(cfg.solver.num_steps) == [2, 3, 4, 5]
    assert cfg.reference.solver == "euler" and cfg.reference.num_steps == 28
    with pytest.raises(ConfigError, match=r"data\.ref_image_column"):
        load_config(ROOT / "conf" / "toy_edit_dino.yaml", ["data.prompts=edits.jsonl"])
    with pytest.raises(ConfigError, match=r"reference\.solver=euler"):
        load_config(ROOT / "conf" / "toy_edit_dino.yaml", ["reference.solver=dpmsolver++"])
    with pytest.raises(ConfigError, match="valid; choose one of: toy, .*flux_kontext.*toy_edit"):
        load_config(ROOT / "conf" / "toy_edit_dino.yaml", ["backend.name=sdxl"])
    flux = load_config(ROOT / "conf" / "flux_kontext_dino.yaml")
    assert flux.backend.model == "black-forest-labs/FLUX.1-Kontext-dev" and flux.guidance == 2.5
    assert flux.rewards[0].name == "dino" and flux.backend.dtype == "bfloat16"


SMALL = ["backend.resolution=16", "backend.toy.renders_per_prompt=8", "backend.toy.num_train_prompts=4",
         "backend.toy.num_heldout_prompts=2"]


def test_make_shards_cli_writes_reference_images_and_instructions(tmp_path):
    """``tools/make_shards.py --config conf/toy_edit_dino.yaml`` with no downloads: the toy world
    writes its reference PNGs, and the shards carry ref_image + instruction for training."""
    from consolver.data import ShardDataModule
    from tools.make_shards import main

    overrides = [*SMALL, f"data.shard_dir={tmp_path}", "data.num_samples=8", "data.samples_per_shard=8",
                 "data.solve_batch_size=8", "data.batch_size=8", "data.shuffle_buffer=0", "reference.num_steps=6"]
    main(["--config", str(ROOT / "conf" / "toy_edit_dino.yaml"), "--no-progress", *overrides])
    assert len(list((tmp_path / "refs").glob("ref-*.png"))) == 4
    cfg = load_config(ROOT / "conf" / "toy_edit_dino.yaml", overrides)
    backend = ToyEditBackend(16, 8, num_train_edits=4, num_heldout_edits=2)
    dm = ShardDataModule(cfg, backend=backend)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["ref_image"].shape == (8, 3, 16, 16) and batch["ref_image"].dtype == torch.uint8
    assert batch["instruction"] == batch["prompt"]
    cond = backend.encode(batch["prompt"], batch["ref_image"].float() / 255)  # training's encode
    keys = backend.prompts("train")
    assert [keys[i] for i in cond["prompt_index"].tolist()] == [keys[i % 4] for i in range(8)]
    assert batch["features"]["toy_dino"].shape[0] == 8


def test_config_meta_is_the_built_backends_meta():
    cfg = load_config(ROOT / "conf" / "toy_edit_dino.yaml", SMALL + ["backend.toy.num_train_prompts=4"])
    assert ToyEditBackend.config_meta(cfg.backend) == ToyEditBackend.from_config(cfg.backend).meta()
