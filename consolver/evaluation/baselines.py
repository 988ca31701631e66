"""The training-free solvers a learned solver is measured against, built for a backend.

Every baseline spends exactly one model evaluation per step (NFE = K) on the same timestep grid
(``cfg.solver.timestep_spacing``) and lands on x0 at the end:

- ``DDIM``: :class:`~consolver.scheduler.ConsistencySolverScheduler`'s DDIM table (Euler in rho;
  Euler in sigma on flow matching).
- ``DPM-Solver++ 2M``, ``UniPC``: diffusers' multistep schedulers as
  :func:`consolver.sampling.make_scheduler` builds them (order 2, ``final_sigmas_type="zero"``).
- ``DEIS``: diffusers' ``DEISMultistepScheduler`` (log-rho, order 2) configured the same way. It
  has no ``final_sigmas_type`` option and always stops at ``sigma(abar[0])``, which leaves residual
  noise (about 37 dB pixel PSNR at best on the toy), so :class:`DEISToZeroScheduler` sets its last
  sigma to 0, as the others do.
- ``Adams-Bashforth 2 (rho)``: the variable-step AB table of order ``ab_order`` (2 by default, as
  in RL_NOTES) in rho (``(sigma)`` on flow matching); ``iPNDM 4``: constant-step AB weights of order ``min(cfg.solver.order, 4)``.
"""

from __future__ import annotations

from typing import Dict, Optional

from diffusers import DEISMultistepScheduler

from consolver.sampling import make_scheduler
from consolver.schedules import FlowMatchingSchedule


class DEISToZeroScheduler(DEISMultistepScheduler):
    """diffusers' DEIS whose last step lands on x0 (sigma 0) instead of ``sigma(abar[0])``.

    The final step is DEIS's first-order update in its limit ``sigma_t -> 0``, which is DDIM's jump
    to ``x0^ = (x - sigma_s eps) / alpha_s``; diffusers already takes a first-order final step for
    K < 15 (``lower_order_final``), and this does so for every K.
    """

    def set_timesteps(self, num_inference_steps: int, device=None, mu: Optional[float] = None):
        super().set_timesteps(num_inference_steps, device=device, mu=mu)
        self.sigmas[-1] = 0.0

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index == len(self.timesteps) - 1:
            self.lower_order_nums = 0  # first order (the higher-order log-rho integrals are nan at rho = 0)
        return super().step(model_output, timestep, sample, return_dict=return_dict)

    def deis_first_order_update(self, model_output, *args, sample=None, **kwargs):
        if float(self.sigmas[self.step_index + 1]) == 0.0:
            alpha_s, sigma_s = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])
            return (sample - sigma_s * model_output) / alpha_s
        return super().deis_first_order_update(model_output, *args, sample=sample, **kwargs)


def make_deis(schedule, timestep_spacing: str = "trailing", order: int = 2) -> DEISToZeroScheduler:
    """:class:`DEISToZeroScheduler` on ``schedule`` with the options the other diffusers baselines get."""
    kwargs = dict(solver_order=order, timestep_spacing=timestep_spacing)
    if isinstance(schedule, FlowMatchingSchedule):
        if schedule.use_dynamic_shifting:
            raise ValueError("the DEIS baseline needs a static flow shift")
        kwargs.update(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=schedule.shift,
                      num_train_timesteps=schedule.num_train_timesteps)
    else:
        config = schedule.diffusers_config()
        if not config["set_alpha_to_one"]:
            raise ValueError("the DEIS baseline lands on x0; this schedule ends at abar[0] (set_alpha_to_one=False)")
        kwargs.update({k: v for k, v in config.items() if k != "set_alpha_to_one"})
    return DEISToZeroScheduler(**kwargs)


#: Baseline names, in table order.
BASELINES = ("DDIM", "DPM-Solver++ 2M", "UniPC", "DEIS", "Adams-Bashforth 2 (rho)", "iPNDM 4")


def baseline_schedulers(cfg, backend, names=None, ab_order: int = 2, ipndm_order: Optional[int] = None) -> Dict[str, object]:
    """``{name: scheduler}`` of the baselines (``BASELINES``, or the subset ``names``) on
    ``backend.schedule`` with ``cfg.solver.timestep_spacing``.

    ``ab_order`` is the Adams-Bashforth order (2, as RL_NOTES's table); ``ipndm_order`` defaults to
    ``min(cfg.solver.order, 4)``. The two table names carry their actual orders.
    """
    schedule, spacing = backend.schedule, cfg.solver.timestep_spacing
    ipndm_order = min(int(cfg.solver.order), 4) if ipndm_order is None else int(ipndm_order)
    builders = {
        "DDIM": lambda: make_scheduler("ddim", schedule, spacing),
        "DPM-Solver++ 2M": lambda: make_scheduler("dpmsolver++", schedule, spacing, order=2),
        "UniPC": lambda: make_scheduler("unipc", schedule, spacing, order=2),
        "DEIS": lambda: make_deis(schedule, spacing, order=2),
        f"Adams-Bashforth {ab_order} ({'sigma' if isinstance(schedule, FlowMatchingSchedule) else 'rho'})": lambda: make_scheduler("adams_bashforth", schedule, spacing, order=ab_order),
        f"iPNDM {ipndm_order}": lambda: make_scheduler("ipndm", schedule, spacing, order=ipndm_order),
    }
    canonical = dict(zip(BASELINES, builders))  # "Adams-Bashforth 2 (rho)" -> actual name, for selection
    if isinstance(schedule, FlowMatchingSchedule) and schedule.use_dynamic_shifting:
        # diffusers' multistep solvers do not take FLUX's sigmas + mu: only the tables on the pipeline's grid
        for name in ("DPM-Solver++ 2M", "UniPC", "DEIS"):
            if names is not None and any(str(n).lower() and name.lower().startswith(str(n).lower()) for n in names):
                raise ValueError(f"baseline {name!r} cannot follow a dynamically shifted flow schedule (FLUX sigmas and mu)")
            del builders[name]  # "DDIM" is Euler on flow matching
    if names is None:
        selected = list(builders)
    else:
        selected = []
        for name in names:
            key = canonical.get(name, name)
            if key not in builders:
                matches = [k for k in builders if k.lower().startswith(str(name).lower())]
                if len(matches) != 1:
                    raise ValueError(f"unknown baseline {name!r}; valid baselines: {', '.join(builders)}")
                key = matches[0]
            selected.append(key)
    return {name: builders[name]() for name in dict.fromkeys(selected)}


__all__ = ["BASELINES", "DEISToZeroScheduler", "baseline_schedulers", "make_deis"]
