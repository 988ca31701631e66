"""Solve grids: the K+1 times of a K-step solve, in scheduler units and in ODE time.

``grid_t``: timesteps as the model sees them (VP: integers, the final entry -1 means "land on
x0"; flow: ``sigma * T``, ending at 0). ``grid_ode``: the ODE's own time, where DDIM/Euler is
the explicit Euler method (VP: ``rho = s/a``; flow: sigma). Both float64 ``[K + 1]``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

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


# ---------------------------------------------------------------------------- learned grids
#
# A learned grid is K+1 *positions* from a fixed start to a fixed end, in position units: on a
# VP schedule the timestep (the end is FINAL_TIMESTEP = -1, "land on x0"; positions are rounded
# to integers), on flow matching the *unshifted* sigma (end 0; the shift, FLUX's ``mu`` included,
# is applied afterwards, as to the ``sigmas`` a FLUX pipeline passes).
#
# Parametrisation (stick breaking): K-1 logits z_i, one per interior point. With ``g`` the
# minimum gap and ``R_i = p_i - end - (K - i) g`` the room left once every remaining interval has
# its gap, ``p_{i+1} = p_i - g - sigmoid(z_i) R_i``. Then ``R_{i+1} = (1 - sigmoid(z_i)) R_i >= 0``,
# so every interval is at least ``g`` for any z (even +-inf): strictly decreasing, in range.


def grid_room(position: torch.Tensor, end: float, steps_left: int, min_gap: float) -> torch.Tensor:
    """``R = p - end - steps_left * g``: the room beyond the minimum gaps, same shape as ``p``."""
    return position - end - steps_left * min_gap


def next_position(position: torch.Tensor, logit: torch.Tensor, end: float, steps_left: int, min_gap: float,
                  integer: bool = False, last_max: Optional[float] = None) -> torch.Tensor:
    """The next grid position from the current one ``[...]`` and its logit ``[...]`` (float64);
    ``steps_left`` (>= 1) intervals remain before ``end``. ``integer``: rounded half up with a
    straight-through gradient (VP; with integer ``position``, ``end`` and ``min_gap`` the room
    stays >= 0, so the rounded grid keeps its gaps). ``last_max``: the last model evaluation (the
    position computed with ``steps_left == 2``) lies at or below it. Differentiable in both."""
    if steps_left == 1:
        return torch.full_like(position, end)
    room = grid_room(position, end, steps_left, min_gap)
    if steps_left == 2 and last_max is not None:  # the same formula from a lower top: top - f (top - end - g)
        top = torch.clamp(position - min_gap, max=float(last_max))
        out = top - torch.sigmoid(logit.double()) * (top - end - min_gap)
    else:
        out = position - min_gap - torch.sigmoid(logit.double()) * room
    return round_positions(out) if integer else out


def grid_from_logits(logits: torch.Tensor, start: float, end: float, min_gap: float, integer: bool = False,
                     last_max: Optional[float] = None) -> torch.Tensor:
    """Positions ``[..., K + 1]`` (``start`` first, ``end`` last, strictly decreasing by at least
    ``min_gap``) from logits ``[..., K - 1]``, by :func:`next_position` step after step (so the
    same float64 arithmetic as a solve that draws its logits one step at a time); ``last_max`` as
    :func:`next_position` takes it."""
    z = logits.double()
    K = z.shape[-1] + 1
    if not start - end >= K * min_gap:
        raise ValueError(f"a {K}-step grid from {start} to {end} cannot keep gaps of {min_gap}")
    p = torch.full(z.shape[:-1], float(start), dtype=torch.float64, device=z.device)
    out = [p]
    for i in range(K - 1):
        p = next_position(p, z[..., i], end, K - i, min_gap, integer, last_max)
        out.append(p)
    return torch.stack(out + [torch.full_like(p, end)], -1)


def grid_units(schedule_kind: str, num_train_timesteps: int) -> tuple:
    """``(end, min_gap, integer)`` of grid positions: VP ``(-1, 1, True)`` (timesteps, landing on
    x0), flow ``(0, 1/T, False)`` (unshifted sigma)."""
    if schedule_kind == "vp":
        return float(FINAL_TIMESTEP), 1.0, True
    return 0.0, 1.0 / num_train_timesteps, False


#: Where :func:`logits_from_grid` puts a last evaluation that lies above ``last_max``: this fraction
#: of the room below the cap (logit -2.9, where a policy's exploration still moves it both ways).
LAST_MAX_MIN_FRACTION = 0.05


def logits_from_grid(positions, min_gap: float, last_max: Optional[float] = None) -> torch.Tensor:
    """Inverse of :func:`grid_from_logits`: logits ``[K - 1]`` float64 of a strictly decreasing grid
    ``[K + 1]`` whose gaps are all larger than ``min_gap``. With ``last_max``, a last model
    evaluation above it maps to just below ``last_max`` (:data:`LAST_MAX_MIN_FRACTION` of the room)."""
    p = torch.as_tensor(np.asarray(positions, dtype=np.float64))
    K = p.shape[-1] - 1
    end = float(p[-1])
    gaps = p[:-1] - p[1:]
    if bool((gaps <= min_gap).any()):
        raise ValueError(f"grid {p.tolist()} has a gap <= the minimum gap {min_gap}")
    out = []
    for i in range(K - 1):
        if i == K - 2 and last_max is not None:
            top = torch.clamp(p[i] - min_gap, max=float(last_max))
            f = (top - p[i + 1]) / (top - end - min_gap)
            # a point beyond the cap lands just below it, not at the sigmoid's dead end (logit -27)
            f = f.clamp(min=LAST_MAX_MIN_FRACTION)
        else:
            f = (gaps[i] - min_gap) / grid_room(p[i], end, K - i, min_gap)
        out.append(torch.logit(f.clamp(1e-12, 1 - 1e-12)))
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def round_positions(positions: torch.Tensor) -> torch.Tensor:
    """VP positions rounded to integers (half up, so positions at least 1 apart stay strictly
    decreasing), with a straight-through gradient."""
    rounded = torch.floor(positions + 0.5)
    return positions + (rounded - positions).detach()


def parse_step_grids(grids, schedule_kind: str, num_train_timesteps: int) -> dict:
    """Learned grids ``{K: [K values]}`` (keys ints or digit strings) as float64 arrays: VP
    integer timesteps in ``[0, T)``, flow unshifted sigmas in ``(0, 1]``, strictly descending,
    exactly K of them. ``ValueError`` naming the K otherwise."""
    from consolver.solvers.tables import table_key

    out = {}
    T = int(num_train_timesteps)
    for key, values in (grids or {}).items():
        K = table_key(key)
        try:
            grid = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"step grid for K={K} must be a flat list of numbers, got {values!r}") from None
        if grid.ndim != 1 or len(grid) != K:
            raise ValueError(f"step grid for K={K} has {grid.size} values, not {K}: a K-step grid lists the K "
                             f"times the model is evaluated at")
        if not np.isfinite(grid).all() or np.any(np.diff(grid) >= 0):
            raise ValueError(f"step grid for K={K} must be strictly descending finite values, got {grid.tolist()}")
        if schedule_kind == "vp" and (np.any(grid != np.round(grid)) or grid[0] >= T or grid[-1] < 0):
            raise ValueError(f"step grid for K={K} must hold integer timesteps in [0, {T}), got {grid.tolist()}")
        if schedule_kind == "flow" and (grid[0] > 1.0 or grid[-1] <= 0.0):
            raise ValueError(f"step grid for K={K} must hold unshifted sigmas in (0, 1], got {grid.tolist()}")
        out[K] = grid
    return out


def is_default_flux_sigmas(sigmas) -> bool:
    """Whether ``sigmas`` are the ``linspace(1, 1/K, K)`` FLUX pipelines pass when the user gives none."""
    given = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    K = len(given)
    return K > 0 and np.allclose(given, np.linspace(1.0, 1.0 / K, K), rtol=0, atol=1e-6)


def choose_grid(grids: dict, schedule_kind: str, num_inference_steps, timesteps, sigmas):
    """``(timesteps, sigmas, overridden)`` a scheduler with learned ``grids`` ``{K: [K]}`` solves on:
    K's learned grid where nothing explicit is given, and in place of the default sigmas a FLUX
    pipeline passes; otherwise what was given. ``overridden`` names the explicit grid that won over
    learned ones (``"4 timesteps given"``), else ``None``."""
    if not grids:
        return timesteps, sigmas, None
    vp = schedule_kind == "vp"
    if timesteps is None and sigmas is None:
        learned = grids.get(int(num_inference_steps))
        if learned is None:
            return None, None, None
        return (learned, None, None) if vp else (None, learned, None)
    name, given = ("timesteps", timesteps) if timesteps is not None else ("sigmas", sigmas)
    n = len(given)
    if sigmas is not None and not vp and n in grids and is_default_flux_sigmas(sigmas):
        return None, grids[n], None
    return timesteps, sigmas, f"{n} {name} given"


def off_grid_message(where: str, given: str, grids: dict, holder: str = "scheduler") -> str:
    """The user-facing warning when a solve with learned ``grids`` ``{K: [K]}`` runs on other times:
    ``where`` (the call), ``given`` (what it solves on, e.g. ``"4 timesteps given"``), ``holder``
    (what has the grids)."""
    return (f"{where}: solving on the {given}, not on a learned step grid (this {holder} has learned grids "
            f"for K in {sorted(grids)})")
