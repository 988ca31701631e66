"""A batched multistep solve whose grid is drawn one step at a time (learned step grids).

Every row has its own grid: at step ``i`` the caller gives each row's coefficients and the
logit of its next grid position (see :mod:`consolver.solvers.grid`), and the solve transfers
each row to its own next time. Everything is differentiable in the coefficients, the logits
and the latents: the VP noise levels come from
:meth:`~consolver.schedules.VPSchedule.alpha_sigma_continuous` at the (straight-through
rounded) timesteps, so their values are the schedule's own at integers.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from consolver.schedules import time_shift
from consolver.solvers.grid import grid_units, next_position
from consolver.solvers.lmm import combine_history, flow_transfer, vp_transfer


class GridSolve:
    """State of N solves on per-row grids, for a :class:`~consolver.scheduler.ConsistencySolverScheduler`'s
    schedule and order.

    Attributes after :meth:`start`: ``positions`` (list of ``[N]`` float64 grid positions so far),
    ``history`` (model outputs, newest first, at most ``order``).
    """

    def __init__(self, scheduler, last_max: Optional[float] = None):
        cfg = scheduler.config
        self.last_max = last_max
        self.kind, self.T, self.order = cfg.schedule, int(cfg.num_train_timesteps), int(cfg.solver_order)
        self.end, self.min_gap, self.integer = grid_units(self.kind, self.T)
        self.vp_schedule, self.flow_schedule, self.mu = scheduler.vp_schedule, scheduler.flow_schedule, None
        self.positions: List[torch.Tensor] = []
        self.history: List[torch.Tensor] = []

    def start(self, num_steps: int, start_position: float, num_rows: int, device, mu: Optional[float] = None) -> torch.Tensor:
        """Begin K-step solves at ``start_position`` (``mu``: FLUX's dynamic shift, where the
        schedule uses one); returns the first model times ``[N]``."""
        if self.kind == "flow" and self.flow_schedule.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be given for a flow-matching schedule with use_dynamic_shifting")
        self.K, self.i, self.mu = int(num_steps), 0, mu
        self.positions = [torch.full((num_rows,), float(start_position), dtype=torch.float64, device=device)]
        self.history = []
        self._levels = self.noise_levels(self.positions[0])
        return self.model_time(self.positions[0], self._levels)

    def noise_levels(self, position: torch.Tensor) -> tuple:
        """What the transfer needs at a position, float64 ``[N]`` each: VP ``(a, s)``, flow the
        shifted ``(sigma,)``."""
        if self.kind == "vp":
            return self.vp_schedule.alpha_sigma_continuous(position)
        if self.flow_schedule.use_dynamic_shifting:
            return (time_shift(position, mu=self.mu),)
        return (time_shift(position, self.flow_schedule.shift),)

    def model_time(self, position: torch.Tensor, levels: tuple) -> torch.Tensor:
        """Timesteps ``[N]`` float32 in scheduler units for the backend (VP: the timestep; flow:
        shifted sigma * T)."""
        return position.float() if self.kind == "vp" else (levels[0] * self.T).float()

    def step(self, x: torch.Tensor, model_output: torch.Tensor, coefficients: torch.Tensor,
             logit: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One step of every row: ``x [N, ...]`` and its model output at the current positions,
        ``coefficients [N, order]`` and next-position ``logit [N]`` (ignored at the last step).
        Returns ``(x_next [N, ...], model times [N] at the next positions, None after the last)``."""
        self.history.insert(0, model_output.float())
        del self.history[self.order:]
        p_next = next_position(self.positions[-1], logit, self.end, self.K - self.i, self.min_gap, self.integer,
                               self.last_max)
        d = combine_history(self.history, coefficients)
        levels, self._levels = self._levels, self.noise_levels(p_next)
        transfer = vp_transfer if self.kind == "vp" else flow_transfer
        x_next = transfer(x.float(), d, *levels, *self._levels)
        self.positions.append(p_next)
        self.i += 1
        return x_next, (self.model_time(p_next, self._levels) if self.i < self.K else None)
