"""Sampling loops that drive a Backend with any diffusers-style scheduler.

Used for full-step reference solves (targets), baselines and evaluation; the RL
environment has its own step-by-step loop.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from tensordict import TensorDict

from consolver.backends.base import Backend
from consolver.schedules import FlowMatchingSchedule, Schedule, VPSchedule

logger = logging.getLogger(__name__)

#: Names of the reference / baseline solvers (config ``reference.solver``).
REFERENCE_SOLVERS = ("dpmsolver++", "unipc", "ddim", "euler", "adams_bashforth", "ipndm")


def make_scheduler(name: str, schedule: Schedule, timestep_spacing: str = "trailing", order: int = 2, **extra: Any):
    """A diffusers scheduler named ``name`` on ``schedule``.

    ``dpmsolver++`` is diffusers' multistep DPM-Solver++ (``order`` 2 by default, as the paper's
    targets); ``unipc`` is UniPC; ``ddim``/``euler``/``adams_bashforth``/``ipndm`` are
    :class:`~consolver.scheduler.ConsistencySolverScheduler` fixed tables.
    """
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from consolver.scheduler import ConsistencySolverScheduler

    if name not in REFERENCE_SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(REFERENCE_SOLVERS)}")
    config = schedule.diffusers_config()
    if name in ("dpmsolver++", "unipc"):
        cls = DPMSolverMultistepScheduler if name == "dpmsolver++" else UniPCMultistepScheduler
        kwargs = dict(solver_order=order, timestep_spacing=timestep_spacing, **extra)
        if name == "dpmsolver++":
            kwargs["algorithm_type"] = "dpmsolver++"
        if isinstance(schedule, FlowMatchingSchedule):
            if schedule.use_dynamic_shifting:
                raise ValueError(f"{name} reference needs a static flow shift; for dynamic shifting use `euler` "
                                 f"(config reference.solver=euler)")
            kwargs.update(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=schedule.shift,
                          num_train_timesteps=schedule.num_train_timesteps)
        else:
            kwargs.update({k: v for k, v in config.items() if k != "set_alpha_to_one"})
            kwargs["final_sigmas_type"] = "zero" if config["set_alpha_to_one"] else "sigma_min"
        return cls(**kwargs)
    base = "ddim" if name in ("ddim", "euler") else name
    return ConsistencySolverScheduler(
        schedule="vp" if isinstance(schedule, VPSchedule) else "flow",
        base_solver=base,
        solver_order=order if base != "ddim" else 1,
        timestep_spacing=timestep_spacing,
        **config,
        **extra,
    )


@torch.no_grad()
def sample(
    backend: Backend,
    scheduler,
    noise: torch.Tensor,
    cond: TensorDict,
    guidance: float,
    num_inference_steps: int,
    mu: Optional[float] = None,
) -> torch.Tensor:
    """Solve the PF-ODE from ``noise [B, *latent_shape]`` with ``scheduler`` in
    ``num_inference_steps`` model evaluations; returns the final latents, same shape. The grid is
    the one the backend's own pipeline sets (:func:`~consolver.backends.base.timestep_kwargs`:
    FLUX's sigmas and dynamic-shift ``mu``), ``mu`` overridden if given."""
    from consolver.backends.base import timestep_kwargs

    kwargs = dict(timestep_kwargs(backend, num_inference_steps))
    if mu is not None:
        kwargs["mu"] = mu
    scheduler.set_timesteps(num_inference_steps, device=noise.device, **kwargs)
    # diffusers' flow-matching schedulers have neither init_noise_sigma nor scale_model_input
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", None)
    for t in scheduler.timesteps:
        d = backend.predict(x if scale is None else scale(x, t), t, cond, guidance)
        x = scheduler.step(d, t, x, return_dict=False)[0]
    return x
