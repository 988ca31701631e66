"""Toy rewards with the shipped networks: held-out accuracy, reward scales, features, and the
exact mode-agreement metric."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from consolver.backends import toy_scenes
from consolver.backends.toy import ToyBackend
from consolver.rewards import build_reward, build_rewards
from consolver.rewards.toy import (DEFAULT_WEIGHTS, depth_order_accuracy, minmax_normalize, mode_agreement,
                                   segmentation_miou)


@pytest.fixture(scope="module")
def seg():
    return build_reward("toy_seg")


@pytest.fixture(scope="module")
def depth():
    return build_reward("toy_depth")


@pytest.fixture(scope="module")
def heldout():
    """Renders of held-out scenes (combinations the nets never saw), seeds unlike training's."""
    rng, generator = np.random.default_rng(12345), torch.Generator().manual_seed(12345)
    scenes = [toy_scenes.random_scene(rng, "heldout") for _ in range(192)]
    params = toy_scenes.jittered_params(scenes, generator)
    return params, toy_scenes.render(params, 32)


def test_shipped_weights_are_small():
    assert sum(path.stat().st_size for path in DEFAULT_WEIGHTS.values()) <= 5 * 2**20


def test_heldout_segmentation_miou(seg, heldout):
    _, (images, labels, _) = heldout
    miou = segmentation_miou(seg.predict_mask(images), labels, len(toy_scenes.SEG_CLASSES))
    assert miou >= 0.9, miou


def test_heldout_depth_order_accuracy(depth, heldout):
    _, (images, _, labels) = heldout
    accuracy = depth_order_accuracy(depth.predict_depth(images), labels)
    assert accuracy >= 0.9, accuracy


@pytest.mark.slow
def test_64x64_inputs(seg, depth, heldout):
    params, (_, labels, depth_labels) = heldout
    images64 = toy_scenes.render(params, 64)[0]
    mask = seg.predict_mask(images64)
    assert mask.shape == labels.shape  # the nets' working resolution, whatever the input size
    assert segmentation_miou(mask, labels, len(toy_scenes.SEG_CLASSES)) >= 0.85
    assert depth_order_accuracy(depth.predict_depth(images64), depth_labels) >= 0.85
    assert depth(images64[:4], images64[:4]).shape == (4,)


@pytest.mark.slow
def test_features_and_scales(seg, depth, heldout):
    _, (images, _, _) = heldout
    target, other = images[:8], images[8:16]
    seg_features, depth_features = seg.features(target), depth.features(target)
    assert seg_features.shape == (8, 32, 32) and seg_features.dtype == torch.uint8
    assert depth_features.shape == (8, 32, 32) and depth_features.dtype == torch.float32
    assert 0 <= depth_features.min() and depth_features.max() <= 1
    assert torch.allclose(seg(target, target), torch.full((8,), 100.0))
    assert torch.allclose(depth(target, target), torch.full((8,), 100.0))
    assert (seg(other, target) < 100).all() and (seg(other, target) >= 0).all()
    assert (depth(other, target) < 60).all() and (depth(other, target) >= 0).all()
    assert torch.equal(seg.score(other, seg_features), seg(other, target))


@pytest.mark.slow
def test_rewards_fall_as_previews_blur(seg, depth, heldout):
    _, (images, _, _) = heldout
    target = images[:32]
    blurred = [F.avg_pool2d(target, k, stride=1, padding=k // 2, count_include_pad=False) for k in (3, 7)]
    for reward in (seg, depth):
        scores = [reward(target, target).mean()] + [reward(b, target).mean() for b in blurred]
        assert scores[0] > scores[1] > scores[2], (reward.name, scores)


@pytest.mark.slow
def test_batched_equals_per_sample(seg, depth, heldout):
    _, (images, _, _) = heldout
    preview, target = images[:6], images[6:12]
    for reward in (seg, depth):
        batched = reward(preview, target)
        single = torch.cat([reward(preview[i:i + 1], target[i:i + 1]) for i in range(6)])
        # seg: at most one pixel of 32 x 32 may flip on a near-tie (0.098 points); depth: float noise
        assert torch.allclose(batched, single, rtol=0, atol=0.1 if reward is seg else 1e-3), reward.name


def test_frozen_and_composite(seg):
    assert not seg.training and not any(p.requires_grad for p in seg.parameters())
    seg.train()
    assert not seg.training
    both = build_rewards([{"name": "toy_seg", "weight": 1.0}, {"name": "toy_depth", "weight": 0.5}])
    images = toy_scenes.render_scenes([toy_scenes.parse_prompt("a red circle on the left")] * 2)[0]
    assert torch.allclose(both(images, images), torch.full((2,), 150.0))


def test_missing_weights_name_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"rewards\[\]\.model"):
        build_reward("toy_depth", model=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="not a toy seg network"):
        build_reward("toy_seg", model=str(DEFAULT_WEIGHTS["depth"]))


def test_minmax_normalize():
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]]])
    out = minmax_normalize(maps)
    assert torch.allclose(out[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]])) and torch.equal(out[1], torch.zeros(2, 2))


def test_metrics_on_known_inputs():
    target = torch.tensor([[[0, 1], [2, 2]]])
    assert segmentation_miou(target, target, 5) == 1.0
    assert segmentation_miou(torch.tensor([[[0, 1], [2, 1]]]), target, 5) == pytest.approx((1 + 0.5 + 0.5) / 3)
    depth = torch.tensor([[[0.0, 0.5], [1.0, 0.25]]])
    assert depth_order_accuracy(depth * 3 + 1, depth) == 1.0
    assert depth_order_accuracy(-depth, depth) == 0.0


def test_mode_agreement_is_exact():
    backend = ToyBackend(renders_per_prompt=8, num_train_prompts=2, num_heldout_prompts=1)
    renders = backend.renders(backend.prompts()[0])  # [8, 3, 32, 32], one component each
    g = torch.Generator().manual_seed(0)
    nudged = (renders + 0.01 * torch.randn(renders.shape, generator=g)).clamp(0, 1)
    assert mode_agreement(backend, nudged, renders).all()
    assert not mode_agreement(backend, renders.roll(1, 0), renders).any()
    index = backend.encode([backend.prompts()[0]] * 8)["prompt_index"]
    assert mode_agreement(backend, nudged, renders, index).all()
