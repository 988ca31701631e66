"""Toy-world rewards and metrics: segmentation and depth networks trained on procedural
renders (``tools/train_toy_rewards.py``), and the exact mode-agreement metric.

- ``toy_seg``: pixel agreement of the argmax masks of preview and target, x100 (0..100).
  ``features(target)``: the target's mask, uint8 ``[B, r, r]`` (class indices, see
  ``toy_scenes.SEG_CLASSES``).
- ``toy_depth``: PSNR (dB, >= 0) between min-max normalised depth maps.
  ``features(target)``: the target's normalised depth map, float32 ``[B, r, r]`` in [0, 1].

``r`` is the network's working resolution (32 for the shipped weights): images of any size
are resized to it (area for downscaling), so rewards and features do not depend on the
backend's resolution. Each network is a segmentation-models-pytorch U-Net whose
architecture is stored as JSON in its safetensors metadata (key ``"spec"``); its input is
RGB normalised as ``(x - 0.5) / 0.25`` plus two coordinate channels in [-1, 1].
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from consolver.rewards.base import Reward, register_reward
from consolver.rewards.hf import parse_dtype
from consolver.rewards.pixel import minmax_normalize, normalized_map_psnr

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
DEFAULT_WEIGHTS = {"seg": DATA_DIR / "toy_seg.safetensors", "depth": DATA_DIR / "toy_depth.safetensors"}


# ---------------------------------------------------------------- networks

def default_spec(task: str) -> dict:
    """Architecture of the shipped nets: a U-Net on the first three stages of timm's ResNet-10-T
    (strides 2, 4, 8; ~0.53 M parameters)."""
    from consolver.backends.toy_scenes import SEG_CLASSES

    return {"task": task, "arch": "Unet", "encoder_name": "tu-resnet10t", "encoder_depth": 3,
            "decoder_channels": [64, 32, 16], "in_channels": 5,
            "classes": len(SEG_CLASSES) if task == "seg" else 1, "resolution": 32}


def build_net(spec: dict) -> nn.Module:
    """An untrained network from a spec (no download: ``encoder_weights=None``)."""
    import segmentation_models_pytorch as smp

    arch = getattr(smp, spec["arch"])
    return arch(encoder_name=spec["encoder_name"], encoder_weights=None, encoder_depth=spec["encoder_depth"],
                decoder_channels=list(spec["decoder_channels"]), in_channels=spec["in_channels"],
                classes=spec["classes"])


def save_net(net: nn.Module, spec: dict, path: str | Path) -> None:
    """Conv weights as float16 (half the size; loaded back into float32 parameters), the small
    tensors (biases, batch-norm statistics) as float32; the spec goes into the metadata."""
    from safetensors.torch import save_file

    state = {k: (v.half() if v.is_floating_point() and v.numel() >= 1024 else v).detach().contiguous().cpu()
             for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"spec": json.dumps(spec)})


def load_net(path: str | Path, task: str) -> tuple[nn.Module, dict]:
    """``(net, spec)`` from a safetensors file written by :func:`save_net`, in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"toy {task} reward weights not found at {str(path)!r}; run `python tools/train_toy_rewards.py` "
            f"or set the reward's `model` key (rewards[].model) to a .safetensors file")
    with safe_open(str(path), "pt") as handle:
        spec = json.loads((handle.metadata() or {}).get("spec", "null"))
    if not spec or spec.get("task") != task:
        raise ValueError(f"{str(path)!r} is not a toy {task} network (its metadata spec is {spec})")
    net = build_net(spec)
    net.load_state_dict(load_file(str(path)))
    logger.info("loaded toy %s reward network %s (%s)", task, path, spec["encoder_name"])
    return net.eval(), spec


