"""One output directory, one run: what a new run, ``--resume`` and ``--overwrite`` may do to
``output_dir`` before anything is written.

A directory *holds a run* when it has any of the run's own files: ``config.yaml``,
``checkpoints/*.ckpt``, ``scheduler/`` or ``tb/``. Shards (the toy configs keep theirs in
``<output_dir>/shards``) and other files are never a run and are never removed.

- A new run into a directory that holds one is refused (:class:`RunExistsError`), so a second
  fit can neither replace the first one's solver nor mix two runs in one TensorBoard folder.
- ``overwrite`` removes the old run's files first (and the ``eval/`` and ``preview/`` folders the
  tools wrote from its solver).
- ``resume`` checks that ``checkpoints/last.ckpt`` was trained with this config, key by key,
  before anything is written (:class:`ResumeMismatchError` names the keys that differ).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from consolver.config import Config, ConfigError

logger = logging.getLogger(__name__)

#: The run's own files and folders in ``output_dir`` (``overwrite`` removes exactly these).
RUN_FILES = ("config.yaml", "checkpoints", "scheduler", "tb", "eval", "preview")

#: Config keys that may change when a run resumes: how long it runs and how it reports, where it
#: runs and how fast; never what it learns. Prefixes end with a dot.
RESUMABLE_KEYS = ("output_dir", "trainer.max_steps", "trainer.log_every_n_steps", "trainer.checkpoint_every",
                  "trainer.eval_every", "trainer.eval_num_noises", "trainer.image_every", "trainer.progress_bar",
                  "trainer.num_threads", "trainer.devices", "trainer.num_nodes", "trainer.accelerator",
                  "trainer.strategy", "backend.device", "data.num_workers", "validation")


class RunExistsError(ConfigError):
    """``output_dir`` already holds a run and neither ``resume`` nor ``overwrite`` was asked for."""


class ResumeMismatchError(ConfigError):
    """The checkpoint to resume was trained with another config."""


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def last_checkpoint(cfg: Config) -> Optional[Path]:
    path = checkpoint_dir(cfg) / "last.ckpt"
    return path if path.is_file() else None


def run_files(output_dir: str | Path) -> List[str]:
    """The run files ``output_dir`` holds (see the module docstring), e.g. ``["config.yaml", "tb/"]``."""
    root = Path(output_dir)
    found = []
    if (root / "config.yaml").is_file():
        found.append("config.yaml")
    if any((root / "checkpoints").glob("*.ckpt")):
        found.append("checkpoints/")
    for name in ("scheduler", "tb"):
        if (root / name).is_dir() and any((root / name).iterdir()):
            found.append(f"{name}/")
    return found


def _flat(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        out: Dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)


def config_differences(trained: Dict[str, Any], now: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``(key, value in the checkpoint, value now)`` for every key that differs and matters for
    resuming (see :data:`RESUMABLE_KEYS` for those that may change). Lists compare whole."""
    a, b = _flat(trained), _flat(now)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
            if not _resumable(k) and a.get(k, "<absent>") != b.get(k, "<absent>")]


def load_checkpoint(path: str | Path) -> Tuple[Dict[str, Any], Any]:
    """``(state, config)`` of a training checkpoint: the raw state dict and its training config
    completed with today's schema defaults (a typed OmegaConf :class:`~consolver.config.Config`)."""
    import torch
    from omegaconf import OmegaConf

    from consolver.config import Config as Schema

    state = torch.load(str(path), map_location="cpu", weights_only=False)
    stored = state.get("hyper_parameters", {}).get("config")
    if stored is None:
        raise ConfigError(f"{path} holds no consolver training config: not a checkpoint of tools/fit.py")
    return state, OmegaConf.merge(OmegaConf.structured(Schema), stored)


def checkpoint_config(path: str | Path) -> Dict[str, Any]:
    """The training config stored in a checkpoint, as a plain dict with today's schema defaults."""
    from consolver.config import to_container

    return to_container(load_checkpoint(path)[1])


def prepare_run(cfg: Config, resume: bool = False, overwrite: bool = False) -> Optional[Path]:
    """Check (and with ``overwrite`` clear) ``cfg.output_dir`` for a run; returns the checkpoint
    to resume from, or None for a new run. Raises before anything is written."""
    from consolver.config import to_container

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: pick one")
    out = Path(cfg.output_dir)
    if resume:
        ckpt = last_checkpoint(cfg)
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint at {checkpoint_dir(cfg) / 'last.ckpt'}; run without --resume "
                              f"to start, or set output_dir to the run to resume")
        diffs = config_differences(checkpoint_config(ckpt), to_container(cfg))
        if diffs:
            shown = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in diffs[:8])
            more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
            raise ResumeMismatchError(
                f"--resume: {ckpt} was trained with another config; keys that differ: {shown}{more}. Resume with "
                f"that run's own config (--config {out / 'config.yaml'}) or start a new run with another output_dir=")
        return ckpt
    found = run_files(out)
    if found and not overwrite:
        raise RunExistsError(f"output_dir {str(out)!r} already holds a run ({', '.join(found)}): continue it with "
                             f"--resume, start a new one with output_dir=<new folder>, or replace it with --overwrite")
    if found:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        logger.warning("--overwrite: removed the previous run in %s (%s)", out, ", ".join(found))
    return None


__all__ = ["RESUMABLE_KEYS", "RUN_FILES", "ResumeMismatchError", "RunExistsError", "checkpoint_config",
           "checkpoint_dir", "config_differences", "last_checkpoint", "load_checkpoint", "prepare_run", "run_files"]
