"""The toy world's scenes: vocabulary, compositional prompts, a fixed train/held-out split,
and a batched procedural renderer that also draws per-pixel labels.

A scene is 1-3 objects ``(color, shape, position)`` with distinct positions, e.g.
``"a red circle on the left"`` or ``"a blue square at the top and a green triangle on the
right"`` (clauses joined by ``", "`` / ``" and "``). Objects are layered along a ground
plane: the higher an object sits in the frame the further away it is, so it is drawn first
and may be occluded by nearer ones (``POSITION_LEVELS``). The depth label is that layer's
*inverse* depth (disparity-like, as monocular depth networks predict): background 0,
nearer layers larger, in [0, 1].

Split: a prompt is **held-out** iff one of its objects is a (color, shape) pair in
``HELDOUT_PAIRS``; training prompts never contain those pairs. The split is a fixed rule,
independent of any seed; :func:`prompt_list` enumerates each split in a fixed order.

Coordinates are fractions of the image side, ``x`` to the right and ``y`` down; renders are
anti-aliased from signed distance functions and work at any resolution.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (0.85, 0.15, 0.15),
    "green": (0.15, 0.68, 0.25),
    "blue": (0.15, 0.30, 0.88),
    "yellow": (0.96, 0.86, 0.12),
    "purple": (0.58, 0.20, 0.78),
    "orange": (0.98, 0.52, 0.08),
}
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
#: Ground-plane layering: 1 = furthest (drawn first) .. 4 = nearest. Same level never overlaps.
POSITION_LEVELS = {"top": 1, "left": 2, "right": 2, "center": 3, "bottom": 4}
NUM_LEVELS = 4
#: Plain muted backgrounds (RGB in [0, 1]); one per render, brightness-jittered.
BACKGROUNDS = ((0.80, 0.80, 0.78), (0.24, 0.25, 0.28), (0.90, 0.85, 0.72), (0.30, 0.38, 0.46))
#: (color, shape) combinations reserved for the held-out split (one per color).
HELDOUT_PAIRS = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square"),
                           ("yellow", "diamond"), ("purple", "circle"), ("orange", "square")})
SPLITS = ("train", "heldout")
MAX_OBJECTS = 3
#: Segmentation classes: 0 = background, ``1 + SHAPES.index(shape)``.
SEG_CLASSES = ("background",) + SHAPES

BASE_SIZE = 0.15  # object "radius" as a fraction of the image side
POSITION_JITTER = 0.05
SIZE_JITTER = (0.85, 1.2)
BACKGROUND_JITTER = 0.04
COLOR_JITTER = 0.03
_CATALOGUE_SEED = 20240611  # fixes the order of prompt_list(); never a config value


class SceneObject(NamedTuple):
    color: str
    shape: str
    position: str

    @property
    def phrase(self) -> str:
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape} {POSITION_PHRASES[self.position]}"


Scene = tuple  # tuple[SceneObject, ...], canonical order (see canonical_scene)


def vocabulary() -> str:
    """One line listing every word a prompt may use."""
    return (f"shapes: {', '.join(SHAPES)}; colors: {', '.join(COLORS)}; positions: "
            f"{', '.join(POSITIONS)} (as {', '.join(repr(p) for p in POSITION_PHRASES.values())})")


_CLAUSE = re.compile(r"^an?\s+(\S+)\s+(\S+)\s+(?:on|at|in)\s+the\s+(\S+)$")


def canonical_scene(objects: Sequence[SceneObject]) -> Scene:
    """Objects sorted into the canonical (and drawing) order: back to front, then by position."""
    order = list(POSITIONS)
    return tuple(sorted(objects, key=lambda o: (POSITION_LEVELS[o.position], order.index(o.position))))


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt describes. Case, extra spaces and a final period are ignored.

    Raises:
        ValueError: malformed prompt, unknown word (the message lists the vocabulary), two
            objects at one position, or more than ``MAX_OBJECTS`` objects.
    """
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    clauses = [c for c in re.split(r"\s*,\s*(?:and\s+)?|\s+and\s+", text) if c]
    if not clauses:
        raise ValueError(f"empty toy prompt {prompt!r}; write e.g. 'a red circle on the left'. Vocabulary: {vocabulary()}")
    if len(clauses) > MAX_OBJECTS:
        raise ValueError(f"toy prompt {prompt!r} has {len(clauses)} objects; at most {MAX_OBJECTS}")
    objects = []
    for clause in clauses:
        match = _CLAUSE.match(clause)
        if match is None:
            raise ValueError(f"cannot parse {clause!r} in toy prompt {prompt!r}; expected "
                             f"'a <color> <shape> <on|at|in> the <position>'. Vocabulary: {vocabulary()}")
        color, shape, position = match.groups()
        for kind, word, valid in (("color", color, COLORS), ("shape", shape, SHAPES), ("position", position, POSITIONS)):
            if word not in valid:
                raise ValueError(f"unknown {kind} {word!r} in toy prompt {prompt!r}. Vocabulary: {vocabulary()}")
        objects.append(SceneObject(color, shape, position))
    positions = [o.position for o in objects]
    if len(set(positions)) != len(positions):
        raise ValueError(f"toy prompt {prompt!r} puts two objects at the same position")
    return canonical_scene(objects)


