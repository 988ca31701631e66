"""TensorBoard monitoring of a training run (a Lightning callback).

Every ``trainer.log_every_n_steps`` iterations: the current coefficient table of every trained K,
as text and as a labelled heatmap image (``tables/K{K}``: steps x history entries, the values,
a colour bar), and with learned step grids each K's grid (``grids/K{K}``). Every
``trainer.image_every`` iterations: a ``preview | target`` image grid of the batch's first
samples at K=4 (else the smallest trained K), upscaled and labelled with column headers and each
sample's prompt (``previews/K{K}``). Every ``trainer.eval_every`` iterations (and before the first update): the
exported solver on held-out prompts x fresh noises, every trained K (``eval/K{K}/<metric>``).
Scalars of each update are logged by the algorithm itself (``train/...``)."""

from __future__ import annotations

import logging
import textwrap
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

logger = logging.getLogger(__name__)


def table_markdown(table: np.ndarray) -> str:
    """A coefficient table ``[K, m]`` as a markdown table (rows: steps, columns: d_i, d_{i-1}, ...)."""
    m = table.shape[1]
    head = "| step | " + " | ".join(["d_i"] + [f"d_i-{j}" for j in range(1, m)]) + " |"
    rows = [f"| {i} | " + " | ".join(f"{w:+.3f}" for w in row) + " |" for i, row in enumerate(table)]
    return "\n".join([head, "|" + "---|" * (m + 1), *rows])


def _diverging(v: float, limit: float) -> Tuple[int, int, int]:
    """RGB of ``v``: blue negative, white 0, red positive, saturating at +-``limit``."""
    x = max(-1.0, min(1.0, float(v) / limit))
    pos, neg = max(x, 0.0), max(-x, 0.0)
    return tuple(int(round(255 * c)) for c in (1 - neg, 1 - pos - neg, 1 - pos))


