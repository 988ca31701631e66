"""A trained solver behind k-diffusion's sampler contract (ComfyUI, A1111/Forge, k-diffusion).

k-diffusion's samplers are functions ``sample(model, x, sigmas, extra_args=None, callback=None,
disable=None)``: ``model(x, sigma * s_in, **extra_args)`` returns the denoised image, ``sigmas``
``[K + 1]`` decrease to the last one (0 for a full solve) and ``x`` is in k-diffusion's scale:

- **VP / epsilon models** (SD1.5): ``sigma = s_t / a_t = sqrt((1 - abar_t) / abar_t)``, which is the
  solver's ODE time ``rho``, and ``x = x_vp / a_t = x0 + sigma eps``.
- **Flow matching** (FLUX; ComfyUI's ``CONST`` sampling): ``sigma`` is the shifted flow sigma and
  ``x = (1 - sigma) x0 + sigma eps`` is the flow state itself.

In both, ``d = (x - denoised) / sigma`` is the model output the coefficient tables were trained on
(epsilon on VP, velocity on flow), and one solver step blends the last ``solver_order`` of them with
the table's row and takes an Euler step in sigma: ``x' = x + (sigma' - sigma) d~``. On VP that is the
scheduler's DDIM transfer divided by ``a_t'``; on flow it is the scheduler's Euler transfer.

**The scheduler's solve as sigmas.** A K-step solve of
:class:`~consolver.scheduler.ConsistencySolverScheduler` evaluates the model at ``timesteps[0..K-1]``
(the learned grid for K where the solver has one, else its ``timestep_spacing``) and lands on a final
target: on VP the marker timestep -1, ``abar = 1`` (x0, ``sigma = 0``) with ``set_alpha_to_one=True``
(what training exports) or ``abar[0]`` with ``False``; on flow ``sigma = 0``. Its ``K + 1`` sigmas
(:func:`load_sigmas`) are the noise levels of those times, the final one included, so the last
sigma is 0 except for a VP solver with ``set_alpha_to_one=False``: there it is the sigma of
timestep 0 (0.0292 on SD1.5) and the result, like every k-diffusion state, is the scheduler's
``x_vp`` divided by ``a`` (0.99957).

**Start.** Diffusers pipelines (and the scheduler's previews) start from ``x_T = noise``, which is
``noise * sqrt(1 + sigma_0 ** 2)`` in k-diffusion's scale; ComfyUI scales the noise so for a full
denoise. k-diffusion's own scripts start from ``noise * sigma_0``, a slightly different start
(by ``s_T``, 0.9977 on SD1.5).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import trange

from consolver.policy import step_observation
from consolver.scheduler import ConsistencySolverScheduler
from consolver.schedules import FINAL_TIMESTEP
from consolver.solvers.grid import off_grid_message
from consolver.solvers.lmm import combine_history, flow_transfer

Solver = Union[str, os.PathLike, ConsistencySolverScheduler]
#: Largest distance, in timesteps (VP) or in log shift (flow), at which given sigmas still count as
#: the learned grid: float32 sigmas are within 1e-4 of it.
GRID_TOLERANCE = 1e-2
#: Relative difference above which a model's discrete sigmas are another schedule than the solver's.
SCHEDULE_TOLERANCE = 1e-3


def as_solver(solver: Solver) -> ConsistencySolverScheduler:
    """A :class:`~consolver.scheduler.ConsistencySolverScheduler` as given, or loaded from its
    exported directory (``FileNotFoundError`` in one line when it is not one)."""
    if isinstance(solver, ConsistencySolverScheduler):
        return solver
    from consolver.preview.core import load_solver

    return load_solver(solver)


def check_num_steps(scheduler: ConsistencySolverScheduler, num_steps: int) -> None:
    """``ValueError`` naming the K values the solver has when a learned solver has no table for
    ``num_steps`` (a solver without learned tables takes any K >= 1)."""
    K = int(num_steps)
    if K < 1:
        raise ValueError(f"a solve needs K >= 1 steps (at least 2 sigmas), got K={K}")
    available = scheduler.available_num_steps
    if available and K not in available:
        raise ValueError(f"this solver has no coefficient table for K={K} steps (len(sigmas) - 1); it has tables for "
                         f"K in {', '.join(map(str, available))}: pass K + 1 sigmas, e.g. load_sigmas(solver, K)")


# ------------------------------------------------------------------------------ sigmas
def load_sigmas(solver: Solver, num_steps: int, model_sampling: Any = None, mu: Optional[float] = None) -> torch.Tensor:
    """The solver's K-step grid as k-diffusion sigmas ``[K + 1]`` float32, decreasing, the final
    target last (see the module docstring): what ComfyUI calls ``SIGMAS``.

    Args:
        solver: an exported solver directory or a loaded scheduler.
        num_steps: K; a learned solver refuses a K it has no table for, naming those it has.
        model_sampling: whose noise levels to use at the grid's times.
            ``None``: the solver's own schedule config (VP: its betas; flow: its shift, or ``mu``).
            VP: any object with the model's discrete sigmas ``sigmas [T]`` (ascending in t:
            ComfyUI's ``model.get_model_object("model_sampling")``, k-diffusion's
            ``DiscreteSchedule``/``CompVisDenoiser``); sigma at timestep t is ``sigmas[t]``, so the
            host maps each back to exactly t. A table that is not the solver's schedule warns.
            Flow: an object with ``timestep(sigma)`` and ``sigma(timestep)`` (ComfyUI's
            ``ModelSamplingDiscreteFlow``, ``ModelSamplingFlux``); the sigma at unshifted grid
            position p is ``sigma(timestep(p))``, the model's own shift applied.
        mu: FLUX's dynamic shift, needed on a ``use_dynamic_shifting`` solver without ``model_sampling``.
    """
    scheduler = as_solver(solver)
    K = int(num_steps)
    check_num_steps(scheduler, K)
    positions = scheduler.step_positions(K)  # [K+1] float64: VP timesteps ending at -1, flow unshifted ending at 0
    if scheduler.config.schedule == "vp":
        sigmas = _vp_sigmas(scheduler, positions, model_sampling)
    else:
        sigmas = _flow_sigmas(scheduler, positions[:-1], model_sampling, mu)
    return torch.as_tensor(np.asarray(sigmas, dtype=np.float64), dtype=torch.float32)


def _vp_sigmas(scheduler, positions: np.ndarray, model_sampling) -> np.ndarray:
    schedule = scheduler.vp_schedule
    t = positions.astype(np.int64)
    if model_sampling is None:
        return schedule.rho(t).numpy()
    table = getattr(model_sampling, "sigmas", None)
    T = schedule.num_train_timesteps
    if table is None or len(table) != T:
        raise ValueError(f"model_sampling for a VP solver needs the model's discrete sigmas `sigmas` [{T}] (ComfyUI's "
                         f"model_sampling, k-diffusion's DiscreteSchedule); got {type(model_sampling).__name__}"
                         + ("" if table is None else f" with {len(table)} sigmas"))
    table = torch.as_tensor(table).detach().to("cpu", torch.float64).numpy()
    own = schedule.rho(np.arange(T)).numpy()
    worst = float(np.max(np.abs(table / own - 1.0)))
    if worst > SCHEDULE_TOLERANCE:
        warnings.warn(f"load_sigmas: the model's sigmas differ from the solver's schedule by up to {worst:.1%}; the "
                      f"solver was trained on another noise schedule than this model's", stacklevel=3)
    final = 0.0 if schedule.final_alphas_cumprod == 1.0 else table[0]
    return np.append(table[t[:-1]], final)


def _flow_sigmas(scheduler, positions: np.ndarray, model_sampling, mu: Optional[float]) -> np.ndarray:
    if model_sampling is None:
        if scheduler.flow_schedule.use_dynamic_shifting and mu is None:
            raise ValueError("this solver's schedule shifts with the resolution (use_dynamic_shifting): pass `mu` "
                             "(consolver.schedules.flux_mu) or the model's model_sampling")
        return scheduler.flow_schedule.sigmas(sigmas=positions, mu=mu)
    if not (callable(getattr(model_sampling, "sigma", None)) and callable(getattr(model_sampling, "timestep", None))):
        raise ValueError(f"model_sampling for a flow-matching solver needs `timestep(sigma)` and `sigma(timestep)` "
                         f"(ComfyUI's flow model_sampling); got {type(model_sampling).__name__}")
    p = torch.as_tensor(positions, dtype=torch.float64)
    shifted = torch.as_tensor(model_sampling.sigma(model_sampling.timestep(p))).detach().to("cpu", torch.float64)
    return np.append(shifted.numpy(), 0.0)


def sigma_timesteps(scheduler: ConsistencySolverScheduler, sigmas) -> np.ndarray:
    """The solve's times in scheduler units ``[K + 1]`` float64 (``grid_t`` of
    :mod:`consolver.solvers.grid`, what policies observe) from k-diffusion ``sigmas [K + 1]``.
    VP: real timesteps, interpolated in log sigma between the schedule's integer ones (exact at
    them); a last sigma at the solver's final target (0, or sigma(abar[0]) with
    ``set_alpha_to_one=False``) is ``FINAL_TIMESTEP`` (-1). Flow: ``sigma * T``."""
    s = _as_float64(sigmas)
    T = scheduler.config.num_train_timesteps
    if scheduler.config.schedule == "flow":
        return s * T
    schedule = scheduler.vp_schedule
    log_rho = np.log(schedule.rho(np.arange(T)).numpy())  # ascending in t
    t = np.interp(np.log(np.maximum(s, 1e-300)), log_rho, np.arange(T, dtype=np.float64))
    final = float(schedule.rho(FINAL_TIMESTEP))
    if s[-1] == 0.0 or (final > 0 and math.isclose(s[-1], final, rel_tol=1e-5)):
        t[-1] = FINAL_TIMESTEP
    return t


def on_learned_grid(scheduler: ConsistencySolverScheduler, sigmas) -> bool:
    """Whether ``sigmas [K + 1]`` are the solver's learned grid for K (True when it has none for K,
    as the scheduler does not warn then either). VP: the same timesteps and final target; flow: the
    learned unshifted positions under the solver's shift, or under any shift (``mu``) when the
    schedule shifts with the resolution."""
    s = _as_float64(sigmas)
    grid = scheduler.step_grids.get(len(s) - 1)
    if grid is None:
        return True
    if scheduler.config.schedule == "vp":
        expected = np.append(grid, FINAL_TIMESTEP)
        return bool(np.all(np.abs(sigma_timesteps(scheduler, s) - expected) <= GRID_TOLERANCE))
    if s[-1] != 0.0:
        return False
    s, p = s[:-1], grid
    top = p == 1.0
    if np.any(np.abs(s[top] - 1.0) > 1e-6) or np.any((s[~top] <= 0) | (s[~top] >= 1)):
        return False
    if top.all():
        return True
    log_shift = -np.log((1.0 / s[~top] - 1.0) / (1.0 / p[~top] - 1.0))  # time_shift: 1/s - 1 = (1/p - 1) / shift
    flow = scheduler.flow_schedule
    if flow.use_dynamic_shifting:
        return bool(np.ptp(log_shift) <= GRID_TOLERANCE)
    return bool(np.all(np.abs(log_shift - math.log(flow.shift)) <= GRID_TOLERANCE))


def _as_float64(sigmas) -> np.ndarray:
    if torch.is_tensor(sigmas):
        sigmas = sigmas.detach().to("cpu", torch.float64).numpy()
    return np.asarray(sigmas, dtype=np.float64).reshape(-1)


def check_sigmas(sigmas) -> np.ndarray:
    """``sigmas`` as float64 ``[K + 1]``; ``ValueError`` unless they are at least 2 finite values,
    strictly decreasing, the last >= 0."""
    s = _as_float64(sigmas)
    if len(s) < 2 or not np.isfinite(s).all() or np.any(np.diff(s) >= 0) or s[-1] < 0:
        raise ValueError(f"sigmas must be at least 2 finite values, strictly decreasing, the last >= 0 (k-diffusion's "
                         f"contract: K + 1 sigmas ending at 0); got {s.tolist()}")
    return s


# ------------------------------------------------------------------------------ sampler
def load_sampler(solver: Solver) -> Callable[..., torch.Tensor]:
    """A k-diffusion sampler function that solves with the solver's coefficient tables (or its
    attached policy, by its mode): ``sample(model, x, sigmas, extra_args=None, callback=None,
    disable=None)``.

    ``model(x, sigma * s_in, **extra_args)`` returns the denoised image ``[B, ...]``; ``x [B, ...]``
    is the start in k-diffusion's scale; ``sigmas [K + 1]`` decreasing (K = NFE); ``callback`` gets
    k-diffusion's ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` after each model call; ``disable``
    turns the tqdm bar off. Returns ``x`` at ``sigmas[-1]`` in ``x``'s dtype (math in float32, as the
    scheduler's). A K the solver has no table for is a ``ValueError`` naming the K it has; sigmas
    that are not the solver's learned grid for K warn once per sampler and K, as the scheduler warns
    for explicit timesteps.
    """
    scheduler = as_solver(solver)
    warned: set = set()

    @torch.no_grad()
    def sample_consolver(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[Dict[str, Any]] = None,
                         callback: Optional[Callable[[dict], None]] = None, disable: Optional[bool] = None) -> torch.Tensor:
        extra_args = {} if extra_args is None else extra_args
        values = check_sigmas(sigmas)
        K = len(values) - 1
        check_num_steps(scheduler, K)
        if K not in warned and not on_learned_grid(scheduler, values):
            warned.add(K)
            warnings.warn(off_grid_message("k-diffusion sampler", f"{K + 1} sigmas given", scheduler.step_grids,
                                           "solver") + "; load_sigmas(solver, K) gives the learned ones", stacklevel=2)
        grid_t = sigma_timesteps(scheduler, values)
        table = scheduler.coefficient_table(grid_t, values)  # None: a policy that looks at the sample, per step
        order = scheduler.config.solver_order
        T = scheduler.config.num_train_timesteps
        s_in = x.new_ones([x.shape[0]])
        history = []
        for i in trange(K, disable=disable):
            denoised = model(x, sigmas[i] * s_in, **extra_args)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
            history.insert(0, (x.float() - denoised.float()) / float(values[i]))  # epsilon (VP) or velocity (flow)
            del history[order:]
            if table is not None:
                coefficients = table[i]
            else:
                observation = step_observation(grid_t[i], grid_t[i + 1], i, K, T).to(x.device)
                coefficients = scheduler.policy_module.mode(observation, len(history), history)
            x = flow_transfer(x.float(), combine_history(history, coefficients), float(values[i]),
                              float(values[i + 1])).to(x.dtype)
        return x

    sample_consolver.solver = scheduler
    return sample_consolver


__all__ = ["as_solver", "check_num_steps", "check_sigmas", "load_sampler", "load_sigmas", "on_learned_grid",
           "sigma_timesteps"]
