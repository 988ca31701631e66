"""Training of the toy segmentation and depth reward networks on procedural renders (the library
behind ``tools/train_toy_rewards.py``).

Scenes come from the *train* prompt split only (held-out color/shape pairs are never seen);
labels are exact (the renderer draws them). Both nets train on the same batches, with a
fixed seed; a quarter of each batch is rendered at 2x and area-downsampled, half gets its
RGB channels permuted (shape, not color, decides the class) and some samples get pixel
noise, so the nets also read other resolutions, unseen color pairings and imperfect previews.
At the end both are evaluated on renders of held-out scenes (mIoU, pairwise depth order).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from consolver.backends import toy_scenes
from consolver.rewards.toy import build_net, default_spec, depth_order_accuracy, prepare_input, save_net, segmentation_miou


def make_batch(rng: np.random.Generator, generator: torch.Generator, batch_size: int, resolution: int,
               split: str = "train", augment: bool = True):
    """``(images [B,3,r,r], seg [B,r,r], depth [B,r,r])`` of random scenes of ``split``."""
    scenes = [toy_scenes.random_scene(rng, split) for _ in range(batch_size)]
    params = toy_scenes.jittered_params(scenes, generator)
    images, seg, depth = toy_scenes.render(params, resolution)
    if augment:
        hi = batch_size // 4  # the first quarter: rendered at 2x, area-downsampled
        sub = toy_scenes.RenderParams(*(p[:hi] for p in params))
        images[:hi] = F.interpolate(toy_scenes.render(sub, 2 * resolution)[0], size=(resolution, resolution), mode="area")
        # half the samples get their RGB channels permuted: labels do not depend on color, so the
        # nets must read shapes, not memorise which colors the training split pairs them with
        perm = torch.stack([torch.randperm(3, generator=generator) for _ in range(batch_size)])
        perm[torch.rand(batch_size, generator=generator) < 0.5] = torch.arange(3)
        images = images.gather(1, perm[:, :, None, None].expand_as(images))
        noisy = torch.rand(batch_size, 1, 1, 1, generator=generator) < 0.5
        noise_std = 0.05 * torch.rand(batch_size, 1, 1, 1, generator=generator) * noisy
        images = (images + noise_std * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    return images, seg, depth


def evaluate(nets: dict, spec: dict, num_scenes: int, seed: int) -> dict:
    """Held-out mIoU and pairwise depth-order accuracy on fresh renders (no augmentation)."""
    rng, generator = np.random.default_rng([seed, 1]), torch.Generator().manual_seed(seed + 1)
    images, seg, depth = make_batch(rng, generator, num_scenes, spec["resolution"], "heldout", augment=False)
    with torch.no_grad():
        x = prepare_input(images, spec["resolution"])
        pred_seg = nets["seg"].eval()(x).argmax(1)
        pred_depth = nets["depth"].eval()(x)[:, 0]
    return {"heldout_miou": segmentation_miou(pred_seg, seg, len(toy_scenes.SEG_CLASSES)),
            "heldout_depth_order_accuracy": depth_order_accuracy(pred_depth, depth)}


def train(args) -> dict:
    """Train both nets with ``args`` (``steps, batch_size, lr, seed, threads, eval_scenes, out``),
    write ``toy_seg.safetensors`` and ``toy_depth.safetensors`` into ``args.out``; returns the
    held-out metrics and the training time."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    specs = {task: default_spec(task) for task in ("seg", "depth")}
    nets = {task: build_net(spec).train() for task, spec in specs.items()}
    optimizers = {task: torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4) for task, net in nets.items()}
    schedulers = {task: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
                  for task, opt in optimizers.items()}
    rng, generator = np.random.default_rng([args.seed, 0]), torch.Generator().manual_seed(args.seed)
    resolution = specs["seg"]["resolution"]
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="toy rewards", unit="step")
    for _ in bar:
        images, seg, depth = make_batch(rng, generator, args.batch_size, resolution)
        x = prepare_input(images, resolution)
        losses = {"seg": F.cross_entropy(nets["seg"](x), seg),
                  "depth": F.l1_loss(nets["depth"](x)[:, 0], depth)}
        for task, loss in losses.items():
            optimizers[task].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[task].step()
            schedulers[task].step()
        bar.set_postfix(seg=f"{losses['seg'].item():.3f}", depth=f"{losses['depth'].item():.4f}")
    metrics = evaluate(nets, specs["seg"], args.eval_scenes, args.seed)
    metrics["train_seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for task, net in nets.items():
        spec = {**specs[task], "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                                         "seed": args.seed, **metrics}}
        save_net(net.eval(), spec, out / f"toy_{task}.safetensors")
    return metrics


__all__ = ["evaluate", "make_batch", "train"]
