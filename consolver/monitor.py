"""TensorBoard monitoring of a training run (a Lightning callback).

Every ``trainer.log_every_n_steps`` iterations: the current coefficient table of every trained K,
as text and as a heatmap image (``tables/K{K}``), and with learned step grids each K's grid
(``grids/K{K}``). Every ``trainer.image_every`` iterations: a
``preview | target`` image grid of the batch's first samples at K=4 (else the smallest trained K)
(``previews``). Every ``trainer.eval_every`` iterations (and before the first update): the
exported solver on held-out prompts x fresh noises, every trained K (``eval/K{K}/<metric>``).
Scalars of each update are logged by the algorithm itself (``train/...``).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

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


def table_heatmap(table: np.ndarray, cell: int = 16, limit: float = 2.0) -> torch.Tensor:
    """Heatmap image ``[3, K * cell, m * cell]`` in [0, 1]: blue negative, white 0, red positive
    (saturating at +-``limit``)."""
    v = torch.as_tensor(table, dtype=torch.float32).clamp(-limit, limit) / limit  # [K, m] in [-1, 1]
    pos, neg = v.clamp(min=0), (-v).clamp(min=0)
    rgb = torch.stack([1 - neg, 1 - pos - neg, 1 - pos]).clamp(0, 1)  # [3, K, m]
    return rgb.repeat_interleave(cell, 1).repeat_interleave(cell, 2)


def preview_grid(previews: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[3, H', W']`` grid: each row one sample, preview | target (images in [0, 1])."""
    from torchvision.utils import make_grid

    pairs = torch.stack([previews, targets], 1).flatten(0, 1).float().cpu().clamp(0, 1)
    return make_grid(pairs, nrow=2, padding=2, pad_value=1.0)


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
            tb.add_image(f"tables/K{K}", table_heatmap(table), module.iteration)
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
        grid = preview_grid(backend.decode(env.final_latents), backend.decode(small["target_latent"].to(backend.device)))
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
