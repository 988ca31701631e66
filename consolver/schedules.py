"""Noise schedules (VP epsilon-prediction and flow matching) and timestep spacings.

All schedule arithmetic is float64; callers cast the final per-step scalars.

VP:  x_t = a_t x0 + s_t eps,  a_t = sqrt(abar_t),  s_t = sqrt(1 - abar_t),
     lambda_t = log(a_t / s_t),  rho_t = s_t / a_t  (DDIM is Euler in rho).
FM:  x_s = (1 - s) x0 + s eps,  v = eps - x0  (Euler in sigma).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence, Union

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
SCHEDULE_KINDS = ("vp", "flow")

#: Marker timestep for "the end of sampling" on a VP schedule (x0 itself, or abar[0]).
FINAL_TIMESTEP = -1


def _check_choice(kind: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; valid values: {', '.join(choices)}")


def make_betas(
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Betas of a discrete VP schedule, float64 ``[num_train_timesteps]``, each in [0, 1)."""
    _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    _check_num_train_timesteps(num_train_timesteps)
    for key, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not 0.0 <= _finite(key, value) < 1.0:
            raise ValueError(f"{key} must be a number in [0, 1), got {value!r}")
    T = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    # squaredcos_cap_v2 (Nichol & Dhariwal), as diffusers' betas_for_alpha_bar.
    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def _finite(key: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return number


def _check_num_train_timesteps(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"num_train_timesteps must be a positive integer, got {value!r}")


def check_trained_betas(trained_betas, num_train_timesteps: int) -> np.ndarray:
    """``trained_betas`` as float64 ``[num_train_timesteps]``; ``ValueError`` unless it is a flat
    list of exactly ``num_train_timesteps`` finite values in [0, 1)."""
    _check_num_train_timesteps(num_train_timesteps)
    try:
        betas = np.asarray(trained_betas, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"trained_betas must be a flat list of numbers ({err})") from None
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"trained_betas must be a flat, non-empty list of numbers, got shape {betas.shape}")
    bad = np.flatnonzero(~np.isfinite(betas))
    if bad.size:
        raise ValueError(f"trained_betas has non-finite values (NaN or inf) at indices {bad[:5].tolist()}")
    bad = np.flatnonzero((betas < 0) | (betas >= 1))
    if bad.size:
        raise ValueError(f"trained_betas must lie in [0, 1); index {int(bad[0])} is {betas[bad[0]]}")
    if betas.size != num_train_timesteps:
        raise ValueError(f"trained_betas has {betas.size} values but num_train_timesteps={num_train_timesteps}; "
                         f"they must agree (set num_train_timesteps={betas.size})")
    return betas


