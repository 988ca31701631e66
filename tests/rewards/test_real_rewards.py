"""Real reward models (depth, segformer [transformers and SMP], clip, dino) with tiny random
networks of each architecture: CPU, no network."""

from __future__ import annotations

import io

import pytest
import torch
import transformers

from consolver.rewards import CompositeReward, build_reward, build_rewards
from consolver.rewards.hf import ImageProcessing, ModelNotAvailableError, check_loading_info, parse_dtype
from consolver.rewards.segformer import SegformerReward, albumentations_processor
from consolver.rewards.testing import TINY_KINDS, TINY_PROCESSORS, hf_image_processor, save_tiny, tiny_model

KINDS = list(TINY_KINDS)
NAMES = sorted(set(TINY_KINDS.values()))


@pytest.fixture(autouse=True, scope="module")
def _quiet_single_threaded():
    """Quiet transformers; one intra-op thread (tiny networks: far faster on a shared CPU)."""
    level, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    yield
    transformers.logging.set_verbosity(level)
    torch.set_num_threads(threads)


def structured_images(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    """``[n, 3, size, size]`` in [0, 1]: a coloured disc on a coloured background plus a gradient."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        fg, bg = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
        cx, cy = 0.2 + 0.6 * torch.rand(2, generator=g)
        radius = 0.15 + 0.2 * torch.rand(1, generator=g)
        disc = (((xx - cx) ** 2 + (yy - cy) ** 2) < radius ** 2).float()
        ramp = xx * torch.rand(1, generator=g) + yy * torch.rand(1, generator=g)
        out.append(0.8 * (bg * (1 - disc) + fg * disc) + 0.2 * ramp)
    return torch.stack(out).clamp(0, 1)


@pytest.fixture(scope="module")
def rewards():
    """kind -> reward built from a tiny in-memory model."""
    built = {}
    for kind in KINDS:
        model, processor = tiny_model(kind)
        built[kind] = build_reward(TINY_KINDS[kind], model=model, processor=processor)
    return built


@pytest.fixture(scope="module")
def images():
    return structured_images(6)


@pytest.mark.parametrize("kind", KINDS)
def test_shape_range_and_frozen(rewards, images, kind):
    reward = rewards[kind]
    reward.train()
    assert not reward.training and not reward.model.training
    assert not any(p.requires_grad for p in reward.parameters())
    out = reward(images, images.flip(0))
    assert out.shape == (len(images),) and out.dtype == torch.float32
    assert torch.all((out >= 0) & (out <= 100))


@pytest.mark.parametrize("kind", KINDS)
def test_identical_images_give_the_maximum(rewards, images, kind):
    reward = rewards[kind]
    same = reward(images, images)
    assert torch.allclose(same, torch.full_like(same, 100.0), atol=1e-3)
    features = reward.features(images)
    others = [reward.score(images.roll(k, 0), features) for k in range(1, len(images))]
    noisy = reward.score((images + 0.2 * torch.randn_like(images)).clamp(0, 1), features)
    assert torch.all(same > torch.stack(others + [noisy]).max(0).values)


@pytest.mark.parametrize("kind", KINDS)
def test_reward_falls_as_noise_grows(rewards, images, kind):
    reward = rewards[kind]
    features = reward.features(images)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    means = [reward.score((images + s * noise).clamp(0, 1), features).mean().item() for s in (0.0, 0.1, 0.3, 0.8)]
    assert all(a > b for a, b in zip(means, means[1:])), means


@pytest.mark.parametrize("kind", KINDS)
def test_scales_are_the_papers(rewards, images, kind):
    """From the raw network outputs, written out independently: depth = PSNR of min-max normalised
    maps, segformer = pixel agreement of argmax masks x100, clip/dino = (cos + 1) x 50."""
    reward = rewards[kind]
    previews = images.roll(1, 0)
    pred, target = reward.run(previews), reward.run(images)
    name = TINY_KINDS[kind]
    if name == "depth":
        def norm(d):
            flat = d.flatten(1)
            return (flat - flat.min(1, keepdim=True).values) / (flat.max(1, keepdim=True).values - flat.min(1, keepdim=True).values)
        expected = 10 * torch.log10(1 / (norm(pred) - norm(target)).square().mean(1))
    elif name == "segformer":
        expected = 100 * (pred.argmax(1) == target.argmax(1)).flatten(1).float().mean(1)
    else:
        expected = 50 * (torch.nn.functional.cosine_similarity(pred, target, dim=-1) + 1)
    assert torch.all(expected < 99.99)  # a real comparison, not the identical-image cap
    torch.testing.assert_close(reward(previews, images), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_equals_per_sample(rewards, images, kind):
    reward = rewards[kind]
    previews = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    batched = reward(previews, images)
    single = torch.cat([reward(previews[i:i + 1], images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(batched, single, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_target_features_equal_recomputed(rewards, images, kind):
    reward = rewards[kind]
    cached = reward.features(images)
    buffer = io.BytesIO()  # as a shard would store them
    torch.save(cached, buffer)
    buffer.seek(0)
    restored = torch.load(buffer)
    torch.testing.assert_close(restored, reward.features(images), atol=0, rtol=0)
    previews = images.flip(-1)
    torch.testing.assert_close(reward.score(previews, restored), reward(previews, images))


@pytest.mark.parametrize("kind", KINDS)
def test_loads_from_saved_directory(rewards, images, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_tiny(kind, tmp_path)
    loaded = build_reward(TINY_KINDS[kind], model=str(tmp_path))  # processor constants from the directory
    assert loaded.processing == rewards[kind].processing
    assert loaded.model_id == str(tmp_path)
    if TINY_KINDS[kind] == "segformer":
        assert loaded.is_smp == (kind == "segformer_smp")
    previews = images.roll(1, 0)
    torch.testing.assert_close(loaded(previews, images), rewards[kind](previews, images))


@pytest.mark.parametrize("name", NAMES)
def test_missing_model_offline_names_id_and_config_key(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as err:
        build_reward(name, model="consolver-tests/no-such-model")
    assert "consolver-tests/no-such-model" in str(err.value)
    assert "rewards[i].model" in str(err.value)


def test_missing_local_directory_names_path_and_config_key(tmp_path):
    for missing in (str(tmp_path / "nowhere" / "..." / "depth"), "./models/depth", "models/depth/v2", "~/no-such-model"):
        with pytest.raises(ModelNotAvailableError, match=r"no such local directory.*rewards\[i\]\.model") as err:
            build_reward("depth", model=missing)
        assert missing in str(err.value)
        assert "hf download" not in str(err.value)  # a download of a local path is no advice
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotAvailableError, match="it is a file, not a model directory"):
        build_reward("depth", model=str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("kind", KINDS)
def test_pickle_only_checkpoints_are_refused(kind, tmp_path, monkeypatch):
    """A directory whose weights are only a pickle (pytorch_model.bin) is not loaded."""
    from safetensors.torch import load_file

    from consolver.rewards.hf import UnsafeWeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_tiny(kind, tmp_path)
    for weights in tmp_path.glob("*.safetensors"):
        torch.save(load_file(str(weights)), tmp_path / "pytorch_model.bin")
        weights.unlink()
    with pytest.raises(UnsafeWeightsError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors only"):
        build_reward(TINY_KINDS[kind], model=str(tmp_path))


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "segformer_smp"])
def test_transformers_rewards_load_with_use_safetensors(kind, tmp_path, monkeypatch):
    """The flag is what protects hub ids (whose files are not looked at before loading)."""
    seen = []
    original = transformers.PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("use_safetensors"))
        return original(cls, *args, **kwargs)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(spy))
    save_tiny(kind, tmp_path)
    build_reward(TINY_KINDS[kind], model=str(tmp_path))
    assert seen and all(flag is True for flag in seen)


def test_processor_option_overrides_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_tiny("depth", tmp_path)
    assert build_reward("depth", model=str(tmp_path)).processing.size == (56, 56)
    override = build_reward("depth", model=str(tmp_path), processor={"size": {"height": 28, "width": 28}})
    assert override.processing.size == (28, 28) and override.processing.multiple_of == 14


def test_default_models_are_the_papers():
    from consolver.rewards.testing import REWARD_CLASSES

    defaults = {cls.name: cls.default_model for cls in REWARD_CLASSES.values()}
    assert defaults == {"depth": "depth-anything/Depth-Anything-V2-Small-hf",
                        "segformer": "smp-hub/segformer-b4-512x512-ade-160k",
                        "clip": "openai/clip-vit-large-patch14", "dino": "facebook/dinov2-base"}


def test_checkpoints_missing_most_weights_are_refused(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="right architecture"):
        check_loading_info(model, {"missing_keys": keys[:3]}, "some/ckpt", "dino")
    with caplog.at_level("WARNING", logger="consolver.rewards.hf"):
        check_loading_info(model, {"missing_keys": keys[:1]}, "some/ckpt", "dino")
    assert "some/ckpt" in caplog.text and keys[0] in caplog.text


def test_wrong_checkpoint_for_segformer_is_refused(tmp_path):
    save_tiny("dino", tmp_path)
    with pytest.raises(ValueError, match="neither a segmentation-models-pytorch"):
        SegformerReward(model=str(tmp_path))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(48, 48), (40, 60)])
def test_device_preprocessing_matches_hf_image_processor(kind, shape):
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 6, 6), size=shape, mode="bilinear")
    uint8 = (smooth * 255).round().to(torch.uint8)
    reference = hf_image_processor(kind, backend="default")(images=list(uint8), return_tensors="pt")["pixel_values"]
    ours = ImageProcessing.from_config(TINY_PROCESSORS[kind])(uint8.float() / 255)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, atol=0.035, rtol=0)  # HF rounds to uint8 after resizing


def test_bf16_autocast_close_to_fp32(images):
    model, processor = tiny_model("dino")
    fp32 = build_reward("dino", model=model, processor=processor)
    bf16 = build_reward("dino", model=model, processor=processor, dtype="bfloat16")
    assert bf16.autocast_dtype == torch.bfloat16
    previews = images.roll(1, 0)
    torch.testing.assert_close(bf16(previews, images), fp32(previews, images), atol=0.5, rtol=0)
    with pytest.raises(ValueError, match="float16, bfloat16"):
        parse_dtype("int8")


def test_albumentations_eval_config_is_read():
    config = {"transform": {"__class_fullname__": "Compose", "transforms": [
        {"__class_fullname__": "Resize", "height": 512, "width": 256},
        {"__class_fullname__": "albumentations.Normalize", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.1]}]}}
    assert albumentations_processor(config) == {
        "size": {"height": 512, "width": 256}, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.1]}


def test_composite_is_the_weighted_sum(rewards, images):
    depth_model, depth_processor = tiny_model("depth")
    dino_model, dino_processor = tiny_model("dino")
    composite = build_rewards([
        {"name": "depth", "weight": 0.25, "model": depth_model, "processor": depth_processor, "dtype": None},
        {"name": "dino", "weight": 2.0, "model": dino_model, "processor": dino_processor},
    ])
    assert isinstance(composite, CompositeReward)
    previews = (images + 0.1 * torch.randn_like(images)).clamp(0, 1)
    expected = 0.25 * rewards["depth"](previews, images) + 2.0 * rewards["dino"](previews, images)
    torch.testing.assert_close(composite(previews, images), expected)
    features = composite.features(images)
    assert set(features) == {"depth", "dino"}
    torch.testing.assert_close(composite.score(previews, features), expected)


def test_smp_hub_checkpoint_is_never_loaded_from_its_pickle(tmp_path, monkeypatch):
    """SMP's hub loader falls back to pytorch_model.bin when a repo has no model.safetensors."""
    import huggingface_hub
    from safetensors.torch import load_file

    from consolver.rewards.hf import UnsafeWeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--consolver-tests--tiny-smp"
    snapshot = repo / "snapshots" / ("0" * 40)
    save_tiny("segformer_smp", snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    loaded = build_reward("segformer", model="consolver-tests/tiny-smp")  # from the cache, safetensors
    assert loaded.is_smp
    torch.save(load_file(str(snapshot / "model.safetensors")), snapshot / "pytorch_model.bin")
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(UnsafeWeightsError, match=r"only pickle weights \(pytorch_model.bin\) in the Hub cache"):
        build_reward("segformer", model="consolver-tests/tiny-smp")
