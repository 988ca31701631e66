"""Sample quality of the toy diffusion model, scored against what each class prompt describes.

What is compared (positions, sizes and colors jitter, so no single render is *the* answer):

- **seg agreement**: the toy segmentation reward network (``ToySegReward``) labels every pixel
  of a sample with a shape class (``toy_scenes.SEG_CLASSES``); its argmax mask is compared
  with the label mask of the prompt's **canonical render** (nominal positions, mean size, no
  jitter): pixel agreement x100 (the ``toy_seg`` reward's scale) and mIoU over the classes
  present. Jittered *real* renders of the same prompts, scored the same way, give the ceiling
  (jitter alone moves edges by up to ~2 px).
- **color error**: for every object, the mean RGB of the sample inside the object's *core*
  (the canonical shape at half size, minus anything a nearer object could cover) against the
  prompt's nominal color; Euclidean distance in [0, 1] RGB units, averaged over objects.

Baselines for "is it the prompted scene": unconditional samples (the null class) and samples
of another class (class ``c + 1``), scored against class ``c``'s labels.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from consolver.backends import toy_scenes
from consolver.rewards.toy import segmentation_miou

logger = logging.getLogger(__name__)

MAX_SIZE_FACTOR = toy_scenes.SIZE_JITTER[1] / (sum(toy_scenes.SIZE_JITTER) / 2)


def canonical_params(scenes: Sequence) -> toy_scenes.RenderParams:
    """Render parameters of ``scenes`` without jitter: nominal positions and colors, the mean
    size, the first background."""
    B, L = len(scenes), toy_scenes.MAX_OBJECTS
    f64 = dict(dtype=torch.float64)
    shape, level = torch.zeros(B, L, dtype=torch.long), torch.ones(B, L, dtype=torch.long)
    present = torch.zeros(B, L, dtype=torch.bool)
    color, center = torch.zeros(B, L, 3, **f64), torch.full((B, L, 2), 0.5, **f64)
    for b, scene in enumerate(scenes):
        for j, obj in enumerate(scene):
            shape[b, j], level[b, j], present[b, j] = (toy_scenes.SHAPES.index(obj.shape),
                                                       toy_scenes.POSITION_LEVELS[obj.position], True)
            color[b, j] = torch.tensor(toy_scenes.COLORS[obj.color], **f64)
            center[b, j] = torch.tensor(toy_scenes.POSITIONS[obj.position], **f64)
    size = torch.full((B, L), toy_scenes.BASE_SIZE * sum(toy_scenes.SIZE_JITTER) / 2, **f64)
    background = torch.tensor(toy_scenes.BACKGROUNDS[0], **f64).expand(B, 3).clone()
    return toy_scenes.RenderParams(shape, color, center, size, level, present, background)


def canonical_labels(prompts: Sequence[str], resolution: int = 32) -> torch.Tensor:
    """Label masks ``[P, r, r]`` long (``SEG_CLASSES`` indices) of the prompts' canonical renders."""
    scenes = [toy_scenes.parse_prompt(p) for p in prompts]
    return toy_scenes.render(canonical_params(scenes), resolution)[1]


def object_cores(prompts: Sequence[str], resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cores [P, L, r, r] bool, colors [P, L, 3] float)``: each object's core pixels (the
    canonical shape at half size, minus the largest jittered extent of nearer objects) and its
    nominal RGB in [0, 1]; absent objects have empty cores."""
    params = canonical_params([toy_scenes.parse_prompt(p) for p in prompts])
    P, L = params.shape.shape
    cores = torch.zeros(P, L, resolution, resolution, dtype=torch.bool)
    for j in range(L):
        only = params.present.clone()
        only[:, :j] = only[:, j + 1:] = False
        core = toy_scenes.render(params._replace(present=only, size=params.size * 0.5), resolution)[1] > 0
        nearer = params.present.clone()
        nearer[:, :j + 1] = False
        grown = params._replace(present=nearer, size=params.size * MAX_SIZE_FACTOR)
        occluder = toy_scenes.render(grown, resolution)[1] > 0
        cores[:, j] = core & ~occluder & params.present[:, j, None, None]
    return cores, params.color.float()


def color_error(images: torch.Tensor, cores: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """Mean over objects of ``||mean RGB in the core - nominal RGB||_2``, ``[B]`` in [0, sqrt 3].

    Args: ``images [B, 3, r, r]`` in [0, 1]; ``cores [B, L, r, r]`` bool; ``colors [B, L, 3]``.
    """
    weights = cores.float()
    count = weights.flatten(2).sum(-1)  # [B, L]
    mean_rgb = torch.einsum("bchw,blhw->blc", images.float(), weights) / count.clamp(min=1)[..., None]
    err = (mean_rgb - colors).norm(dim=-1)
    valid = count > 0
    return (err * valid).sum(1) / valid.sum(1).clamp(min=1)


def score_images(images: torch.Tensor, prompts: Sequence[str], seg_reward) -> dict[str, torch.Tensor]:
    """Per-image scores of ``images [B, 3, r, r]`` in [0, 1] against ``prompts`` (one per image).

    Returns ``{"seg_agreement": [B] in [0, 100], "miou": [B] in [0, 1], "color_error": [B]}``.
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
    resolution = images.shape[-1]
    labels = canonical_labels(prompts, resolution)
    pred = seg_reward.predict_mask(images).cpu()
    if pred.shape[-1] != resolution:
        raise ValueError(f"the seg network works at {pred.shape[-1]} px, the images are {resolution} px")
    num_classes = len(toy_scenes.SEG_CLASSES)
    miou = torch.tensor([segmentation_miou(p[None], t[None], num_classes) for p, t in zip(pred, labels)])
    cores, colors = object_cores(prompts, resolution)
    return {"seg_agreement": 100 * (pred == labels).float().flatten(1).mean(1), "miou": miou,
            "color_error": color_error(images.cpu(), cores, colors)}