def scene_prompt(scene: Sequence[SceneObject]) -> str:
    """Canonical prompt text of a scene, e.g. ``"a blue square at the top and a green triangle on the right"``."""
    phrases = [o.phrase for o in canonical_scene(scene)]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def canonical_prompt(prompt: str) -> str:
    return scene_prompt(parse_prompt(prompt))


def scene_split(scene: Sequence[SceneObject]) -> str:
    """``"heldout"`` if any object is a held-out (color, shape) pair, else ``"train"``."""
    return "heldout" if any((o.color, o.shape) in HELDOUT_PAIRS for o in scene) else "train"


def prompt_split(prompt: str) -> str:
    return scene_split(parse_prompt(prompt))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown toy prompt split {split!r}; valid splits: {', '.join(SPLITS)}")


def random_scene(rng: np.random.Generator, split: Optional[str] = None) -> Scene:
    """A uniformly random scene (1..MAX_OBJECTS objects, as likely each), of ``split`` if given."""
    if split is not None:
        _check_split(split)
    colors, positions = list(COLORS), list(POSITIONS)
    while True:
        n = int(rng.integers(1, MAX_OBJECTS + 1))
        where = rng.choice(len(positions), size=n, replace=False)
        scene = canonical_scene([SceneObject(colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))],
                                             positions[p]) for p in where])
        if split is None or scene_split(scene) == split:
            return scene


def prompt_list(split: str, n: int) -> list[str]:
    """The first ``n`` distinct canonical prompts of ``split`` in a fixed order (prefix-stable:
    ``prompt_list(s, n)`` starts with ``prompt_list(s, m)`` for ``m < n``)."""
    _check_split(split)
    rng = np.random.default_rng([_CATALOGUE_SEED, SPLITS.index(split)])
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen.setdefault(scene_prompt(random_scene(rng, split)), None)
    return list(seen)


class RenderParams(NamedTuple):
    """Batched scene parameters for :func:`render`, layers back to front.

    shape ``[B, L]`` long (index into SHAPES), color ``[B, L, 3]``, center ``[B, L, 2]`` (x, y),
    size ``[B, L]``, level ``[B, L]`` long (1..NUM_LEVELS), present ``[B, L]`` bool,
    background ``[B, 3]``. Floats are float64 fractions / RGB in [0, 1].
    """

    shape: torch.Tensor
    color: torch.Tensor
    center: torch.Tensor
    size: torch.Tensor
    level: torch.Tensor
    present: torch.Tensor
    background: torch.Tensor


def jittered_params(scenes: Sequence[Scene], generator: torch.Generator) -> RenderParams:
    """Render parameters for ``scenes`` with random position, size, color and background jitter."""
    B, L = len(scenes), MAX_OBJECTS
    f64 = dict(dtype=torch.float64)
    shape = torch.zeros(B, L, dtype=torch.long)
    level = torch.ones(B, L, dtype=torch.long)
    present = torch.zeros(B, L, dtype=torch.bool)
    color, center = torch.zeros(B, L, 3, **f64), torch.full((B, L, 2), 0.5, **f64)
    for b, scene in enumerate(scenes):
        for j, obj in enumerate(scene):
            shape[b, j], level[b, j], present[b, j] = SHAPES.index(obj.shape), POSITION_LEVELS[obj.position], True
            color[b, j] = torch.tensor(COLORS[obj.color], **f64)
            center[b, j] = torch.tensor(POSITIONS[obj.position], **f64)
    uniform = lambda *size: torch.rand(*size, generator=generator, **f64)  # noqa: E731
    center = center + (2 * uniform(B, L, 2) - 1) * POSITION_JITTER
    size = BASE_SIZE * (SIZE_JITTER[0] + (SIZE_JITTER[1] - SIZE_JITTER[0]) * uniform(B, L))
    color = (color + (2 * uniform(B, L, 1) - 1) * COLOR_JITTER).clamp(0, 1)
    palette = torch.tensor(BACKGROUNDS, **f64)
    pick = torch.randint(len(BACKGROUNDS), (B,), generator=generator)
    background = (palette[pick] + (2 * uniform(B, 1) - 1) * BACKGROUND_JITTER).clamp(0, 1)
    return RenderParams(shape, color, center, size, level, present, background)


