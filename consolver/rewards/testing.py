"""Randomly initialised networks of each real reward's architecture (tests, benchmarks).

No downloads: every network is built from a small config of the real architecture
(Depth-Anything with a tiny DINOv2 backbone, SegFormer in transformers and in
segmentation-models-pytorch, CLIP, DINOv2), with image-processor constants scaled down to
match; ``full_size_model`` builds the paper's architectures at full size (GPU benchmarks).
``save_tiny`` writes a checkpoint directory the way the hub ones are laid out, so the
real ``from_pretrained`` loading code can be exercised offline.

    model, processor = tiny_model("depth")
    reward = DepthReward(model=model, processor=processor)
    save_tiny("segformer_smp", tmp_dir); SegformerReward(model=str(tmp_dir))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import nn

from consolver.rewards.clip import ClipReward
from consolver.rewards.depth import DepthReward
from consolver.rewards.dino import DinoReward
from consolver.rewards.hf import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from consolver.rewards.segformer import SegformerReward

#: kind -> registered reward name
TINY_KINDS = {"depth": "depth", "segformer_hf": "segformer", "segformer_smp": "segformer",
              "clip": "clip", "dino": "dino"}

#: kind -> reward class
REWARD_CLASSES = {"depth": DepthReward, "segformer_hf": SegformerReward, "segformer_smp": SegformerReward,
                  "clip": ClipReward, "dino": DinoReward}

#: image-processor constants of each tiny network (HF preprocessor_config.json keys)
TINY_PROCESSORS: Dict[str, Dict[str, Any]] = {
    "depth": {"size": {"height": 56, "width": 56}, "keep_aspect_ratio": True, "ensure_multiple_of": 14,
              "resample": 3, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)},
    "segformer_hf": {"size": {"height": 64, "width": 64}, "resample": 2,
                     "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)},
    "segformer_smp": {"size": {"height": 64, "width": 64}, "resample": 2,
                      "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)},
    "clip": {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
             "resample": 3, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)},
    "dino": {"size": {"shortest_edge": 32}, "crop_size": {"height": 28, "width": 28}, "do_center_crop": True,
             "resample": 3, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)},
}


def _tiny_dinov2_config(**kwargs: Any):
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=28, patch_size=14, **kwargs)


def _build(kind: str) -> nn.Module:
    import transformers as tf

    if kind == "depth":
        backbone = _tiny_dinov2_config(out_features=["stage1", "stage2"], reshape_hidden_states=False)
        return tf.DepthAnythingForDepthEstimation(tf.DepthAnythingConfig(
            backbone_config=backbone, reassemble_hidden_size=32, reassemble_factors=[2, 1],
            neck_hidden_sizes=[16, 32], fusion_hidden_size=16, head_hidden_size=8, patch_size=14))
    if kind == "segformer_hf":
        return tf.SegformerForSemanticSegmentation(tf.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
            strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=150))
    if kind == "segformer_smp":
        import segmentation_models_pytorch as smp

        return smp.Segformer(encoder_name="mit_b0", encoder_weights=None, decoder_segmentation_channels=64,
                             classes=150)
    if kind == "clip":
        return tf.CLIPModel(tf.CLIPConfig(
            text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8),
            projection_dim=16))
    if kind == "dino":
        return tf.Dinov2Model(_tiny_dinov2_config())
    raise ValueError(f"unknown tiny model kind {kind!r}; valid: {', '.join(TINY_KINDS)}")


def full_size_model(kind: str, seed: int = 0) -> Tuple[nn.Module, Dict[str, Any]]:
    """The paper's reward architecture of ``kind`` at full size with random weights (no
    download; for GPU benchmarks) and the real checkpoint's processor constants."""
    import transformers as tf

    dinov2 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                  image_size=518, patch_size=14)
    builders = {
        "depth": lambda: tf.DepthAnythingForDepthEstimation(tf.DepthAnythingConfig(backbone_config=tf.Dinov2Config(
            **dinov2, out_features=["stage3", "stage6", "stage9", "stage12"], reshape_hidden_states=False),
            reassemble_hidden_size=384, neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64)),
        "segformer_hf": lambda: tf.SegformerForSemanticSegmentation(tf.SegformerConfig(
            depths=[3, 8, 27, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768, num_labels=150)),
        "segformer_smp": lambda: __import__("segmentation_models_pytorch").Segformer(
            encoder_name="mit_b4", encoder_weights=None, classes=150),
        "clip": lambda: tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=224, patch_size=14, projection_dim=768)),
        "dino": lambda: tf.Dinov2Model(tf.Dinov2Config(**{**dinov2, "hidden_size": 768, "num_attention_heads": 12,
                                                          "intermediate_size": 3072})),
    }
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = builders[kind]().eval()
    return model, dict(REWARD_CLASSES[kind].processor_defaults)


def tiny_model(kind: str, seed: int = 0) -> Tuple[nn.Module, Dict[str, Any]]:
    """A randomly initialised tiny network of ``kind`` (eval mode) and its processor constants."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _build(kind)
    return model.eval(), dict(TINY_PROCESSORS[kind])


def hf_image_processor(kind: str, backend: str = "pil", config: Mapping[str, Any] | None = None):
    """The transformers image processor a checkpoint of ``kind`` would ship, with ``config``
    (default: the tiny constants); ``backend="pil"``: the PIL/numpy implementation, as in the
    paper's code, else the library default."""
    import transformers as tf

    base = {"depth": "DPTImageProcessor", "segformer_hf": "SegformerImageProcessor",
            "segformer_smp": "SegformerImageProcessor", "clip": "CLIPImageProcessor",
            "dino": "BitImageProcessor"}[kind]
    cls = getattr(tf, base + "Pil", None) if backend == "pil" else None
    return (cls or getattr(tf, base))(**(TINY_PROCESSORS[kind] if config is None else config))


def save_tiny(kind: str, directory: str | Path, seed: int = 0) -> nn.Module:
    """Write a tiny ``kind`` checkpoint to ``directory`` as the hub lays it out (transformers:
    ``save_pretrained`` + ``preprocessor_config.json``; SMP: ``save_pretrained`` + an
    albumentations eval config). Returns the saved model."""
    model, processor = tiny_model(kind, seed)
    directory = Path(directory)
    model.save_pretrained(directory)
    if kind == "segformer_smp":
        transforms = [{"__class_fullname__": "Resize", **processor["size"], "interpolation": 1, "p": 1.0},
                      {"__class_fullname__": "Normalize", "mean": processor["image_mean"],
                       "std": processor["image_std"], "max_pixel_value": 255.0, "p": 1.0}]
        config = {"__version__": "1.4.21", "transform": {"__class_fullname__": "Compose", "p": 1.0,
                                                         "transforms": transforms}}
        (directory / "albumentations_config_eval.json").write_text(json.dumps(config, indent=2))
    else:
        hf_image_processor(kind, backend="default").save_pretrained(directory)
    return model


__all__ = ["REWARD_CLASSES", "TINY_KINDS", "TINY_PROCESSORS", "full_size_model", "hf_image_processor", "save_tiny", "tiny_model"]