def real_renders(prompts: Sequence[str], generator: torch.Generator, resolution: int = 32) -> torch.Tensor:
    """Jittered renders ``[B, 3, r, r]`` in [0, 1] of ``prompts`` (the data distribution)."""
    scenes = [toy_scenes.parse_prompt(p) for p in prompts]
    return toy_scenes.render(toy_scenes.jittered_params(scenes, generator), resolution)[0]


def _mean(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.float().mean()) for k, v in scores.items()}


def evaluate_classes(unet, scheduler_config, class_prompts: Sequence[str], seg_reward, samples_per_class: int = 16,
                     num_steps: int = 25, guidance: float = 2.0, sampler: str = "dpmsolver++", seed: int = 0,
                     batch_size: int = 128, progress=None) -> dict:
    """Generate ``samples_per_class`` images per class (and as many unconditional ones) and score them.

    Returns ``{"settings", "classes": [{"id", "prompt", "generated", "real", "null", "wrong_class"}],
    "mean": {...}, "samples": [C, N, 3, r, r] tensor}``; each score entry is the mean of
    :func:`score_images` over that class's images (``wrong_class``: class ``c + 1``'s samples
    scored against class ``c``; ``null``: the unconditional samples scored against class ``c``).
    ``progress``: optional callable ``(done, total)`` after every generated batch.
    """
    from consolver.toy_diffusion.sampling import sample

    C, N = len(class_prompts), samples_per_class
    ids = torch.arange(C + 1).repeat_interleave(N)  # the last N: the null class
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(ids), 3, unet.config.sample_size, unet.config.sample_size, generator=generator)
    chunks = []
    for start in range(0, len(ids), batch_size):
        chunks.append(sample(unet, scheduler_config, ids[start:start + batch_size], num_steps, guidance, sampler,
                             noise=noise[start:start + batch_size]))
        if progress is not None:
            progress(min(start + batch_size, len(ids)), len(ids))
    images = torch.cat(chunks).reshape(C + 1, N, *noise.shape[1:])
    real = real_renders([p for p in class_prompts for _ in range(N)], generator,
                        unet.config.sample_size).reshape(C, N, *noise.shape[1:])
    rows = []
    for c, prompt in enumerate(class_prompts):
        prompts = [prompt] * N
        rows.append({"id": c, "prompt": prompt, "split": toy_scenes.prompt_split(prompt),
                     "generated": _mean(score_images(images[c], prompts, seg_reward)),
                     "real": _mean(score_images(real[c], prompts, seg_reward)),
                     "null": _mean(score_images(images[C], prompts, seg_reward)),
                     "wrong_class": _mean(score_images(images[(c + 1) % C], prompts, seg_reward))})
    mean = {kind: {k: sum(r[kind][k] for r in rows) / C for k in rows[0][kind]}
            for kind in ("generated", "real", "null", "wrong_class")}
    settings = {"samples_per_class": N, "num_steps": num_steps, "guidance": guidance, "sampler": sampler, "seed": seed}
    logger.info("toy diffusion quality: generated %s, real %s", mean["generated"], mean["real"])
    return {"settings": settings, "classes": rows, "mean": mean, "samples": images[:C], "null_samples": images[C],
            "real_samples": real}


__all__ = ["canonical_labels", "canonical_params", "color_error", "evaluate_classes", "object_cores", "real_renders",
           "score_images"]
