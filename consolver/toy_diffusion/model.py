"""The toy diffusion model: its classes, architecture, scheduler and pipeline directory.

The pipeline directory (written by :func:`save_pipeline`, read by :func:`load_pipeline` and by
any loader of diffusers' ``DDPMPipeline`` layout)::

    model_index.json   {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                        "scheduler": ["diffusers", "DDPMScheduler"],
                        "id2label": {"0": "a red circle on the left", ...}}
    unet/              UNet2DModel config.json + diffusion_pytorch_model.safetensors
    scheduler/         DDPMScheduler config: SD1.5's betas (scaled_linear 0.00085..0.012, 1000 steps)

Class ids ``0..C-1`` are the prompts of ``id2label``; id ``C`` (:func:`null_class_id`) is the
null class, the unconditional branch of classifier-free guidance: the *last* row of the
UNet's class embedding (``num_class_embeds = C + 1``). The model predicts epsilon for
images in [-1, 1] (``x0 = 2 image - 1``), ``[B, 3, 32, 32]``.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "data" / "toy_unet"

#: SD1.5's noise schedule (its scheduler config, less the inference-only keys), epsilon prediction.
SD15_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False}


@dataclass(frozen=True)
class ToyUNetSpec:
    """Architecture of the toy UNet (a ``diffusers.UNet2DModel``).

    ``block_out_channels[i]`` is the width at resolution ``resolution / 2**i``; ``attention[i]``
    puts self-attention into that level's down and up blocks (the mid block always has one).
    """

    resolution: int = 32
    block_out_channels: tuple[int, ...] = (16, 32, 64, 64)
    layers_per_block: int = 1
    attention: tuple[bool, ...] = (False, False, True, True)
    norm_num_groups: int = 8
    attention_head_dim: int = 32

    def __post_init__(self):
        if len(self.attention) != len(self.block_out_channels):
            raise ValueError(f"attention {self.attention} needs one flag per level of block_out_channels "
                             f"{self.block_out_channels}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        attended = [c for c, a in zip(self.block_out_channels, self.attention) if a] + [self.block_out_channels[-1]]
        if any(c % self.attention_head_dim for c in attended):
            raise ValueError(f"attention_head_dim={self.attention_head_dim} must divide the channels of every level "
                             f"with attention and of the mid block, {attended}")
        if self.resolution % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(f"resolution {self.resolution} is not divisible by 2**{len(self.block_out_channels) - 1}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def default_class_prompts(num_train: int = 12, num_heldout: int = 4) -> list[str]:
    """The class list: the first ``num_train`` prompts of the toy *train* split, then the first
    ``num_heldout`` of the *held-out* split (``toy_scenes.prompt_list``; fixed, seed-free)."""
    from consolver.backends.toy_scenes import prompt_list

    return prompt_list("train", num_train) + prompt_list("heldout", num_heldout)


def null_class_id(num_classes: int) -> int:
    """The id of the null (unconditional) class: the last class embedding."""
    return num_classes


def build_unet(spec: ToyUNetSpec, num_classes: int):
    """An untrained class-conditional ``UNet2DModel`` (3 -> 3 channels, ``num_classes + 1`` class
    embeddings, the last one the null class)."""
    from diffusers import UNet2DModel

    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in spec.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.attention))
    return UNet2DModel(sample_size=spec.resolution, in_channels=3, out_channels=3,
                       block_out_channels=tuple(spec.block_out_channels), layers_per_block=spec.layers_per_block,
                       down_block_types=down, up_block_types=up, norm_num_groups=spec.norm_num_groups,
                       attention_head_dim=spec.attention_head_dim, num_class_embeds=num_classes + 1)


def build_scheduler():
    """The training scheduler: ``DDPMScheduler`` with SD1.5's betas."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD15_SCHEDULE)


def num_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_pipeline(unet, class_prompts: Sequence[str], out_dir: str | Path, scheduler=None) -> Path:
    """Write the pipeline directory (safetensors only) and return its path.

    Args:
        unet: a class-conditional ``UNet2DModel`` with ``num_class_embeds == len(class_prompts) + 1``.
        class_prompts: prompt text of class ids ``0..C-1``.
        scheduler: defaults to :func:`build_scheduler`.
    """
    import diffusers

    num_embeds = unet.config.num_class_embeds
    if num_embeds != len(class_prompts) + 1:
        raise ValueError(f"the UNet has {num_embeds} class embeddings but {len(class_prompts)} class prompts were "
                         f"given; expected num_class_embeds = classes + 1 (the last one is the null class)")
    if any(not p.is_contiguous() for p in unet.parameters()):  # e.g. trained channels-last
        unet = copy.deepcopy(unet).to(memory_format=torch.contiguous_format)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    (scheduler or build_scheduler()).save_pretrained(out / "scheduler")
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"],
             "id2label": {str(i): p for i, p in enumerate(class_prompts)}}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    logger.info("wrote toy diffusion pipeline %s (%d classes + null)", out, len(class_prompts))
    return out


def read_id2label(path: str | Path) -> list[str]:
    """Class prompts ``[C]`` (index = class id) from a pipeline directory's ``model_index.json``."""
    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a toy diffusion pipeline directory: no model_index.json "
                                f"(train one with `python tools/train_toy_diffusion.py`)")
    id2label = json.loads(index_file.read_text()).get("id2label")
    if not id2label:
        raise ValueError(f"{str(index_file)!r} has no id2label map (class id -> prompt)")
    ids = sorted(int(k) for k in id2label)
    if ids != list(range(len(ids))):
        raise ValueError(f"id2label of {str(index_file)!r} must have ids 0..C-1, got {ids}")
    return [id2label[str(i)] for i in ids]


def load_pipeline(path: str | Path = DEFAULT_MODEL_DIR):
    """``(unet, scheduler, class_prompts)`` from a pipeline directory; the UNet in eval mode."""
    from diffusers import DDPMScheduler, UNet2DModel

    class_prompts = read_id2label(path)
    unet = UNet2DModel.from_pretrained(str(path), subfolder="unet", use_safetensors=True).eval()
    scheduler = DDPMScheduler.from_pretrained(str(path), subfolder="scheduler")
    if unet.config.num_class_embeds != len(class_prompts) + 1:
        raise ValueError(f"{str(path)!r}: the UNet has {unet.config.num_class_embeds} class embeddings but "
                         f"id2label lists {len(class_prompts)} classes (expected classes + 1 for the null class)")
    return unet, scheduler, class_prompts


__all__ = ["DEFAULT_MODEL_DIR", "SD15_SCHEDULE", "ToyUNetSpec", "build_scheduler", "build_unet",
           "default_class_prompts", "load_pipeline", "null_class_id", "num_parameters", "read_id2label",
           "save_pipeline"]
