"""Segmentation reward (``segformer``): pixel agreement of SegFormer argmax masks, x100.

Network: an ADE20k SegFormer, either a segmentation-models-pytorch checkpoint
(``smp.from_pretrained``; default ``smp-hub/segformer-b4-512x512-ade-160k``, the SMP port of
the B4 ADE20k 512x512 model) or a transformers one (``SegformerForSemanticSegmentation``,
e.g. the paper's ``nvidia/segformer-b4-finetuned-ade-512-512``). Which library a directory or
hub id belongs to is read from its ``config.json`` (SMP writes ``_model_class``, transformers
writes ``model_type: segformer``). Masks are compared at the logits' native resolution (1/4 of
the network input for both libraries), so no 150-channel full-size upsampling is ever made.

    reward = SegformerReward()                                    # [B] in [0, 100]
    reward = SegformerReward(model="nvidia/segformer-b4-finetuned-ade-512-512")
    feats = reward.features(target)                               # [B, h, w] class ids, cacheable
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from consolver.rewards.base import register_reward
from consolver.rewards.hf import (
    IMAGENET_MEAN, IMAGENET_STD, PretrainedReward, load_pretrained, load_transformers, not_available, read_json,
    safetensors_snapshot,
)


def is_smp_model(model: nn.Module) -> bool:
    """True for segmentation-models-pytorch models (encoder, decoder, segmentation_head)."""
    try:
        from segmentation_models_pytorch.base import SegmentationModel
    except ImportError:  # pragma: no cover - smp is a dependency
        return False
    return isinstance(model, SegmentationModel)


def smp_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Class logits of an SMP model at its decoder resolution: the head's final upsampling
    (bilinear) and activation (monotonic) are skipped, they do not change the argmax mask
    beyond interpolation and would cost a full-size ``[B, classes, H, W]`` tensor."""
    head = model.segmentation_head
    if not (isinstance(head, nn.Sequential) and len(head) == 3 and isinstance(head[0], nn.Conv2d)):
        return model(pixel_values)
    if hasattr(model, "check_input_shape"):
        model.check_input_shape(pixel_values)
    return head[0](model.decoder(model.encoder(pixel_values)))


def _walk(node: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(node, Mapping):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def albumentations_processor(config: Optional[Mapping[str, Any]]) -> Optional[dict]:
    """Image-processor keys from an SMP hub ``albumentations_config_eval.json`` (its ``Resize``
    and ``Normalize`` transforms), or ``None``."""
    if not config:
        return None
    out: dict = {}
    for node in _walk(config):
        kind = str(node.get("__class_fullname__", "")).rsplit(".", 1)[-1]
        if kind == "Normalize" and "mean" in node and "std" in node:
            out["image_mean"], out["image_std"] = list(node["mean"]), list(node["std"])
        elif kind == "Resize" and "height" in node and "width" in node:
            out["size"] = {"height": int(node["height"]), "width": int(node["width"])}
    return out or None


@register_reward("segformer")
class SegformerReward(PretrainedReward):
    """Percentage ``[B]`` in [0, 100] of pixels whose argmax class agrees with the target's.

    Args:
        model: hub id or local directory of an SMP or transformers SegFormer checkpoint, or a
            built model (``smp.Segformer`` or ``SegformerForSemanticSegmentation``).
            Default: ``smp-hub/segformer-b4-512x512-ade-160k``.
        dtype: autocast dtype for the network: ``None``/``float32``, ``float16``, ``bfloat16``.
        processor: image-processor config keys overriding the checkpoint's
            (e.g. ``{"size": {"height": 512, "width": 512}}``).
    """

    default_model = "smp-hub/segformer-b4-512x512-ade-160k"
    processor_defaults = {"size": {"height": 512, "width": 512}, "resample": 2,
                          "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}

    def __init__(self, model: Any = None, dtype: Any = None, processor: Optional[Mapping[str, Any]] = None):
        super().__init__(model=model, dtype=dtype, processor=processor)
        self.is_smp = is_smp_model(self.model)

    def load_model(self, source: str) -> nn.Module:
        config = read_json(source, "config.json")
        if config is None:
            raise not_available(self.name, source, "its config.json is not in a local directory or the Hub cache")
        if "_model_class" in config:
            import segmentation_models_pytorch as smp

            def load(src: str, **kw: Any) -> nn.Module:  # from model.safetensors, never SMP's pickle fallback
                return smp.from_pretrained(safetensors_snapshot(src, self.name, kw.get("local_files_only", False)), **kw)

            return load_pretrained(load, source, self.name)
        if config.get("model_type") == "segformer":
            from transformers import SegformerForSemanticSegmentation

            return load_transformers(SegformerForSemanticSegmentation, source, self.name)
        raise ValueError(f"reward 'segformer': {source!r} is neither a segmentation-models-pytorch checkpoint "
                         f"(config.json with _model_class) nor a transformers SegFormer (model_type 'segformer')")

    def checkpoint_processor(self, source: str) -> Optional[dict]:
        return read_json(source, "preprocessor_config.json") or albumentations_processor(
            read_json(source, "albumentations_config_eval.json"))

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, classes, h, w]`` (h, w: 1/4 of the network input)."""
        if self.is_smp:
            return smp_logits(self.model, pixel_values)
        return self.model(pixel_values=pixel_values).logits

    def masks(self, images: torch.Tensor) -> torch.Tensor:
        """Argmax class masks ``[B, h, w]`` (uint8 when there are <= 256 classes, else int32)."""
        logits = self.run(images)
        return logits.argmax(1).to(torch.uint8 if logits.shape[1] <= 256 else torch.int32)

    def features(self, target: torch.Tensor) -> torch.Tensor:
        """Target class masks ``[B, h, w]`` from images ``[B, 3, H, W]`` in [0, 1]."""
        return self.masks(target)

    def score(self, preview: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        """Pixel agreement x100 ``[B]`` in [0, 100] of the preview's mask with the cached one."""
        pred = self.masks(preview)
        target = target_features.to(pred.device)
        if pred.shape[-2:] != target.shape[-2:]:
            pred = F.interpolate(pred[:, None].float(), size=target.shape[-2:], mode="nearest")[:, 0].to(pred.dtype)
        return (pred.long() == target.long()).float().flatten(1).mean(1) * 100.0


__all__ = ["SegformerReward", "albumentations_processor", "is_smp_model", "smp_logits"]