def prepare_input(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Network input ``[B, 5, r, r]`` from images ``[B, 3, H, W]`` in [0, 1]."""
    x = images.float()
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        down = x.shape[-1] > resolution
        x = F.interpolate(x, size=(resolution, resolution), mode="area" if down else "bilinear",
                          **({} if down else {"align_corners": False}))
    coords = torch.linspace(-1, 1, resolution, device=x.device, dtype=x.dtype)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    grid = torch.stack([gx, gy]).expand(x.shape[0], 2, resolution, resolution)
    return torch.cat([(x - 0.5) / 0.25, grid], dim=1)


class _ToyNetReward(Reward):
    task = ""

    def __init__(self, model: Optional[str] = None, dtype: Optional[str] = None):
        super().__init__()
        self.net, self.spec = load_net(model or DEFAULT_WEIGHTS[self.task], self.task)
        low_precision = parse_dtype(dtype)  # same dtype names as every reward; None = float32
        if low_precision is not None:
            self.net.to(low_precision)
        self.resolution = int(self.spec["resolution"])
        self.freeze()

    def run(self, images: torch.Tensor) -> torch.Tensor:
        """Raw network output ``[B, classes, r, r]`` (float32, on the network's device) for images
        ``[B, 3, H, W]`` in [0, 1]."""
        param = next(self.net.parameters())
        with torch.no_grad():
            return self.net(prepare_input(images.to(param.device), self.resolution).to(param.dtype)).float()


@register_reward("toy_seg")
class ToySegReward(_ToyNetReward):
    """Pixel agreement of argmax masks x100, ``[B]`` in [0, 100]."""

    task = "seg"

    def predict_mask(self, images: torch.Tensor) -> torch.Tensor:
        """Class index per pixel, long ``[B, r, r]``."""
        return self.run(images).argmax(1)

    def features(self, target: torch.Tensor) -> torch.Tensor:
        return self.predict_mask(target).to(torch.uint8)

    def score(self, preview: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        pred = self.predict_mask(preview)
        agree = pred == target_features.to(pred.device).long()
        return 100 * agree.float().flatten(1).mean(1)


@register_reward("toy_depth")
class ToyDepthReward(_ToyNetReward):
    """PSNR of min-max normalised predicted depth maps, ``[B]`` in dB, clamped >= 0."""

    task = "depth"

    def predict_depth(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted inverse depth ``[B, r, r]`` (background ~0, nearer layers larger)."""
        return self.run(images)[:, 0]

    def features(self, target: torch.Tensor) -> torch.Tensor:
        return minmax_normalize(self.predict_depth(target))

    def score(self, preview: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        return normalized_map_psnr(self.predict_depth(preview), target_features)


# ---------------------------------------------------------------- metrics

def segmentation_miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean IoU over classes present in ``pred`` or ``target`` (label maps ``[B, H, W]``)."""
    pred, target = pred.long().flatten(), target.long().flatten()
    confusion = torch.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    inter = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - inter
    return float((inter[union > 0] / union[union > 0]).mean())


def depth_order_accuracy(pred: torch.Tensor, target: torch.Tensor, pairs_per_image: int = 1000,
                         generator: Optional[torch.Generator] = None) -> float:
    """Fraction of random pixel pairs (per image, of ``[B, H, W]`` maps) whose predicted order
    matches the true one; only pairs with different true depth count, ties in ``pred`` are wrong."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    B = pred.shape[0]
    p, t = pred.reshape(B, -1).float().cpu(), target.reshape(B, -1).float().cpu()
    i = torch.randint(p.shape[1], (B, pairs_per_image), generator=generator)
    j = torch.randint(p.shape[1], (B, pairs_per_image), generator=generator)
    true = torch.sign(t.gather(1, i) - t.gather(1, j))
    guess = torch.sign(p.gather(1, i) - p.gather(1, j))
    valid = true != 0
    return float((guess[valid] == true[valid]).float().mean())


def mode_agreement(backend, preview: torch.Tensor, target: torch.Tensor,
                   prompt_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact mode agreement, bool ``[B]``: preview and target images ``[B, 3, H, W]`` in [0, 1]
    land on the same mixture component (nearest render) of a :class:`ToyBackend`.

    With ``prompt_index [B]`` (``cond["prompt_index"]``) the search is restricted to each
    sample's own prompt's renders; without it, it runs over every component.
    """
    k_preview = backend.component_index(backend.encode_images(preview), prompt_index)
    k_target = backend.component_index(backend.encode_images(target), prompt_index)
    return k_preview == k_target


__all__ = ["DEFAULT_WEIGHTS", "ToyDepthReward", "ToySegReward", "build_net", "default_spec", "depth_order_accuracy",
           "load_net", "minmax_normalize", "mode_agreement", "prepare_input", "save_net", "segmentation_miou"]