def _sdf_triangle(px: torch.Tensor, py: torch.Tensor, half_side: torch.Tensor) -> torch.Tensor:
    """Signed distance to an upward equilateral triangle centred at its centroid (y down)."""
    k = 3.0**0.5
    x, y = px.abs() - half_side, -py + half_side / k
    fold = x + k * y > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - torch.minimum(torch.maximum(x, -2 * half_side), torch.zeros_like(x))
    return -torch.sqrt(x * x + y * y) * torch.sign(y)


def shape_sdf(shape: torch.Tensor, px: torch.Tensor, py: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of shapes ``[B]`` at offsets ``px, py [B, H, W]``
    from their centres; ``size [B]`` is the radius-like size, areas are about ``pi size^2``."""
    r = size[:, None, None]
    circle = torch.sqrt(px * px + py * py) - r
    qx, qy = px.abs() - 0.87 * r, py.abs() - 0.87 * r
    square = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)
    diamond = (px.abs() + py.abs() - 1.23 * r) / 2**0.5
    triangle = _sdf_triangle(px, py, 1.32 * r)
    stacked = torch.stack([circle, square, triangle, diamond], 0)  # order of SHAPES
    return stacked.gather(0, shape[None, :, None, None].expand(1, *px.shape))[0]


def render(params: RenderParams, resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw scenes back to front.

    Returns:
        image ``[B, 3, H, W]`` float32 in [0, 1]; seg ``[B, H, W]`` long class index (0 =
        background, see SEG_CLASSES); depth ``[B, H, W]`` float32 inverse depth in [0, 1]
        (0 background, ``level / NUM_LEVELS`` on a shape). A pixel is labelled with the nearest
        layer that covers at least half of it.
    """
    B, L = params.shape.shape
    coords = (torch.arange(resolution, dtype=torch.float64) + 0.5) / resolution
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    image = params.background[:, :, None, None].expand(B, 3, resolution, resolution).clone()
    seg = torch.zeros(B, resolution, resolution, dtype=torch.long)
    depth = torch.zeros(B, resolution, resolution, dtype=torch.float64)
    for j in range(L):
        px = gx - params.center[:, j, 0, None, None]
        py = gy - params.center[:, j, 1, None, None]
        sdf = shape_sdf(params.shape[:, j], px, py, params.size[:, j])
        alpha = (0.5 - sdf * resolution).clamp(0, 1) * params.present[:, j, None, None]
        image = image * (1 - alpha[:, None]) + params.color[:, j, :, None, None] * alpha[:, None]
        covered = alpha >= 0.5
        seg = torch.where(covered, params.shape[:, j, None, None] + 1, seg)
        depth = torch.where(covered, params.level[:, j, None, None] / NUM_LEVELS, depth)
    return image.float(), seg, depth.float()


def render_scenes(scenes: Sequence[Scene], resolution: int = 32, generator: Optional[torch.Generator] = None):
    """Jittered renders of ``scenes``: ``(image [B,3,H,W], seg [B,H,W], depth [B,H,W])``, see :func:`render`."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return render(jittered_params(scenes, generator), resolution)


__all__ = [
    "BACKGROUNDS", "COLORS", "HELDOUT_PAIRS", "MAX_OBJECTS", "NUM_LEVELS", "POSITIONS", "POSITION_LEVELS",
    "SEG_CLASSES", "SHAPES", "SPLITS", "RenderParams", "SceneObject", "canonical_prompt", "jittered_params",
    "parse_prompt", "prompt_list", "prompt_split", "random_scene", "render", "render_scenes", "scene_prompt",
    "scene_split", "vocabulary",
]
