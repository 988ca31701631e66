"""Export of a training module as a diffusers scheduler directory (used by training, the
monitor's held-out evaluation and tools alike, so none of them imports another).

``<dir>/scheduler_config.json`` holds the coefficient table of every trained K (and, with learned
step grids, each K's grid); ``<dir>/consolver_policy.safetensors`` holds the actor's weights and
the policy config. Every file is written with the process's usual file mode (0644 under the
common umask 022), as ``save_pretrained`` writes the others.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from consolver.config import to_container

logger = logging.getLogger(__name__)

POLICY_FILE = "consolver_policy.safetensors"


def trained_scheduler(module, num_steps: Sequence[int], prediction_type: Optional[str] = None):
    """The solver a training module's mode defines, as a :class:`~consolver.scheduler.ConsistencySolverScheduler`:
    coefficient tables (or the attached sample-feature policy) and, with learned grids, the step
    grids for every K in ``num_steps``. What :func:`export_scheduler` saves and the held-out
    evaluation during training solves with."""
    from consolver.scheduler import solver_scheduler

    scheduler = solver_scheduler(module.cfg, module.build_runtime()["backend"].schedule, prediction_type)
    if module.cfg.policy.sample_features:  # acts on the latents: the scheduler carries the policy
        scheduler.attach_policy(module.sample_policy())
    else:
        scheduler.set_coefficient_tables(module.coefficient_tables(num_steps))
    if module.learn_timesteps:
        scheduler.set_step_grids(module.step_grids(num_steps))
    return scheduler


def default_file_mode() -> int:
    """``0o666`` minus the process umask: the mode ``open(..., "w")`` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def export_scheduler(module, directory: str | os.PathLike, num_steps: Optional[Sequence[int]] = None) -> Path:
    """Write the trained solver as a diffusers scheduler directory: the actor's mode compiled into
    a coefficient table for every K in ``num_steps`` (default: every trained K), and the actor's
    weights beside it. A K that was not trained is refused. Unless ``validation.gate=off``, every K
    passes the validation gate first (:mod:`consolver.evaluation.gate`): a K that loses to a
    training-free solver is handled as the config says, and the scores go into the config."""
    from safetensors.torch import save_file

    cfg = module.cfg
    num_steps = list(num_steps or module.trained_num_steps)
    untrained = sorted(set(int(k) for k in num_steps) - set(module.trained_num_steps))
    if untrained:
        raise ValueError(f"cannot export K={untrained}: not trained; trained K: {module.trained_num_steps}")
    rt = module.build_runtime()
    # the model's own output type (a v-prediction UNet): pipelines pass it to the scheduler raw
    scheduler = trained_scheduler(module, num_steps, getattr(rt["backend"], "model_prediction_type", None))
    if cfg.validation.gate != "off" and not cfg.policy.sample_features:  # tables only: a policy acts on samples
        from consolver.evaluation.gate import validate_scheduler

        validate_scheduler(cfg, scheduler, num_steps, backend=rt["backend"], reward=rt.get("reward"))
    directory = Path(directory)
    scheduler.save_pretrained(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in module.actor.state_dict().items()}
    meta = {"policy": json.dumps(to_container(cfg)["policy"]), "trained_num_steps": json.dumps(module.trained_num_steps),
            "solver_order": str(module.order), "algo": cfg.algo.name}
    path = directory / POLICY_FILE
    save_file(state, str(path), metadata=meta)
    os.chmod(path, default_file_mode())  # safetensors creates its files 0600
    logger.debug("exported the solver for K in %s to %s", num_steps, directory)
    return directory


__all__ = ["POLICY_FILE", "default_file_mode", "export_scheduler", "trained_scheduler"]
