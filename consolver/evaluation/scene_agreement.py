"""Scene agreement on a model trained on toy scenes: does the preview show the same scene as its
full-step final?

With class guidance every solver keeps the class, so the question matters where the *noise*
decides the scene: null-class (unconditional) samples, prompt ``none``. A
:class:`SceneClassifier` labels an image with the nearest of the model's classes, each class
represented by jittered renders of its toy prompt (``consolver.backends.toy_scenes``: every
background, position, size and color jitter the model was trained on); ``scene_agreement`` is 1
where preview and final get the same label.

Nearest neighbour runs on the *foreground* (object colours and a soft object mask; the
background, taken as the median colour of the outermost pixel ring, is removed), 2x2-average-
pooled (16x16 for 32 px): tolerant to a pixel of edge noise and to any background colour, still
far apart for scenes that differ by an object, a shape or a colour. Fresh jittered renders of a
class are classified as that class, also on backgrounds of random colours
(``tests/test_scene_agreement.py``).

:func:`scene_classifier_for` builds one for any backend whose class names (``id2label`` of a
diffusers pipeline directory) are all toy prompts, such as ``data/toy_unet``; for other backends
it returns ``None`` and no scene agreement is reported.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

#: Jittered renders per class (all four backgrounds about equally often).
RENDERS_PER_CLASS = 64
#: Seed of the renders: fixed, so the metric is the same in every run.
RENDER_SEED = 1234


#: A pixel is foreground when it differs from the background colour by more than about this
#: (max over channels, a soft ramp of width ``FOREGROUND_RAMP``).
FOREGROUND_THRESHOLD = 0.12
FOREGROUND_RAMP = 0.1


def background_color(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3]``: the per-channel median of each image's outermost pixel ring (toy objects stay
    inside the frame, so the ring is background)."""
    ring = torch.cat([images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0], images[..., 1:-1, -1]], dim=-1)
    return ring.median(dim=-1).values


def foreground(images: torch.Tensor) -> torch.Tensor:
    """``[B, 4, H, W]``: the RGB of the objects with the background zeroed, and the soft
    foreground mask in [0, 1]. Independent of the background colour, which a trained model may
    get wrong (``data/toy_unet``'s backgrounds drift off the palette; the noise decides them)
    without changing the scene."""
    distance = (images - background_color(images)[..., None, None]).abs().amax(1, keepdim=True)
    mask = ((distance - FOREGROUND_THRESHOLD) / FOREGROUND_RAMP + 0.5).clamp(0, 1)
    return torch.cat([images * mask, mask], dim=1)


class SceneClassifier:
    """Nearest-class labels of images among jittered renders of toy prompts.

    Args:
        prompts: ``[C]`` toy prompts (``toy_scenes.parse_prompt`` syntax); label ``c`` is ``prompts[c]``.
        class_ids: ``[C]`` the label to return for each prompt (default ``0..C-1``, e.g. a model's
            class ids).
        resolution: side of the images to classify (they are resized to it if needed).
        renders_per_class: jittered renders that represent each class.
        seed: render jitter seed.
    """

    def __init__(self, prompts: Sequence[str], class_ids: Optional[Sequence[int]] = None, resolution: int = 32,
                 renders_per_class: int = RENDERS_PER_CLASS, seed: int = RENDER_SEED):
        from consolver.backends.toy_scenes import parse_prompt, render_scenes

        if not prompts:
            raise ValueError("SceneClassifier needs at least one toy prompt")
        if class_ids is not None and len(class_ids) != len(prompts):
            raise ValueError(f"{len(class_ids)} class ids for {len(prompts)} prompts")
        self.prompts = [str(p) for p in prompts]
        self.class_ids = torch.tensor(list(class_ids) if class_ids is not None else range(len(prompts)),
                                      dtype=torch.int64)
        self.resolution = int(resolution)
        scenes = [parse_prompt(p) for p in self.prompts for _ in range(renders_per_class)]
        images, _, _ = render_scenes(scenes, self.resolution, torch.Generator().manual_seed(int(seed)))
        self.templates = self.features(images)  # [C * n, D]
        self.template_label = self.class_ids.repeat_interleave(renders_per_class)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` float32 of images ``[B, 3, H, W]`` in [0, 1]: the foreground (objects) alone,
        background-free (see :func:`foreground`), at ``resolution``, 2x2-average-pooled, flattened."""
        x = images.detach().float().cpu()
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="area")
        return F.avg_pool2d(foreground(x), 2).flatten(1)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Labels ``[B]`` int64 (on the CPU) of images ``[B, 3, H, W]`` in [0, 1]."""
        f = self.features(images)
        d = (f.square().sum(1, keepdim=True) - 2 * f @ self.templates.T
             + self.templates.square().sum(1)[None])  # [B, C * n] squared distances, one matmul
        return self.template_label[d.argmin(1)]

    def agreement(self, preview: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``[B]`` float32, 1.0 where preview and target images get the same label, else 0.0."""
        return (self.classify(preview) == self.classify(target)).float()


def toy_class_prompts(backend) -> Optional[tuple[list[str], list[int]]]:
    """``(prompts, class ids)`` of a class-conditional backend whose every labelled class is a toy
    prompt (``model_index.json`` ``id2label``, the null class left out), else ``None``."""
    from consolver.backends.class_labels import UNCONDITIONAL_PROMPTS
    from consolver.backends.toy_scenes import parse_prompt

    index = getattr(backend, "model_index", None)
    id2label = (index or {}).get("id2label") if isinstance(index, dict) else None
    if not id2label or not getattr(backend, "conditional", False):
        return None
    prompts, ids = [], []
    for key in sorted(id2label, key=int):
        text = str(id2label[key]).strip()
        if int(key) == backend.null_class or text.lower() in UNCONDITIONAL_PROMPTS:
            continue
        try:
            parse_prompt(text)
        except ValueError:
            return None
        prompts.append(text)
        ids.append(int(key))
    return (prompts, ids) if prompts else None


def scene_classifier_for(backend) -> Optional[SceneClassifier]:
    """A :class:`SceneClassifier` over the backend's classes when they are toy prompts (see
    :func:`toy_class_prompts`), cached on the backend; else ``None``."""
    cached = getattr(backend, "_scene_classifier", False)
    if cached is not False:
        return cached
    found = toy_class_prompts(backend)
    classifier = None
    if found is not None:
        classifier = SceneClassifier(found[0], found[1], resolution=int(backend.resolution))
        logger.info("scene agreement: nearest of %d toy classes (%d renders each)", len(found[0]), RENDERS_PER_CLASS)
    try:
        backend._scene_classifier = classifier
    except AttributeError:
        pass
    return classifier


__all__ = ["RENDERS_PER_CLASS", "SceneClassifier", "background_color", "foreground", "scene_classifier_for", "toy_class_prompts"]
