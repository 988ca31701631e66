"""Pixel PSNR / SSIM rewards: maximum on identical images, monotone in noise, batched = per sample."""

import pytest
import torch

from consolver.rewards import build_reward, build_rewards, registered_rewards
from consolver.rewards.pixel import MAX_PSNR_DB, psnr, ssim

NAMES = ("pixel_psnr", "pixel_ssim")
MAXIMUM = {"pixel_psnr": MAX_PSNR_DB, "pixel_ssim": 100.0}


def _images(batch=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(batch, 3, size // 4, size // 4, generator=g), size=size,
                                             mode="bilinear", align_corners=False)
    return smooth.clamp(0, 1)


def test_registered():
    assert set(NAMES) <= set(registered_rewards())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [32, 64])
def test_identical_images_give_the_maximum(name, size):
    reward = build_reward(name)
    target = _images(size=size)
    assert torch.equal(reward.features(target), target)
    score = reward(target, target)
    assert score.shape == (4,)
    assert torch.allclose(score, torch.full((4,), MAXIMUM[name]), atol=1e-3)
    assert (reward(target.flip(0), target) < score).all()


@pytest.mark.parametrize("name", NAMES)
def test_reward_falls_as_noise_is_added(name):
    reward = build_reward(name)
    target = _images(batch=3)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(target.shape, generator=g)
    scores = torch.stack([reward((target + std * noise).clamp(0, 1), target) for std in (0.0, 0.01, 0.03, 0.1, 0.3)])
    assert (scores[1:] < scores[:-1]).all(), scores


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_per_sample(name):
    reward = build_reward(name)
    preview, target = _images(batch=5, seed=2), _images(batch=5, seed=3)
    batched = reward(preview, target)
    single = torch.cat([reward(preview[i:i + 1], target[i:i + 1]) for i in range(5)])
    assert torch.allclose(batched, single, rtol=1e-5, atol=1e-5)


def test_known_values():
    target = torch.full((1, 3, 16, 16), 0.5, dtype=torch.float64)
    assert torch.allclose(psnr(target + 0.1, target), torch.tensor([20.0], dtype=torch.float64), atol=1e-9)  # MSE 0.01
    # a constant shift leaves contrast and structure intact: SSIM is the luminance term only
    mu, c1 = 0.5, 0.01**2
    expected = (2 * mu * (mu + 0.1) + c1) / (mu**2 + (mu + 0.1) ** 2 + c1)
    assert torch.allclose(ssim(target + 0.1, target), torch.tensor([expected], dtype=torch.float64), atol=1e-9)


def test_composite_and_bad_options():
    reward = build_rewards([{"name": "pixel_psnr", "weight": 1.0}, {"name": "pixel_ssim", "weight": 0.5}])
    target = _images()
    features = reward.features(target)
    assert torch.allclose(reward.score(target, features), torch.full((4,), MAX_PSNR_DB + 50.0), atol=1e-3)
    with pytest.raises(ValueError, match="has no model"):
        build_reward("pixel_psnr", model="some/model")
    # a dtype on a reward with no network used to be silently ignored
    with pytest.raises(ValueError, match=r"rewards\[1\] \(pixel_ssim\): reward 'pixel_ssim' has no network, so `dtype` has no effect"):
        build_rewards([{"name": "pixel_psnr"}, {"name": "pixel_ssim", "dtype": "bfloat16"}])
    with pytest.raises(ValueError, match=r"rewards\[1\].weight=nan is not a finite number"):
        build_rewards([{"name": "pixel_psnr"}, {"name": "pixel_ssim", "weight": float("nan")}])
    with pytest.raises(ValueError, match="one shape"):
        ssim(target, target[:, :, :8])