def vp_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    spacing: str = "trailing",
    steps_offset: int = 0,
) -> np.ndarray:
    """Descending integer timesteps ``[K]`` in ``[0, T-1]``, spaced as diffusers does."""
    _check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    K, T = int(num_inference_steps), int(num_train_timesteps)
    if not 1 <= K <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {K}")
    if spacing == "linspace":
        t = np.linspace(0, T - 1, K).round()[::-1]
    elif spacing == "leading":
        t = (np.arange(0, K) * (T // K)).round()[::-1] + steps_offset
    else:  # trailing
        t = np.round(np.arange(T, 0, -T / K)) - 1
    return t.astype(np.int64).copy()


@dataclass(frozen=True)
class VPSchedule:
    """Discrete variance-preserving schedule (epsilon prediction), e.g. SD1.5.

    ``alphas_cumprod``: float64 ``[T]``; ``final_alphas_cumprod``: abar at the end of sampling
    (1.0 lands exactly on x0; diffusers' ``set_alpha_to_one=False`` uses ``abar[0]``).
    """

    alphas_cumprod: torch.Tensor
    final_alphas_cumprod: float = 1.0
    betas_config: Optional[dict] = None  # how it was built, for diffusers scheduler configs
    kind: ClassVar[str] = "vp"

    @classmethod
    def from_betas(
        cls,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
        set_alpha_to_one: bool = True,
        trained_betas: Optional[Sequence[float]] = None,
    ) -> "VPSchedule":
        if trained_betas is not None:
            betas = torch.from_numpy(check_trained_betas(trained_betas, num_train_timesteps))
            source = {"trained_betas": betas.tolist(), "num_train_timesteps": len(betas)}
        else:
            betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps)
            source = dict(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
                          num_train_timesteps=num_train_timesteps)
        abar = torch.cumprod(1.0 - betas, dim=0)
        return cls(abar, 1.0 if set_alpha_to_one else float(abar[0]), source)

    def diffusers_config(self) -> dict:
        """Keyword arguments that give a diffusers VP scheduler this exact schedule."""
        if self.betas_config is None:
            abar = self.alphas_cumprod
            betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
            config = {"trained_betas": betas.tolist(), "num_train_timesteps": len(betas)}
        else:
            config = dict(self.betas_config)
        config.update(prediction_type="epsilon", set_alpha_to_one=self.final_alphas_cumprod == 1.0)
        return config

    @classmethod
    def sd15(cls, set_alpha_to_one: bool = True) -> "VPSchedule":
        """Stable Diffusion 1.5: scaled_linear 0.00085..0.012, 1000 steps."""
        return cls.from_betas("scaled_linear", 0.00085, 0.012, 1000, set_alpha_to_one)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def timesteps(self, num_inference_steps: int, spacing: str = "trailing", steps_offset: int = 0) -> np.ndarray:
        return vp_timesteps(num_inference_steps, self.num_train_timesteps, spacing, steps_offset)

    def alphas_cumprod_at(self, t: Union[int, Sequence[int], np.ndarray, torch.Tensor]) -> torch.Tensor:
        """abar at integer timesteps (``FINAL_TIMESTEP`` = -1 gives the final value), float64."""
        t = torch.as_tensor(np.asarray(t) if not torch.is_tensor(t) else t.cpu()).long()
        out = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t < 0, torch.full_like(out, self.final_alphas_cumprod), out)

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_t, s_t)`` float64 at integer timesteps, same shape as ``t``."""
        abar = self.alphas_cumprod_at(t)
        return abar.sqrt(), (1.0 - abar).sqrt()

    def alpha_sigma_continuous(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_t, s_t)`` float64 at real timesteps ``t`` in ``[-1, T-1]`` (-1: the final value),
        differentiable in ``t``: log abar interpolated linearly between integer timesteps, so it
        equals :meth:`alpha_sigma` at integers. Learned grids take their gradient from it."""
        t = t.double()
        knots = self._log_abar_knots.to(t.device)
        u = t + 1.0
        index = u.detach().floor().long().clamp(0, len(knots) - 2)
        frac = u - index
        abar = (knots[index] + frac * (knots[index + 1] - knots[index])).exp()
        return abar.sqrt(), (1.0 - abar).clamp(min=0.0).sqrt()

    @functools.cached_property
    def _log_abar_knots(self) -> torch.Tensor:
        """log abar at t = -1 (the final value), 0, ..., T-1: ``[T + 1]`` float64."""
        return torch.cat([self.alphas_cumprod.new_tensor([self.final_alphas_cumprod]), self.alphas_cumprod]).log()

    def rho(self, t) -> torch.Tensor:
        """``s_t / a_t`` (DDIM's ODE time), float64, 0 at a final step onto x0."""
        a, s = self.alpha_sigma(t)
        return s / a

    def lambdas(self, t) -> torch.Tensor:
        """Half log-SNR ``log(a_t / s_t)``, float64 (+inf at a final step onto x0)."""
        a, s = self.alpha_sigma(t)
        return a.log() - s.log()


