"""Training entry point: config -> data, algorithm, Lightning trainer -> exported scheduler.

    from consolver.train import fit
    result = fit(load_config("conf/toy_depth.yaml"))
    result.scheduler_dir   # <output_dir>/scheduler, loadable with ConsistencySolverScheduler.from_pretrained

Layout of ``output_dir``: ``config.yaml`` (the resolved config), ``checkpoints/`` (``step={N}.ckpt`` every
``trainer.checkpoint_every`` iterations, plus ``last.ckpt``), ``tb/`` (TensorBoard), and
``scheduler/`` (the export: coefficient tables for every trained K in the scheduler config,
the actor's weights beside them in ``consolver_policy.safetensors``).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from consolver.config import Config, save_config
from consolver.export import POLICY_FILE, export_scheduler, trained_scheduler
from consolver.runs import checkpoint_dir, last_checkpoint, prepare_run

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    output_dir: Path
    scheduler_dir: Optional[Path]  # None on ranks other than 0
    module: Any
    trainer: Any
    iteration: int = 0  # iterations done (trainer.global_step)
    interrupted: Optional[str] = None  # "SIGINT" / "SIGTERM" when a signal stopped the run early


def launched_as_rank_zero() -> bool:
    """True in the first process of a run: not a worker that torchrun, SLURM or Lightning's DDP
    launcher started (those set ``RANK``/``LOCAL_RANK``/``NODE_RANK``/``SLURM_PROCID``)."""
    return all(int(os.environ.get(k, 0) or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def build_trainer(cfg: Config, module, callbacks: Sequence[Any] = (), progress_bar: Optional[bool] = None,
                  backend_device: Optional[torch.device] = None):
    """The Lightning ``Trainer`` of ``cfg.trainer``, every count in iterations (``global_step``
    advances once per data batch, see :class:`~consolver.algos.base.PreviewAlgorithm`): ``max_steps``,
    checkpoints, logging. ``trainer.accelerator=auto`` follows the backend's device, so the policy
    trains where the rollouts run (the toy backend: the CPU). The :class:`RunCheckpoint` callback
    is ``trainer.run_checkpoint``."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from consolver.monitor import TrainingMonitor
    from consolver.training_callbacks import IterationProgressBar, RunCheckpoint

    t = cfg.trainer
    checkpoints = RunCheckpoint(checkpoint_dir(cfg), t.checkpoint_every)
    show = t.progress_bar if progress_bar is None else progress_bar
    accelerator = t.accelerator
    if accelerator == "auto" and backend_device is not None:
        accelerator = "gpu" if torch.device(backend_device).type == "cuda" else "cpu"
    trainer = L.Trainer(
        max_steps=t.max_steps, max_epochs=-1, accelerator=accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=t.strategy, precision=t.precision,
        logger=TensorBoardLogger(save_dir=cfg.output_dir, name="tb", version="", default_hp_metric=False),
        callbacks=[checkpoints, TrainingMonitor(cfg), *callbacks, *([IterationProgressBar()] if show else [])],
        enable_progress_bar=bool(show), enable_checkpointing=False, log_every_n_steps=max(1, t.log_every_n_steps),
        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False, enable_model_summary=False,
        deterministic=False)
    trainer.run_checkpoint = checkpoints
    return trainer


def fit(cfg: Config, resume: bool = False, callbacks: Sequence[Any] = (), progress_bar: Optional[bool] = None,
        runtime: Optional[Dict[str, Any]] = None, overwrite: bool = False) -> FitResult:
    """Train ``cfg`` and export ``<output_dir>/scheduler`` (on rank 0).

    A first SIGINT (Ctrl-C) or SIGTERM saves ``checkpoints/last.ckpt`` at the end of the current
    iteration, stops, and still exports the solver (``FitResult.interrupted`` names the signal).

    Args:
        resume: continue from ``<output_dir>/checkpoints/last.ckpt`` (weights, optimizer, LR
            schedule, step counters and data position); an error if there is none or if it was
            trained with another config (the keys that differ are named; nothing is written).
        overwrite: replace a previous run in ``output_dir`` (refused otherwise, see
            :func:`consolver.runs.prepare_run`).
        runtime: prebuilt ``{"backend", "reward"}`` to reuse (tests, tools).
    """
    import lightning as L

    from consolver.algos import build_algorithm
    from consolver.data import ShardDataModule
    from consolver.training_callbacks import stop_on_signals

    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    if launched_as_rank_zero():
        ckpt = prepare_run(cfg, resume=resume, overwrite=overwrite)
    else:  # rank 0 checked the directory (and may have written config.yaml since)
        ckpt = last_checkpoint(cfg) if resume else None
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = build_algorithm(cfg, runtime)
    rt = module.build_runtime()
    datamodule = ShardDataModule(cfg, backend=rt["backend"])
    trainer = build_trainer(cfg, module, callbacks, progress_bar, rt["backend"].device)
    if trainer.is_global_zero:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    with stop_on_signals(trainer.run_checkpoint), warnings.catch_warnings():
        # Lightning's note for modules without validation_step: the validation loop is off by design
        warnings.filterwarnings("ignore", message=r".*val_dataloader.*validation_step")
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    stats = datamodule.stats
    if any(stats.values()):
        warnings.warn(f"data problems while training: {stats} (corrupt or unreadable samples were skipped)",
                      stacklevel=2)
    scheduler_dir = None
    if trainer.is_global_zero:
        scheduler_dir = export_scheduler(module, Path(cfg.output_dir) / "scheduler")
    stop = trainer.run_checkpoint
    return FitResult(Path(cfg.output_dir), scheduler_dir, module, trainer, int(trainer.global_step),
                     stop.stop_reason if stop.stopped_at is not None else None)


def load_module(checkpoint: str | os.PathLike, runtime: Optional[Dict[str, Any]] = None):
    """The training module of a checkpoint (its config is inside), e.g. to export another time."""
    from consolver.algos import algorithm_class
    from consolver.runs import load_checkpoint

    state, cfg = load_checkpoint(checkpoint)
    module = algorithm_class(cfg.algo.name)(cfg, runtime)
    module.load_state_dict(state["state_dict"])
    return module


__all__ = ["FitResult", "POLICY_FILE", "build_trainer", "export_scheduler", "fit", "last_checkpoint", "load_module",
           "trained_scheduler"]
