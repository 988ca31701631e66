"""TensorBoard images of the training monitor: labelled, upscaled preview grids and coefficient
heatmaps with axes, values and a colour bar (pure functions: ``[3, H, W]`` float in [0, 1])."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from consolver.monitor import _diverging, draw_preview_grid, draw_table_heatmap, preview_grid, table_heatmap

LONG = "a purple circle on the left and an orange circle at the bottom"


def _dark(pixels: np.ndarray, box) -> bool:
    x0, y0, x1, y1 = (int(v) for v in box)
    return bool((pixels[y0:y1, x0:x1] < 100).all(-1).any())


def _solid(colour, n: int, side: int = 32) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.float32)[None, :, None, None].expand(n, 3, side, side).clone()


def test_preview_grid_is_upscaled_and_labelled():
    previews, targets = _solid((0.0, 1.0, 0.0), 3), _solid((1.0, 0.0, 1.0), 3)
    prompts = [LONG, "a red circle on the left", "a blue square at the top"]
    image, layout = draw_preview_grid(previews, targets, prompts, num_steps=4)
    grid = preview_grid(previews, targets, prompts, num_steps=4)
    assert grid.dtype == torch.float32 and grid.shape == (3, image.height, image.width)
    assert 0 <= float(grid.min()) and float(grid.max()) <= 1
    assert layout.tile_size >= 128 and grid.shape[1] >= 3 * 128 and grid.shape[2] >= 2 * 128
    pixels = np.asarray(image)
    tiles = sorted(layout.tiles, key=lambda t: (t.box[1], t.box[0]))
    assert [t.label for t in tiles] == ["preview K=4", "target"] * 3
    for t in tiles:  # each tile is the image, nearest-upscaled; headers are drawn above the first row
        x0, y0, x1, y1 = t.box
        colour = (0, 255, 0) if t.label.startswith("preview") else (255, 0, 255)
        assert (pixels[y0:y1, x0:x1] == colour).all()
    assert all(_dark(pixels, t.label_box) for t in tiles[:2])
    rows = [t.row for t in tiles[::2]]
    assert rows[0] == "0: a purple circle on the left\nand an orange circle at the\u2026"  # 2 lines, whole words
    assert rows[1] == "1: a red circle on the left"
    for t in tiles[::2]:  # the prompt is drawn left of its row
        assert _dark(pixels, (0, t.box[1], t.box[0] - 4, t.box[3]))
    other = preview_grid(previews, targets, ["a green square on the right", "a blue square at the top",
                                             "a red square in the center"], num_steps=4)
    assert other.shape != grid.shape or not torch.equal(other, grid)  # the labels are pixels


def test_table_heatmap_has_axes_values_and_a_colour_bar():
    table = np.array([[1.0, 0.0, 0.0], [1.5, -0.5, 0.0], [2.6, -2.1, 0.5], [1.0, 1.0, -1.0]])
    image, boxes = draw_table_heatmap(table, limit=2.0)
    tensor = table_heatmap(table, limit=2.0)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, image.height, image.width)
    assert 0 <= float(tensor.min()) and float(tensor.max()) <= 1
    K, m = table.shape
    assert sorted(boxes) == [(i, j) for i in range(K) for j in range(m)]
    pixels = np.asarray(image)
    for (i, j), (x0, y0, x1, y1) in boxes.items():
        assert tuple(pixels[y0 + 1, x0 + 1]) == _diverging(table[i, j], 2.0)  # the cell's colour
        assert (pixels[y0:y1, x0:x1] != pixels[y0 + 1, x0 + 1]).any(-1).any()  # its value is written on it
    left = min(b[0] for b in boxes.values())
    top = min(b[1] for b in boxes.values())
    for i in range(K):  # step labels left of the rows, history labels above the columns
        assert _dark(pixels, (0, boxes[(i, 0)][1], left, boxes[(i, 0)][3]))
    for j in range(m):
        assert _dark(pixels, (boxes[(0, j)][0], 0, boxes[(0, j)][2], top))
    zeros, _ = draw_table_heatmap(np.zeros((2, 2)), limit=2.0)  # all-white cells: the red and blue come from the bar
    z = np.asarray(zeros).astype(int)
    assert ((z[..., 0] > 200) & (z[..., 2] < 60)).any() and ((z[..., 2] > 200) & (z[..., 0] < 60)).any()


def test_heatmap_values_change_pixels():
    a = table_heatmap(np.array([[1.0, 0.0]]))
    b = table_heatmap(np.array([[1.0, 0.01]]))  # same colours to the eye, another number written
    assert a.shape == b.shape and not torch.equal(a, b)


def test_images_need_no_matplotlib(monkeypatch):
    """Drawn with PIL: matplotlib (and its font cache, with its console noise) is never touched."""
    for name in ("matplotlib", "matplotlib.pyplot", "matplotlib.font_manager"):
        monkeypatch.setitem(sys.modules, name, None)  # importing any of them now raises ImportError
    assert preview_grid(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), ["a"], 2).shape[0] == 3
    assert table_heatmap(np.ones((2, 2))).shape[0] == 3
