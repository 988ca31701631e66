"""Timesteps as a VP denoiser's time embedding receives them: float, on the model's device, and
carrying the caller's gradient.

Learned step grids (:mod:`consolver.solvers.grid`) are fitted by gradient through their
straight-through rounded positions, so ``d(model output)/dt`` must reach them: a backend passes
``t`` to the model as a float tensor and never detaches it or casts it to an integer. The values
are still checked to be the integer timesteps the model was trained on (the straight-through
rounding keeps them integers).
"""

from __future__ import annotations

import torch


def vp_model_timesteps(t, batch: int, num_train_timesteps: int, device: torch.device,
                       integer: bool = True) -> torch.Tensor:
    """Timesteps ``[batch]`` float32 on ``device`` from ``t`` (a number, a scalar tensor or ``[batch]``;
    integer values in ``[0, T-1]``, scheduler units), differentiable in ``t`` when it is a float
    tensor that requires grad. ``ValueError`` for a wrong shape or a value outside the integers of
    ``[0, T-1]`` (checked on a detached copy). ``integer=False`` admits real values in ``[0, T-1]``
    (a backend's ``integer_timesteps = False``: finite-difference checks of ``d(model)/dt``)."""
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    t = t.reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timesteps must be a scalar or [B={batch}], got shape {tuple(t.shape)}")
    values = t.detach().to("cpu", torch.float64)
    T = int(num_train_timesteps)
    off_grid = (values != values.round()) if integer else torch.zeros_like(values, dtype=torch.bool)
    if bool(((values < 0) | (values > T - 1) | off_grid).any()):
        kind = "integers" if integer else "values"
        raise ValueError(f"VP timesteps must be {kind} in [0, {T - 1}], got {values.tolist()}")
    return t.to(device, torch.float32)


def epsilon_from(prediction_type: str, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, schedule) -> torch.Tensor:
    """Epsilon ``[B, ...]`` float32 from a VP model's raw output ``out`` of ``prediction_type``
    (``epsilon`` | ``v_prediction`` | ``sample``) for latents ``x`` at timesteps ``t [B]`` (float,
    possibly requiring grad): ``v = a eps - s x0`` gives ``eps = s x + a v``; ``x0`` gives
    ``eps = (x - a x0) / s``. The noise levels come from
    :meth:`~consolver.schedules.VPSchedule.alpha_sigma_continuous`, equal to the schedule's own at
    integer ``t`` and differentiable in ``t``."""
    if prediction_type == "epsilon":
        return out
    a, s = schedule.alpha_sigma_continuous(t)
    shape = (out.shape[0],) + (1,) * (out.dim() - 1)
    a, s = a.to(out.device, torch.float32).reshape(shape), s.to(out.device, torch.float32).reshape(shape)
    x = x.to(out.device, torch.float32)
    if prediction_type == "v_prediction":
        return s * x + a * out
    if prediction_type == "sample":
        return (x - a * out) / s
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: epsilon, v_prediction, sample")


__all__ = ["epsilon_from", "vp_model_timesteps"]
