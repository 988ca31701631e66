"""Training entry point: config -> data, algorithm, Lightning trainer -> exported scheduler.

    from consolver.train import fit
    result = fit(load_config("conf/toy_depth.yaml"))
    result.scheduler_dir   # <output_dir>/scheduler, loadable with ConsistencySolverScheduler.from_pretrained

Layout of ``output_dir``: ``config.yaml`` (the resolved config), ``checkpoints/`` (every
``trainer.checkpoint_every`` iterations, plus ``last.ckpt``), ``tb/`` (TensorBoard), and
``scheduler/`` (the export: coefficient tables for every trained K in the scheduler config,
the actor's weights beside them in ``consolver_policy.safetensors``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from consolver.config import Config, ConfigError, save_config, to_container

logger = logging.getLogger(__name__)

POLICY_FILE = "consolver_policy.safetensors"


@dataclass
class FitResult:
    output_dir: Path
    scheduler_dir: Optional[Path]  # None on ranks other than 0
    module: Any
    trainer: Any


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def last_checkpoint(cfg: Config) -> Optional[Path]:
    path = checkpoint_dir(cfg) / "last.ckpt"
    return path if path.is_file() else None


def build_trainer(cfg: Config, module, callbacks: Sequence[Any] = (), progress_bar: Optional[bool] = None,
                  backend_device: Optional[torch.device] = None):
    """The Lightning ``Trainer`` of ``cfg.trainer`` (steps counted in optimizer steps, i.e.
    ``module.updates_per_batch`` per iteration). ``trainer.accelerator=auto`` follows the
    backend's device, so the policy trains where the rollouts run (the toy backend: the CPU)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from consolver.monitor import TrainingMonitor

    t, updates = cfg.trainer, module.updates_per_batch
    checkpoints = ModelCheckpoint(dirpath=str(checkpoint_dir(cfg)), filename="{step}",
                                  every_n_train_steps=t.checkpoint_every * updates, save_last=True, save_top_k=-1)
    show = t.progress_bar if progress_bar is None else progress_bar
    accelerator = t.accelerator
    if accelerator == "auto" and backend_device is not None:
        accelerator = "gpu" if torch.device(backend_device).type == "cuda" else "cpu"
    return L.Trainer(
        max_steps=t.max_steps * updates, max_epochs=-1, accelerator=accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=t.strategy, precision=t.precision,
        logger=TensorBoardLogger(save_dir=cfg.output_dir, name="tb", version="", default_hp_metric=False),
        callbacks=[checkpoints, TrainingMonitor(cfg), *callbacks], enable_progress_bar=show,
        log_every_n_steps=max(1, t.log_every_n_steps * updates), num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, enable_model_summary=False, deterministic=False)


def fit(cfg: Config, resume: bool = False, callbacks: Sequence[Any] = (), progress_bar: Optional[bool] = None,
        runtime: Optional[Dict[str, Any]] = None) -> FitResult:
    """Train ``cfg`` and export ``<output_dir>/scheduler`` (on rank 0).

    Args:
        resume: continue from ``<output_dir>/checkpoints/last.ckpt`` (weights, optimizer, LR
            schedule, step counters and data position); an error if there is none.
        runtime: prebuilt ``{"backend", "reward"}`` to reuse (tests, tools).
    """
    import lightning as L

    from consolver.algos import build_algorithm
    from consolver.data import ShardDataModule

    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    ckpt = None
    if resume:
        ckpt = last_checkpoint(cfg)
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint at {checkpoint_dir(cfg) / 'last.ckpt'}; "
                              f"run without --resume to start, or set output_dir to the run to resume")
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = build_algorithm(cfg, runtime)
    rt = module.build_runtime()
    datamodule = ShardDataModule(cfg, backend=rt["backend"])
    trainer = build_trainer(cfg, module, callbacks, progress_bar, rt["backend"].device)
    if trainer.is_global_zero:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    stats = datamodule.stats
    if any(stats.values()):
        logger.warning("data problems while training: %s", stats)
    scheduler_dir = None
    if trainer.is_global_zero:
        scheduler_dir = export_scheduler(module, Path(cfg.output_dir) / "scheduler")
    return FitResult(Path(cfg.output_dir), scheduler_dir, module, trainer)


def trained_scheduler(module, num_steps: Sequence[int], prediction_type: Optional[str] = None):
    """The solver a training module's mode defines, as a :class:`~consolver.scheduler.ConsistencySolverScheduler`:
    coefficient tables (or the attached sample-feature policy) and, with learned grids, the step
    grids for every K in ``num_steps``. What :func:`export_scheduler` saves and the held-out
    evaluation during training solves with."""
    from consolver.algos.base import solver_scheduler

    scheduler = solver_scheduler(module.cfg, module.build_runtime()["backend"].schedule, prediction_type)
    if module.cfg.policy.sample_features:  # acts on the latents: the scheduler carries the policy
        scheduler.attach_policy(module.sample_policy())
    else:
        scheduler.set_coefficient_tables(module.coefficient_tables(num_steps))
    if module.learn_timesteps:
        scheduler.set_step_grids(module.step_grids(num_steps))
    return scheduler


def export_scheduler(module, directory: str | os.PathLike, num_steps: Optional[Sequence[int]] = None) -> Path:
    """Write the trained solver as a diffusers scheduler directory: the actor's mode compiled into
    a coefficient table for every K in ``num_steps`` (default: every trained K), and the actor's
    weights beside it. A K that was not trained is refused."""
    from safetensors.torch import save_file

    cfg = module.cfg
    num_steps = list(num_steps or module.trained_num_steps)
    untrained = sorted(set(int(k) for k in num_steps) - set(module.trained_num_steps))
    if untrained:
        raise ValueError(f"cannot export K={untrained}: not trained; trained K: {module.trained_num_steps}")
    rt = module.build_runtime()
    # the model's own output type (a v-prediction UNet): pipelines pass it to the scheduler raw
    scheduler = trained_scheduler(module, num_steps, getattr(rt["backend"], "model_prediction_type", None))
    directory = Path(directory)
    scheduler.save_pretrained(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in module.actor.state_dict().items()}
    meta = {"policy": json.dumps(to_container(cfg)["policy"]), "trained_num_steps": json.dumps(module.trained_num_steps),
            "solver_order": str(module.order), "algo": cfg.algo.name}
    save_file(state, str(directory / POLICY_FILE), metadata=meta)
    logger.info("exported the solver for K in %s to %s", num_steps, directory)
    return directory


def load_module(checkpoint: str | os.PathLike, runtime: Optional[Dict[str, Any]] = None):
    """The training module of a checkpoint (its config is inside), e.g. to export another time."""
    from omegaconf import OmegaConf

    from consolver.algos import algorithm_class
    from consolver.config import Config as Schema

    state = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
    cfg = OmegaConf.merge(OmegaConf.structured(Schema), state["hyper_parameters"]["config"])
    module = algorithm_class(cfg.algo.name)(cfg, runtime)
    module.load_state_dict(state["state_dict"])
    return module


__all__ = ["FitResult", "POLICY_FILE", "build_trainer", "export_scheduler", "fit", "last_checkpoint", "load_module"]