def _to_chw(image) -> torch.Tensor:
    """A PIL RGB image as ``[3, H, W]`` float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def draw_table_heatmap(table: np.ndarray, cell: int = 56, limit: float = 2.0, title: str = ""):
    """A coefficient table ``[K, m]`` drawn as a labelled heatmap (PIL, no matplotlib).

    Rows are steps (``step 0`` .. ``step K-1``), columns the history entries the coefficients
    weigh (``d_i``, ``d_i-1``, ...); each cell shows its value (``+1.40``) on its colour (blue
    negative, white 0, red positive, saturating at +-``limit``); a colour bar on the right maps
    colours to values. Returns ``(RGB image, {(i, j): cell box (x0, y0, x1, y1)})``.
    """
    from PIL import Image, ImageDraw

    from consolver.preview.sheet import font

    table = np.asarray(table, dtype=np.float64)
    K, m = table.shape
    small, big = font(12), font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    heads = ["d_i"] + [f"d_i-{j}" for j in range(1, m)]
    rows = [f"step {i}" for i in range(K)]
    ch = max(24, cell // 2)  # cell height
    pad, bar_w = 8, 14
    left = pad + max(int(probe.textlength(r, font=big)) for r in rows) + pad
    top = pad + (18 if title else 0) + 18
    ticks = [limit, limit / 2, 0.0, -limit / 2, -limit]
    tick_text = [f"{t:+g}" if t else "0" for t in ticks]
    tick_w = max(int(probe.textlength(t, font=small)) for t in tick_text)
    grid_w, grid_h = m * cell, K * ch
    bar_x = left + grid_w + 2 * pad
    width = max(bar_x + bar_w + 4 + tick_w + pad, int(probe.textlength(title, font=big)) + 2 * pad if title else 0)
    height = top + max(grid_h, 5 * 14) + pad
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((pad, pad), title, font=big, fill=(20, 20, 20))
    boxes = {}
    for j, head in enumerate(heads):
        w = probe.textlength(head, font=big)
        draw.text((left + j * cell + (cell - w) / 2, top - 18), head, font=big, fill=(20, 20, 20))
    for i in range(K):
        draw.text((pad, top + i * ch + (ch - 14) / 2), rows[i], font=big, fill=(20, 20, 20))
        for j in range(m):
            box = (left + j * cell, top + i * ch, left + (j + 1) * cell, top + (i + 1) * ch)
            colour = _diverging(table[i, j], limit)
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=colour, outline=(255, 255, 255))
            text = f"{table[i, j]:+.2f}"
            ink = (255, 255, 255) if abs(table[i, j]) > 0.6 * limit else (20, 20, 20)
            w = probe.textlength(text, font=small)
            draw.text((box[0] + (cell - w) / 2, box[1] + (ch - 12) / 2), text, font=small, fill=ink)
            boxes[(i, j)] = box
    bar_h = max(grid_h, 5 * 14)
    for y in range(bar_h):  # top: +limit (red) .. bottom: -limit (blue)
        draw.line((bar_x, top + y, bar_x + bar_w - 1, top + y), fill=_diverging(limit * (1 - 2 * y / (bar_h - 1)), limit))
    draw.rectangle((bar_x, top, bar_x + bar_w - 1, top + bar_h - 1), outline=(120, 120, 120))
    for t, text in zip(ticks, tick_text):
        y = top + (1 - (t / limit + 1) / 2) * (bar_h - 1)
        draw.text((bar_x + bar_w + 4, min(max(y - 7, top - 7), top + bar_h - 8)), text, font=small, fill=(20, 20, 20))
    return image, boxes


def table_heatmap(table: np.ndarray, cell: int = 56, limit: float = 2.0, title: str = "") -> torch.Tensor:
    """:func:`draw_table_heatmap` as ``[3, H, W]`` float32 in [0, 1] (for ``add_image``)."""
    return _to_chw(draw_table_heatmap(table, cell, limit, title)[0])


def draw_preview_grid(previews: torch.Tensor, targets: torch.Tensor, prompts: Optional[Sequence[str]] = None,
                      num_steps: Optional[int] = None, prompt_width: int = 28):
    """Each sample a row, ``preview K=..`` | ``target``, labelled: column headers, and on the left
    the sample's index and prompt (at most two lines of ``prompt_width`` characters, shortened at
    a word boundary). Images ``[B, 3, H, W]`` in [0, 1]; small ones are upscaled (nearest) to
    tiles of >= 128 px.
    Returns ``(RGB image, SheetLayout)`` (:func:`consolver.preview.sheet.draw_sheet`)."""
    from consolver.preview.sheet import SheetBlock, draw_sheet, shorten

    previews, targets = previews.float().cpu().clamp(0, 1), targets.float().cpu().clamp(0, 1)
    head = "preview" if num_steps is None else f"preview K={num_steps}"
    names = [f"{b}: " + "\n".join(textwrap.wrap(shorten(prompts[b], 2 * prompt_width), prompt_width))
             if prompts is not None else f"sample {b}" for b in range(previews.shape[0])]
    rows = {name: torch.stack([previews[b], targets[b]]) for b, name in enumerate(names)}
    return draw_sheet([SheetBlock("", [head, "target"], rows)], columns=2)


def preview_grid(previews: torch.Tensor, targets: torch.Tensor, prompts: Optional[Sequence[str]] = None,
                 num_steps: Optional[int] = None) -> torch.Tensor:
    """:func:`draw_preview_grid` as ``[3, H, W]`` float32 in [0, 1] (for ``add_image``)."""
    return _to_chw(draw_preview_grid(previews, targets, prompts, num_steps)[0])


class TrainingMonitor(Callback):
    """See the module docstring. ``cfg`` is the training config."""

    def __init__(self, cfg, num_images: int = 8):
        self.cfg, self.num_images = cfg, num_images
        self.eval_set = None
        self.last_eval: Dict[str, float] = {}
        self.last_eval_iteration: Optional[int] = None

    def _experiment(self, trainer):
        return getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None

    def on_train_start(self, trainer, module) -> None:
        if self.cfg.trainer.eval_every > 0 and trainer.is_global_zero:
            self.evaluate(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        it, t = module.iteration, self.cfg.trainer
        if it % t.log_every_n_steps == 0:
            self.log_tables(trainer, module)
        if t.image_every > 0 and it % t.image_every == 0:
            self.log_previews(trainer, module, batch)
        if t.eval_every > 0 and it % t.eval_every == 0:
            self.evaluate(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            self.log_tables(trainer, module)
            stop = getattr(trainer, "run_checkpoint", None)
            interrupted = stop is not None and stop.stopped_at is not None  # a user waits: no eval
            if self.cfg.trainer.eval_every > 0 and self.last_eval_iteration != module.iteration and not interrupted:
                self.evaluate(trainer, module)

    # ------------------------------------------------------------------ parts
    @rank_zero_only
    def log_tables(self, trainer, module) -> None:
        tb = self._experiment(trainer)
        if tb is None or self.cfg.policy.sample_features:
            return
        for K, table in module.coefficient_tables().items():
            tb.add_text(f"tables/K{K}", table_markdown(table), module.iteration)
            tb.add_image(f"tables/K{K}", table_heatmap(table, title=f"coefficients, K={K}"), module.iteration)
        if module.learn_timesteps:
            for K, grid in module.step_grids().items():
                tb.add_text(f"grids/K{K}", ", ".join(f"{t:g}" for t in grid), module.iteration)
                tb.add_scalar(f"grids/K{K}_last", float(grid[-1]), module.iteration)

    @torch.no_grad()
    def log_previews(self, trainer, module, batch: Dict[str, Any]) -> None:
        tb = self._experiment(trainer)
        if tb is None:
            return
        n = min(self.num_images, batch["noise"].shape[0])
        K = 4 if 4 in module.trained_num_steps else module.trained_num_steps[0]
        small = {"noise": batch["noise"][:n], "prompt": batch["prompt"][:n], "target_latent": batch["target_latent"][:n],
                 "features": {k: v[:n] for k, v in batch["features"].items()}}
        if "ref_image" in batch:  # editing: the reference images travel with the prompts
            small["ref_image"] = batch["ref_image"][:n]
        _, env = module.rollout(module.reset_input(small, K), K, deterministic=True)
        backend = module.runtime["backend"]
        grid = preview_grid(backend.decode(env.final_latents), backend.decode(small["target_latent"].to(backend.device)),
                            list(small["prompt"]), K)
        tb.add_image(f"previews/K{K}", grid, module.iteration)

    @torch.no_grad()
    def evaluate(self, trainer, module) -> Optional[Dict[str, float]]:
        """The exported solver (the mode's tables and learned grids) on the held-out set, every trained K."""
        if self.cfg.policy.sample_features:
            return None
        from consolver.evaluation import evaluate_scheduler, make_eval_set
        from consolver.export import trained_scheduler

        rt = module.runtime
        if self.eval_set is None:
            self.eval_set = make_eval_set(self.cfg, rt["backend"], rt["reward"], self.cfg.trainer.eval_num_noises)
        scheduler = trained_scheduler(module, module.trained_num_steps)
        results: Dict[str, float] = {}
        for K in module.trained_num_steps:
            metrics = evaluate_scheduler(self.eval_set, rt["backend"], scheduler, K, rt["reward"], rt["reward_names"])
            results.update({f"eval/K{K}/{name}": float(value) for name, value in metrics.items()})
        tb = self._experiment(trainer)
        if tb is not None:
            for key, value in results.items():
                tb.add_scalar(key, value, module.iteration)
        self.last_eval, self.last_eval_iteration = results, module.iteration
        logger.info("held-out eval at iteration %d: %s", module.iteration,
                    ", ".join(f"{k[5:]}={v:.3g}" for k, v in results.items() if k.endswith(rt["reward_names"][0])))
        return results
