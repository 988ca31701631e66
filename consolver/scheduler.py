"""ConsistencySolverScheduler: the learned multistep solver as a diffusers scheduler.

Drop-in for any diffusers pipeline::

    pipe.scheduler = ConsistencySolverScheduler.from_pretrained("outputs/run/scheduler")
    image = pipe(prompt, num_inference_steps=5).images[0]

One step from ``t_i`` to ``t_{i+1}`` blends the last ``solver_order`` model outputs with
coefficients ``w_i`` and transfers (DDIM on a VP schedule, Euler on flow matching); see
:mod:`consolver.solvers`. Coefficients come from, in this order: a learned per-K table in the
config (plain JSON, so ``save_pretrained``/``from_pretrained`` round-trip it), an attached
:class:`~consolver.policy.CoefficientPolicy` acting by its mode (weights saved beside the
config as safetensors), or the fixed ``base_solver`` (DDIM by default) for any K.
Math is float32 inside whatever the model's dtype; the result is cast back.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from consolver.policy import CoefficientPolicy, build_policy, step_observation
from consolver.schedules import FINAL_TIMESTEP, SCHEDULE_KINDS, FlowMatchingSchedule, VPSchedule, _check_choice
from consolver.solvers.grid import choose_grid, flow_grid, off_grid_message, parse_step_grids, vp_grid
from consolver.solvers.lmm import combine_history, flow_transfer, vp_transfer
from consolver.solvers.tables import FIXED_SOLVERS, fixed_table, parse_tables

logger = logging.getLogger(__name__)

POLICY_WEIGHTS_NAME = "policy.safetensors"
VP_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: Options of other diffusers schedulers that change the noise levels or make sampling stochastic.
#: This scheduler does not implement them: a config that turns one on is refused by
#: :meth:`ConsistencySolverScheduler.from_config` instead of being solved on another schedule.
UNSUPPORTED_OPTIONS = ("rescale_betas_zero_snr", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                       "shift_terminal", "invert_sigmas", "stochastic_sampling")


class ConsistencySolverScheduler(SchedulerMixin, ConfigMixin):
    """Generalized linear multistep scheduler with learned coefficients.

    Args:
        num_train_timesteps: training timesteps T of the model.
        beta_start, beta_end, beta_schedule, trained_betas: VP schedule (SD1.5 defaults).
        set_alpha_to_one: VP final step lands on x0 (True) or on ``abar[0]`` (diffusers' False).
        prediction_type: VP model output ``epsilon`` (default) | ``v_prediction`` | ``sample``
            (converted to epsilon inside); ``flow_prediction`` (default) on flow matching.
        timestep_spacing: ``trailing`` | ``leading`` | ``linspace`` (VP).
        steps_offset: added to ``leading`` timesteps (1, as SD configs and pipelines expect).
        schedule: ``vp`` or ``flow``.
        shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len,
            max_image_seq_len: flow-matching sigma shift (FLUX conventions; ``mu`` at
            ``set_timesteps`` when dynamic).
        solver_order: history length m (coefficient row width).
        base_solver: fixed solver when there is no learned table or policy: ``ddim`` (Euler in
            rho for VP, in sigma for flow), ``adams_bashforth`` (variable-step) or ``ipndm``, of
            order ``solver_order``.
        coefficient_tables: learned ``{"K": [[w_0..w_{m-1}] x K]}``.
        policy: ``{"name": ..., "kwargs": {...}}`` of an attached policy (weights in
            ``policy.safetensors``); set by :meth:`attach_policy`.
        step_grids: learned grids ``{"K": [K times]}``: VP integer timesteps, flow *unshifted*
            sigmas. ``set_timesteps(num_inference_steps=K)`` uses K's grid. Explicit ``timesteps``
            or ``sigmas`` override it (logged as a warning), except that the default sigmas every
            FLUX pipeline passes (``linspace(1, 1/K, K)``) are replaced by the learned grid, which
            is then shifted by the pipeline's ``mu`` like any sigmas.
        validation: metadata only: how each K scored at export against the training-free
            solvers, on which world and samples, and what the gate did
            (:mod:`consolver.evaluation.gate`).
    """

    _compatibles = ["DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                    "FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"]
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        set_alpha_to_one: bool = True,
        prediction_type: Optional[str] = None,
        timestep_spacing: str = "trailing",
        steps_offset: int = 1,
        schedule: str = "vp",
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        solver_order: int = 1,
        base_solver: str = "ddim",
        coefficient_tables: Optional[Dict[str, List[List[float]]]] = None,
        policy: Optional[Dict[str, Any]] = None,
        step_grids: Optional[Dict[str, List[float]]] = None,
        validation: Optional[Dict[str, Any]] = None,
    ):
        _check_choice("schedule", schedule, SCHEDULE_KINDS)
        _check_choice("base_solver", base_solver, FIXED_SOLVERS)
        _check_finite_numbers(base_shift=base_shift, max_shift=max_shift)  # the schedules check their own numbers
        if prediction_type is None:  # stored resolved, so diffusers schedulers can load this config too
            prediction_type = "epsilon" if schedule == "vp" else "flow_prediction"
            self.register_to_config(prediction_type=prediction_type)
        if schedule == "vp":
            _check_choice("prediction_type", prediction_type, VP_PREDICTION_TYPES)
            self.vp_schedule: Optional[VPSchedule] = VPSchedule.from_betas(
                beta_schedule, beta_start, beta_end, num_train_timesteps, set_alpha_to_one, trained_betas)
            self.alphas_cumprod = self.vp_schedule.alphas_cumprod.float()
            self.flow_schedule: Optional[FlowMatchingSchedule] = None
        else:
            _check_choice("prediction_type", prediction_type, ("flow_prediction",))
            self.flow_schedule = FlowMatchingSchedule(num_train_timesteps, shift, use_dynamic_shifting)
            self.vp_schedule = None
        if solver_order < 1:
            raise ValueError(f"solver_order must be >= 1, got {solver_order}")
        self._tables = parse_tables(coefficient_tables or {}, self.config.solver_order)
        self._grids = parse_step_grids(step_grids or {}, schedule, num_train_timesteps)
        self.policy_module: Optional[CoefficientPolicy] = None
        if policy is not None:  # weights arrive from from_pretrained or attach_policy
            self.policy_module = build_policy(policy["name"], **policy.get("kwargs", {}))
            if self.policy_module.order != solver_order:  # as attach_policy: tables would have the wrong width
                raise ValueError(f"policy order {self.policy_module.order} != scheduler solver_order {solver_order} "
                                 f"in this scheduler config; they must be equal")
        self.num_inference_steps: Optional[int] = None
        self.timesteps: Optional[torch.Tensor] = None
        self.sigmas: Optional[torch.Tensor] = None
        self._reset_state()

    # ----------------------------------------------------------------- construction helpers
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """As diffusers', and infers ``schedule="flow"`` from a flow-matching scheduler's config
        (e.g. ``FlowMatchEulerDiscreteScheduler`` of a FLUX pipeline) unless given. A config that
        turns on a noise-level option this scheduler lacks (``UNSUPPORTED_OPTIONS``, or a
        ``time_shift_type`` other than ``exponential``) is a ``ValueError``."""
        if config is not None:
            given = dict(config)
            on = [k for k in UNSUPPORTED_OPTIONS if given.get(k)]
            if given.get("time_shift_type") not in (None, "exponential"):
                on.append(f"time_shift_type={given['time_shift_type']!r}")
            if on:
                raise ValueError(f"ConsistencySolverScheduler does not support {', '.join(on)} of this scheduler "
                                 f"config; its noise levels would differ from the model's")
            if "schedule" not in kwargs and "schedule" not in given and _is_flow_config(given):
                kwargs["schedule"] = "flow"
                kwargs.setdefault("prediction_type", "flow_prediction")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def attach_policy(self, policy: Optional[CoefficientPolicy]) -> None:
        """Use ``policy`` (acting by its mode) for every K without a learned table; ``None`` detaches."""
        if policy is not None and policy.order != self.config.solver_order:
            raise ValueError(f"policy order {policy.order} != scheduler solver_order {self.config.solver_order}")
        self.policy_module = policy
        self.register_to_config(policy=None if policy is None else {"name": policy.policy_name, "kwargs": policy.export_kwargs()})

    def set_coefficient_tables(self, tables: Dict[int, Union[np.ndarray, Sequence[Sequence[float]]]]) -> None:
        """Install learned tables ``{K: [K, solver_order]}`` (validated, saved in the config)."""
        checked = parse_tables(tables, self.config.solver_order)
        self._tables = checked
        self.register_to_config(coefficient_tables={str(k): v.tolist() for k, v in sorted(checked.items())})

    def set_step_grids(self, grids: Dict[int, Sequence[float]]) -> None:
        """Install learned grids ``{K: [K times]}`` (VP integer timesteps, flow unshifted sigmas;
        validated, saved in the config)."""
        checked = parse_step_grids(grids, self.config.schedule, self.config.num_train_timesteps)
        self._grids = checked
        as_json = {str(k): [int(v) if self.config.schedule == "vp" else float(v) for v in g]
                   for k, g in sorted(checked.items())}
        self.register_to_config(step_grids=as_json or None)

    @property
    def learned_tables(self) -> Dict[int, np.ndarray]:
        """The learned coefficient tables ``{K: [K, solver_order]}`` float64 (a copy)."""
        return {K: v.copy() for K, v in self._tables.items()}

    @property
    def step_grids(self) -> Dict[int, np.ndarray]:
        """The learned grids ``{K: [K]}`` float64 (empty: every K uses ``timestep_spacing``)."""
        return dict(self._grids)

    def step_positions(self, num_inference_steps: int, sigmas: Optional[Sequence[float]] = None) -> np.ndarray:
        """Grid *positions* ``[K+1]`` float64 of a K-step solve, the units grids are learned in (see
        :mod:`consolver.solvers.grid`): VP timesteps ending at -1, flow unshifted sigmas ending at
        0; K's learned grid if there is one, else the given unshifted ``sigmas`` (flow, e.g. what a
        FLUX pipeline passes), else the configured spacing."""
        K = int(num_inference_steps)
        if K in self._grids:
            times = self._grids[K]
        elif sigmas is not None and self.config.schedule == "flow":
            times = np.asarray(sigmas, dtype=np.float64)
        elif self.config.schedule == "vp":
            times = self._grid(K)[0][:-1]
        else:
            times = self.flow_schedule.unshifted_sigmas(K)
        return np.append(times, FINAL_TIMESTEP if self.config.schedule == "vp" else 0.0).astype(np.float64)

    def compile_policy(self, num_steps: Sequence[int]) -> Dict[int, np.ndarray]:
        """Coefficient tables ``{K: [K, m]}`` of the attached sample-independent policy."""
        if self.policy_module is None or self.policy_module.depends_on_sample:
            raise ValueError("compile_policy needs an attached policy that does not depend on the sample")
        tables = {}
        for K in num_steps:
            times = self._step_times(*self._grid(int(K)))
            tables[int(K)] = self._policy_table(times)
        return tables

    def grid(self, num_inference_steps: int, mu: Optional[float] = None,
             sigmas: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, np.ndarray]:
        """``(grid_t [K+1], grid_ode [K+1])`` float64 of a K-step solve (see :mod:`consolver.solvers.grid`);
        ``sigmas``/``mu`` as :meth:`set_timesteps` takes them."""
        return self._grid(num_inference_steps, sigmas=sigmas, mu=mu)

    def base_table(self, num_inference_steps: int, mu: Optional[float] = None,
                   sigmas: Optional[Sequence[float]] = None) -> np.ndarray:
        """The fixed ``base_solver``'s coefficient table ``[K, solver_order]`` on this K's grid."""
        grid_ode = self.grid(num_inference_steps, mu, sigmas)[1]
        return fixed_table(self.config.base_solver, grid_ode, self.config.solver_order, self.config.solver_order)

    @property
    def available_num_steps(self) -> List[int]:
        """K values with a learned table (empty: any K works with the base solver or policy)."""
        return sorted(self._tables)

    # ----------------------------------------------------------------- diffusers contract
    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[Union[int, torch.Tensor]] = None) -> torch.Tensor:
        return sample

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[Sequence[float]] = None,
        sigmas: Optional[Sequence[float]] = None,
        mu: Optional[float] = None,
    ) -> None:
        """Prepare a K-step solve and reset all per-solve state.

        VP: ``num_inference_steps`` (spaced by ``timestep_spacing``) or descending integer
        ``timesteps``. Flow: ``num_inference_steps``, unshifted ``sigmas`` (shifted here, FLUX
        style, with ``mu`` when ``use_dynamic_shifting``) or final ``timesteps`` (``sigma * T``).
        """
        given = [name for name, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps), ("sigmas", sigmas)) if v is not None]
        if not given:
            raise ValueError("set_timesteps needs num_inference_steps, timesteps or sigmas")
        if num_inference_steps is not None:
            for name, values in (("timesteps", timesteps), ("sigmas", sigmas)):
                if values is not None and len(values) != num_inference_steps:
                    raise ValueError(f"len({name})={len(values)} != num_inference_steps={num_inference_steps}")
        grid_t, grid_ode = self._grid(num_inference_steps, timesteps, sigmas, mu)
        K = len(grid_t) - 1
        self.num_inference_steps = K
        if self.config.schedule == "vp":
            self.timesteps = torch.from_numpy(grid_t[:-1].astype(np.int64)).to(device)
            a, s = self.vp_schedule.alpha_sigma(grid_t)
            self._transfer_scalars = [(float(a[i]), float(s[i]), float(a[i + 1]), float(s[i + 1])) for i in range(K)]
        else:
            self.timesteps = torch.from_numpy(grid_t[:-1]).to(device=device, dtype=torch.float32)
            self._transfer_scalars = [(float(grid_ode[i]), float(grid_ode[i + 1])) for i in range(K)]
        self.sigmas = torch.from_numpy(grid_ode).to(device=device, dtype=torch.float32)
        self._table = self.coefficient_table(grid_t, grid_ode)
        self._observations = None if self._table is not None else self._step_times(grid_t, grid_ode)
        self._reset_state()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, float, torch.Tensor],
        sample: torch.Tensor,
        return_dict: bool = True,
        coefficients: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Union[SchedulerOutput, Tuple[torch.Tensor]]:
        """One solver step ``t_i -> t_{i+1}``.

        Args:
            model_output: ``[B, ...]`` epsilon (or v / x0, converted) on VP; velocity on flow.
            timestep: the current timestep (used only to find the step index on the first call).
            sample: ``x_{t_i}`` ``[B, ...]``.
            coefficients: optional override ``[m]`` or ``[B, m]`` (e.g. RL rollouts).
            generator: accepted and unused (the solver is deterministic), so pipelines that pass
                one to stochastic schedulers (``DDPMPipeline``) can use this scheduler.
        Returns:
            ``x_{t_{i+1}}`` in ``sample``'s dtype.
        """
        if self.num_inference_steps is None:
            raise ValueError("call `set_timesteps` before `step`")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise ValueError(f"all {self.num_inference_steps} steps are taken; call `set_timesteps` to start a new solve")
        x = sample.float()
        d = self._to_solver_output(model_output.float(), x, i)
        self._history.insert(0, d)
        del self._history[self.config.solver_order:]
        if coefficients is None:
            coefficients = self._table[i] if self._table is not None else self._policy_coefficients(i)
        d_mix = combine_history(self._history, coefficients)
        if self.config.schedule == "vp":
            prev = vp_transfer(x, d_mix, *self._transfer_scalars[i])
        else:
            prev = flow_transfer(x, d_mix, *self._transfer_scalars[i])
        self._step_index = i + 1
        prev = prev.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process at ``timesteps`` ``[B]``: VP ``a x0 + s eps``; flow ``(1-s) x0 + s eps``
        (flow timesteps are looked up in the current ``timesteps``)."""
        if self.config.schedule == "vp":
            a, s = self.vp_schedule.alpha_sigma(torch.as_tensor(timesteps).reshape(-1).cpu())
        else:
            if self.timesteps is None:
                raise ValueError("call `set_timesteps` before `add_noise` on a flow-matching schedule")
            idx = [self.index_for_timestep(t) for t in torch.as_tensor(timesteps).reshape(-1)]
            s = self.sigmas.double().cpu()[idx]
            a = 1.0 - s
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = a.to(original_samples.device, torch.float32).reshape(shape)
        s = s.to(original_samples.device, torch.float32).reshape(shape)
        return (a * original_samples.float() + s * noise.float()).to(original_samples.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Flow-matching name of :meth:`add_noise` (``FlowMatchEulerDiscreteScheduler`` API)."""
        return self.add_noise(sample, noise, timestep)

    def index_for_timestep(self, timestep: Union[int, float, torch.Tensor]) -> int:
        t = torch.as_tensor(timestep, device=self.timesteps.device).to(self.timesteps.dtype)
        matches = (self.timesteps == t).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {float(t):g} is not in this solve's timesteps {self.timesteps.tolist()}")
        # as diffusers: the second match when a timestep repeats (image-to-image starts)
        return int(matches[1 if len(matches) > 1 else 0])

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ----------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs) -> None:
        """Config JSON (tables included) and, with an attached policy, ``policy.safetensors``."""
        from safetensors.torch import save_file

        super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        if self.policy_module is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.policy_module.state_dict().items()}
            save_file(state, str(Path(save_directory) / POLICY_WEIGHTS_NAME))
        if push_to_hub:
            self.push_to_hub(str(save_directory), **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder: Optional[str] = None,
                        return_unused_kwargs: bool = False, **kwargs):
        """As diffusers'; also loads the policy weights saved beside the config."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder,
                                         return_unused_kwargs=return_unused_kwargs, **kwargs)
        scheduler = loaded[0] if return_unused_kwargs else loaded
        if scheduler.policy_module is not None:
            from safetensors.torch import load_file

            path = _resolve_file(pretrained_model_name_or_path, subfolder, POLICY_WEIGHTS_NAME, kwargs)
            scheduler.policy_module.load_state_dict(load_file(path))
            scheduler.policy_module.eval()
        return loaded

    # ----------------------------------------------------------------- internals
    def _reset_state(self) -> None:
        self._history: List[torch.Tensor] = []
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None

    def _init_step_index(self, timestep) -> None:
        self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)

    def _grid(self, num_inference_steps=None, timesteps=None, sigmas=None, mu=None) -> Tuple[np.ndarray, np.ndarray]:
        """``(grid_t [K+1], grid_ode [K+1])``, see :mod:`consolver.solvers.grid`."""
        cfg = self.config
        timesteps, sigmas = self._learned_or_given(num_inference_steps, timesteps, sigmas)
        if cfg.schedule == "vp":
            if sigmas is not None:
                raise ValueError("a VP schedule takes `num_inference_steps` or integer `timesteps`, not `sigmas`")
            return vp_grid(self.vp_schedule, num_inference_steps, timesteps, cfg.timestep_spacing, cfg.steps_offset)
        return flow_grid(self.flow_schedule, num_inference_steps, timesteps, sigmas, mu)

    def _learned_or_given(self, num_inference_steps, timesteps, sigmas):
        """``(timesteps, sigmas)`` to solve on (see :func:`~consolver.solvers.grid.choose_grid`)."""
        timesteps, sigmas, overridden = choose_grid(self._grids, self.config.schedule, num_inference_steps, timesteps, sigmas)
        if overridden:
            warnings.warn(off_grid_message("set_timesteps", overridden, self._grids, "scheduler"), stacklevel=3)
        return timesteps, sigmas

    def _step_times(self, grid_t: np.ndarray, grid_ode: np.ndarray) -> torch.Tensor:
        """Policy observations ``[K, 4]`` for every step of the grid."""
        K = len(grid_t) - 1
        return torch.cat([step_observation(grid_t[i], grid_t[i + 1], i, K, self.config.num_train_timesteps) for i in range(K)])

    def coefficient_table(self, grid_t: np.ndarray, grid_ode: np.ndarray) -> Optional[np.ndarray]:
        """The coefficient table ``[K, solver_order]`` float64 of a solve on ``(grid_t, grid_ode)``
        (``[K + 1]`` each, see :mod:`consolver.solvers.grid`): K's learned table, the attached
        policy's compiled on this grid, or the base solver's; ``None`` when the attached policy looks
        at the sample (it acts step by step). ``ValueError`` listing the K values when a learned
        solver has no table for K."""
        K = len(grid_t) - 1
        if self._tables:
            if K not in self._tables:
                raise ValueError(f"no coefficient table for num_inference_steps={K}; this solver has tables for K in {self.available_num_steps}")
            return self._tables[K]
        if self.policy_module is not None:
            return None if self.policy_module.depends_on_sample else self._policy_table(self._step_times(grid_t, grid_ode))
        return fixed_table(self.config.base_solver, grid_ode, self.config.solver_order, self.config.solver_order)

    @torch.no_grad()
    def _policy_table(self, observations: torch.Tensor) -> np.ndarray:
        rows = [self.policy_module.mode(observations[i : i + 1], i + 1)[0] for i in range(len(observations))]
        return torch.stack(rows).double().cpu().numpy()

    @torch.no_grad()
    def _policy_coefficients(self, i: int) -> torch.Tensor:
        observation = self._observations[i : i + 1].to(self._history[0].device)
        return self.policy_module.mode(observation, len(self._history), self._history)

    def _to_solver_output(self, model_output: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        kind = self.config.prediction_type
        if kind in ("epsilon", "flow_prediction"):
            return model_output
        a, s = self._transfer_scalars[i][:2]
        if kind == "v_prediction":  # v = a eps - s x0  =>  eps = s x + a v
            return s * x + a * model_output
        return (x - a * model_output) / s  # sample: x0 given


def _check_finite_numbers(**values: Any) -> None:
    """``ValueError`` naming the first config key whose number is NaN or inf."""
    for key, value in values.items():
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise ValueError(f"scheduler config {key}={value} is not a finite number")


def _is_flow_config(config: Dict[str, Any]) -> bool:
    """Whether another scheduler's config describes a flow-matching model."""
    if str(config.get("_class_name", "")).startswith("FlowMatch"):
        return True
    if config.get("prediction_type") == "flow_prediction" or config.get("use_flow_sigmas"):
        return True
    return "beta_schedule" not in config and ("shift" in config or "use_dynamic_shifting" in config)


def _resolve_file(path_or_id, subfolder: Optional[str], filename: str, kwargs: dict) -> str:
    local = Path(path_or_id) / (subfolder or "") / filename
    if local.is_file():
        return str(local)
    if Path(path_or_id).is_dir():
        raise FileNotFoundError(f"{local} is missing: the scheduler config names a policy but its weights are not saved beside it")
    from huggingface_hub import hf_hub_download

    hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
    return hf_hub_download(str(path_or_id), filename, subfolder=subfolder, **hub_kwargs)


def solver_scheduler(cfg, schedule, prediction_type: Optional[str] = None):
    """The :class:`~consolver.scheduler.ConsistencySolverScheduler` that training steps with and
    export ships: the backend's schedule, ``solver.order``, ``base_solver`` and spacing.

    ``prediction_type`` overrides the schedule's (export of a v-prediction model: backends
    return epsilon, but a pipeline hands the scheduler the model's raw output)."""
    config = schedule.diffusers_config()
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    return ConsistencySolverScheduler(schedule="vp" if isinstance(schedule, VPSchedule) else "flow",
                                      **config, solver_order=int(cfg.solver.order),
                                      base_solver=cfg.solver.base_solver, timestep_spacing=cfg.solver.timestep_spacing)
