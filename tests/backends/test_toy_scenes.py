"""Toy scenes: vocabulary, prompts, the fixed split, and the renderer with its labels."""

import numpy as np
import pytest
import torch

from consolver.backends import toy_scenes as ts


def test_vocabulary_size():
    assert len(ts.SHAPES) >= 4 and len(ts.COLORS) >= 6 and len(ts.POSITIONS) >= 5
    assert len(ts.BACKGROUNDS) >= 2 and ts.MAX_OBJECTS == 3


@pytest.mark.parametrize("prompt, kind, word", [
    ("a pink circle on the left", "color", "pink"),
    ("a red hexagon on the left", "shape", "hexagon"),
    ("a red circle in the corner", "position", "corner"),
    ("a red circle on the left and a blue blob at the top", "shape", "blob"),
])
def test_unknown_word_lists_vocabulary(prompt, kind, word):
    with pytest.raises(ValueError) as err:
        ts.parse_prompt(prompt)
    message = str(err.value)
    assert f"unknown {kind} {word!r}" in message
    for vocab in (*ts.SHAPES, *ts.COLORS, *ts.POSITIONS):
        assert vocab in message


@pytest.mark.parametrize("prompt", ["", "red circle left", "a red circle on the left and a blue square on the left",
                                    "a red circle on the left, a red circle on the right, a red circle at the top "
                                    "and a red circle at the bottom"])
def test_malformed_prompts_raise(prompt):
    with pytest.raises(ValueError):
        ts.parse_prompt(prompt)


def test_prompts_are_compositional_and_canonical():
    scene = ts.parse_prompt("A green triangle on the right, and a blue square at the top.")
    assert scene == (ts.SceneObject("blue", "square", "top"), ts.SceneObject("green", "triangle", "right"))
    assert ts.scene_prompt(scene) == "a blue square at the top and a green triangle on the right"
    assert ts.canonical_prompt("an orange circle in the center") == "an orange circle in the center"
    three = ts.parse_prompt("a red circle on the left, a blue square at the top and a green diamond at the bottom")
    assert [o.position for o in three] == ["top", "left", "bottom"]  # drawing order: back to front


def test_split_is_fixed_and_disjoint():
    train, heldout = ts.prompt_list("train", 60), ts.prompt_list("heldout", 30)
    assert train == ts.prompt_list("train", 60) and train[:10] == ts.prompt_list("train", 10)
    assert not set(train) & set(heldout)
    for prompt in train:
        assert not any((o.color, o.shape) in ts.HELDOUT_PAIRS for o in ts.parse_prompt(prompt))
    for prompt in heldout:
        assert any((o.color, o.shape) in ts.HELDOUT_PAIRS for o in ts.parse_prompt(prompt))
    assert {len(ts.parse_prompt(p)) for p in train} == {1, 2, 3}
    rng = np.random.default_rng(0)
    assert all(ts.scene_split(ts.random_scene(rng, "train")) == "train" for _ in range(200))
    with pytest.raises(ValueError, match="valid splits"):
        ts.prompt_list("test", 3)


def _one(prompt, resolution=32, seed=0):
    return ts.render_scenes([ts.parse_prompt(prompt)], resolution, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("resolution", [32, 64])
def test_render_shapes_ranges_and_labels(resolution):
    image, seg, depth = _one("a red circle on the left, a blue square in the center and a green diamond at the bottom",
                             resolution)
    assert image.shape == (1, 3, resolution, resolution) and image.dtype == torch.float32
    assert seg.shape == depth.shape == (1, resolution, resolution)
    assert 0 <= image.min() and image.max() <= 1
    assert set(seg.unique().tolist()) == {0, 1 + ts.SHAPES.index("circle"), 1 + ts.SHAPES.index("square"),
                                          1 + ts.SHAPES.index("diamond")}
    # depth follows the ground-plane layering: background < left < center < bottom
    levels = {c: depth[seg == 1 + ts.SHAPES.index(c)].unique().tolist() for c in ("circle", "square", "diamond")}
    assert levels == {"circle": [0.5], "square": [0.75], "diamond": [1.0]}
    assert depth[seg == 0].eq(0).all()
    red = torch.tensor(ts.COLORS["red"])[:, None]
    circle_pixels = image[0].reshape(3, -1)[:, (seg[0].flatten() == 1)]
    assert (circle_pixels - red).abs().median() < 0.05  # interior pixels are red (edges blend)


def test_layering_occludes_further_objects():
    # top (level 1) and center (level 3) overlap when both are large: the center one wins.
    params = ts.jittered_params([ts.parse_prompt("a red square at the top and a blue square in the center")],
                                torch.Generator().manual_seed(0))
    params = params._replace(size=torch.full_like(params.size, 0.3), center=params.center.round(decimals=2))
    image, seg, depth = ts.render(params, 32)
    assert (depth == 0.75).sum() > (depth == 0.25).sum() > 0
    centre = image[0, :, 16, 16]
    assert torch.allclose(centre, torch.tensor(ts.COLORS["blue"]), atol=0.05)


def test_render_jitter_and_determinism():
    a, b = _one("a purple triangle at the top", seed=1), _one("a purple triangle at the top", seed=1)
    c = _one("a purple triangle at the top", seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
