"""Solve grids: the K+1 times of a K-step solve, in scheduler units and in ODE time.

``grid_t``: timesteps as the model sees them (VP: integers, the final entry -1 means "land on
x0"; flow: ``sigma * T``, ending at 0). ``grid_ode``: the ODE's own time, where DDIM/Euler is
the explicit Euler method (VP: ``rho = s/a``; flow: sigma). Both float64 ``[K + 1]``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from consolver.schedules import FINAL_TIMESTEP, FlowMatchingSchedule, VPSchedule


def vp_grid(schedule: VPSchedule, num_inference_steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None,
            spacing: str = "trailing", steps_offset: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``(grid_t, grid_rho)`` from ``num_inference_steps`` (spaced) or descending integer ``timesteps``."""
    T = schedule.num_train_timesteps
    if timesteps is not None:
        t = np.asarray(timesteps, dtype=np.int64)
        if t.ndim != 1 or len(t) == 0 or np.any(np.diff(t) >= 0) or t[0] >= T or t[-1] < 0:
            raise ValueError(f"timesteps must be strictly descending integers in [0, {T}), got {t.tolist()}")
    else:
        t = schedule.timesteps(num_inference_steps, spacing, steps_offset)
    grid_t = np.append(t, FINAL_TIMESTEP).astype(np.float64)
    return grid_t, schedule.rho(grid_t.astype(np.int64)).numpy()


def flow_grid(schedule: FlowMatchingSchedule, num_inference_steps: Optional[int] = None,
              timesteps: Optional[Sequence[float]] = None, sigmas: Optional[Sequence[float]] = None,
              mu: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(grid_t, grid_sigma)`` from ``num_inference_steps`` or unshifted ``sigmas`` (shifted here,
    with ``mu`` when dynamic), or final ``timesteps`` (``sigma * T``, kept exactly as given)."""
    T = schedule.num_train_timesteps
    if timesteps is not None:
        if sigmas is not None:
            raise ValueError("a flow-matching schedule takes `sigmas` (shifted here) or final `timesteps` "
                             "(sigma * num_train_timesteps), not both")
        t = np.asarray(timesteps, dtype=np.float64)
        if t.ndim != 1 or len(t) == 0 or np.any(np.diff(t) >= 0) or t[0] > T or t[-1] <= 0:
            raise ValueError(f"timesteps must be strictly descending values in (0, {T}], got {t.tolist()}")
        return np.append(t, 0.0), np.append(t / T, 0.0)
    if schedule.use_dynamic_shifting and mu is None:
        raise ValueError("`mu` must be passed when `use_dynamic_shifting` is True")
    s = schedule.sigmas(num_inference_steps, sigmas, mu)
    return s * T, s