def time_shift(sigmas: np.ndarray, shift: float = 1.0, mu: Optional[float] = None) -> np.ndarray:
    """Flow-matching sigma shift: static ``shift`` or FLUX-style dynamic ``mu`` (exponential).
    numpy float64, or torch (differentiable) for a tensor."""
    if not torch.is_tensor(sigmas):
        sigmas = np.asarray(sigmas, dtype=np.float64)
    if mu is not None:
        return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flux_mu(
    image_seq_len: int,
    base_image_seq_len: int = 256,
    max_image_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent ``mu`` (linear in the image token count)."""
    m = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return image_seq_len * m + (base_shift - m * base_image_seq_len)


@dataclass(frozen=True)
class FlowMatchingSchedule:
    """Rectified-flow schedule (velocity prediction), e.g. FLUX; sigma in [0, 1]."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    # flux_kontext / toy_edit: the dynamic shift's mu line (FLUX scheduler config keys)
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    kind: ClassVar[str] = "flow"

    def __post_init__(self) -> None:
        _check_num_train_timesteps(self.num_train_timesteps)
        if not _finite("shift", self.shift) > 0:
            raise ValueError(f"flow-matching shift must be > 0, got {self.shift!r}")

    @property
    def sigma_max(self) -> float:
        return 1.0 if self.use_dynamic_shifting else float(time_shift(np.array([1.0]), self.shift)[0])

    @property
    def sigma_min(self) -> float:
        s = np.array([1.0 / self.num_train_timesteps])
        return float(s[0]) if self.use_dynamic_shifting else float(time_shift(s, self.shift)[0])

    def sigmas(self, num_inference_steps: Optional[int] = None, sigmas=None, mu: Optional[float] = None) -> np.ndarray:
        """Descending float64 sigmas ``[K + 1]`` ending in 0, as FlowMatchEulerDiscreteScheduler.

        Either ``num_inference_steps`` (linear in t between the shifted train sigmas) or explicit
        unshifted ``sigmas`` (FLUX pipelines pass ``linspace(1, 1/K, K)``); the shift is then
        applied: dynamic (needs ``mu``) or static ``shift``.
        """
        if sigmas is None:
            if num_inference_steps is None:
                raise ValueError("pass num_inference_steps or sigmas")
            sigmas = self.unshifted_sigmas(num_inference_steps)
        sigmas = np.asarray(sigmas, dtype=np.float64)
        if self.use_dynamic_shifting:
            if mu is None:
                raise ValueError("use_dynamic_shifting=True needs `mu` (see consolver.schedules.flux_mu)")
            sigmas = time_shift(sigmas, mu=mu)
        else:
            sigmas = time_shift(sigmas, self.shift)
        return np.concatenate([sigmas, [0.0]])

    def unshifted_sigmas(self, num_inference_steps: int) -> np.ndarray:
        """The ``K`` sigmas of a ``num_inference_steps`` solve before the shift, float64 descending
        (linear in t between the train sigmas, as FlowMatchEulerDiscreteScheduler)."""
        T = self.num_train_timesteps
        return np.linspace(self.sigma_max * T, self.sigma_min * T, int(num_inference_steps)) / T

    def diffusers_config(self) -> dict:
        """Keyword arguments that give a diffusers flow-matching scheduler this schedule (with
        dynamic shifting also the ``mu`` line, which FLUX pipelines read from the scheduler config)."""
        config = {"num_train_timesteps": self.num_train_timesteps, "shift": self.shift,
                  "use_dynamic_shifting": self.use_dynamic_shifting}
        if self.use_dynamic_shifting:
            config.update(base_shift=self.base_shift, max_shift=self.max_shift,
                          base_image_seq_len=self.base_image_seq_len, max_image_seq_len=self.max_image_seq_len)
        return config

    def mu(self, image_seq_len: int) -> Optional[float]:
        """The dynamic shift ``mu`` for ``image_seq_len`` packed image tokens, as FLUX pipelines
        compute it from the scheduler config (:func:`flux_mu`); ``None`` without dynamic shifting."""
        if not self.use_dynamic_shifting:
            return None
        return flux_mu(int(image_seq_len), self.base_image_seq_len, self.max_image_seq_len, self.base_shift,
                       self.max_shift)

    @staticmethod
    def alpha_sigma(sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 - sigma, sigma)`` float64."""
        s = torch.as_tensor(sigma, dtype=torch.float64)
        return 1.0 - s, s


Schedule = Union[VPSchedule, FlowMatchingSchedule]
