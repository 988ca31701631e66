"""Real rewards: batched on-device scoring vs a per-image PIL loop like the paper's code.

Same networks, random weights, no downloads: the tiny configurations of each architecture on
the CPU with one intra-op thread for both paths (``size: tiny``), plus the paper's full-size architectures when a GPU is available
(``size: full``). Throughput in preview/target pairs per second over a batch of 64x64
(tiny) or 512x512 (full) images in [0, 1].

- ``PIL loop``: per pair, each image converted to PIL, the transformers image processor
  (PIL backend) run on it, the network run on it alone, the score computed in numpy after
  upsampling the network output to the image size (as the paper's pipeline post-processing does).
- ``batched``: ``reward(preview, target)`` - both sides encoded on the device in one batch.
- ``cached``: ``reward.score(preview, features)`` - target features cached (as in shards).
- ``|diff|``: mean absolute difference between the loop's and the batched rewards
  (resampling, uint8 rounding and mask resolution differ slightly).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks._timing import time_call
from consolver.rewards.pixel import MAX_PSNR_DB
from consolver.rewards.testing import REWARD_CLASSES, full_size_model, hf_image_processor, tiny_model


def _images(n: int, size: int, seed: int, device: str) -> torch.Tensor:
    """Smooth random images ``[n, 3, size, size]`` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(size, size), mode="bicubic").clamp(0, 1).to(device)


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))


def _pil_output(kind: str, reward, processor, image: torch.Tensor) -> np.ndarray:
    """One image through PIL, the HF processor and the network; numpy output at image size."""
    pixels = processor(images=_to_pil(image), return_tensors="pt")["pixel_values"].to(image.device)
    with torch.no_grad():
        out = reward.embed(pixels).float()
    if kind in ("clip", "dino"):
        return out[0].cpu().numpy()
    size = tuple(image.shape[-2:])
    if kind == "depth":
        return F.interpolate(out[:, None], size=size, mode="bicubic", align_corners=False)[0, 0].cpu().numpy()
    return F.interpolate(out, size=size, mode="bilinear", align_corners=False)[0].argmax(0).cpu().numpy()


def _pil_score(kind: str, pred: np.ndarray, target: np.ndarray) -> float:
    if kind in ("clip", "dino"):
        cos = float(pred @ target / (np.linalg.norm(pred) * np.linalg.norm(target)))
        return (cos + 1.0) * 50.0
    if kind == "depth":
        norm = [(d - d.min()) / max(d.max() - d.min(), 1e-12) for d in (pred, target)]
        mse = max(float(np.mean((norm[0] - norm[1]) ** 2)), 10 ** (-MAX_PSNR_DB / 10))
        return max(0.0, 10.0 * np.log10(1.0 / mse))
    return float(np.mean(pred == target)) * 100.0


def _pil_loop(kind: str, reward, processor, previews: torch.Tensor, targets: torch.Tensor) -> list[float]:
    return [_pil_score(kind, _pil_output(kind, reward, processor, p), _pil_output(kind, reward, processor, t))
            for p, t in zip(previews, targets)]


def _row(kind: str, size_name: str, model, config: dict, batch: int, image_size: int, repeats: int) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reward = REWARD_CLASSES[kind](model=model, processor=config).to(device)
    processor = hf_image_processor(kind, backend="pil", config=config)
    targets = _images(batch, image_size, 0, device)
    previews = (targets + 0.1 * torch.randn(targets.shape, generator=torch.Generator().manual_seed(1)).to(device)).clamp(0, 1)
    features = reward.features(targets)
    loop_scores = np.array(_pil_loop(kind, reward, processor, previews, targets))
    diff = float(np.abs(loop_scores - reward(previews, targets).cpu().numpy()).mean())
    t_loop = time_call(lambda: _pil_loop(kind, reward, processor, previews, targets), repeats=repeats, warmup=1)
    t_batched = time_call(lambda: reward(previews, targets), repeats=repeats, warmup=1)
    t_cached = time_call(lambda: reward.score(previews, features), repeats=repeats, warmup=1)
    return {
        "reward": kind, "size": size_name, "device": device, "threads": torch.get_num_threads(), "batch": batch,
        "PIL loop img/s": batch / t_loop, "batched img/s": batch / t_batched, "cached img/s": batch / t_cached,
        "batched / loop": t_loop / t_batched, "cached / loop": t_loop / t_cached, "|diff|": diff,
    }


def run(quick: bool = False) -> list[dict]:
    """One row per reward network: throughputs of the three paths and their ratios."""
    rows = []
    batch, repeats = (8, 3) if quick else (32, 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks on a shared CPU: one thread is faster and steadier
    try:
        for kind in REWARD_CLASSES:
            model, config = tiny_model(kind)
            rows.append(_row(kind, "tiny", model, config, batch, 64, repeats))
    finally:
        torch.set_num_threads(threads)
    if torch.cuda.is_available():
        for kind in REWARD_CLASSES:
            model, config = full_size_model(kind)
            rows.append(_row(kind, "full", model, config, 8 if quick else 32, 512, repeats))
            del model
            torch.cuda.empty_cache()
    return rows
