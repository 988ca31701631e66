"""One step of the generalized linear multistep method (pure functions, no state).

History convention: ``history[j]`` is the model output ``d_{i-j}`` (newest first); a
coefficient row ``w`` of width ``m >= len(history)`` weights them, ``w[..., j] * d_{i-j}``;
columns past the available history are ignored. Per-step scalars (``alpha``, ``sigma``, ...)
are Python floats (one time for the batch) or ``[B]`` tensors (every sample its own time).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

Scalar = Union[float, torch.Tensor]
Coefficients = Union[Sequence[float], torch.Tensor]


def _per_sample(value: Scalar, like: torch.Tensor) -> Scalar:
    """A float stays a float; a ``[B]`` tensor becomes ``[B, 1, ..., 1]`` to broadcast with ``like``."""
    if isinstance(value, torch.Tensor) and value.ndim > 0:
        return value.to(like).reshape(-1, *([1] * (like.ndim - 1)))
    return value


def combine_history(history: Sequence[torch.Tensor], coefficients: Coefficients) -> torch.Tensor:
    """``d~ = sum_j w_j d_{i-j}`` over the history that exists.

    Args:
        history: ``n >= 1`` tensors ``[B, ...]``, newest first.
        coefficients: a row of ``m >= n`` floats shared by the batch, or a tensor ``[m]`` or
            ``[B, m]`` (per-sample coefficients, e.g. RL rollouts).
    Returns:
        ``[B, ...]`` in the dtype of ``history[0]``.
    """
    n = len(history)
    if n == 0:
        raise ValueError("combine_history needs at least one model output")
    if isinstance(coefficients, torch.Tensor):
        if coefficients.shape[-1] < n:
            raise ValueError(f"{coefficients.shape[-1]} coefficients for {n} history entries")
        if coefficients.ndim == 1:
            w = coefficients.to(history[0]).reshape(-1, *([1] * history[0].ndim))
            return (torch.stack(list(history), 0) * w[:n]).sum(0)
        w = coefficients[:, :n].to(history[0])
        stacked = torch.stack(list(history), 1)  # [B, n, ...]
        return (stacked * w.reshape(*w.shape, *([1] * (stacked.ndim - 2)))).sum(1)
    coefficients = [float(c) for c in coefficients]
    if len(coefficients) < n:
        raise ValueError(f"{len(coefficients)} coefficients for {n} history entries")
    out = history[0] if coefficients[0] == 1.0 else history[0] * coefficients[0]
    for w, d in zip(coefficients[1:n], history[1:]):
        if w != 0.0:
            out = out.add(d, alpha=w)
    return out


def vp_transfer(x: torch.Tensor, d: torch.Tensor, alpha: Scalar, sigma: Scalar, alpha_next: Scalar, sigma_next: Scalar) -> torch.Tensor:
    """DDIM transfer: ``x0^ = (x - s d)/a``, ``x' = a' x0^ + s' d`` (d: epsilon), ``[B, ...]``.

    Written as ``x' = (a'/a) x + (s' - a' s / a) d`` (two kernels, same value).
    """
    alpha, sigma = _per_sample(alpha, x), _per_sample(sigma, x)
    alpha_next, sigma_next = _per_sample(alpha_next, x), _per_sample(sigma_next, x)
    ratio = alpha_next / alpha
    if isinstance(ratio, float) and isinstance(sigma, float) and isinstance(sigma_next, float):
        return torch.add(x * ratio, d, alpha=sigma_next - ratio * sigma)
    return x * ratio + d * (sigma_next - ratio * sigma)


def flow_transfer(x: torch.Tensor, v: torch.Tensor, sigma: Scalar, sigma_next: Scalar) -> torch.Tensor:
    """Euler transfer for flow matching: ``x' = x + (s' - s) v``, ``[B, ...]``."""
    step = _per_sample(sigma_next, x) - _per_sample(sigma, x)
    if isinstance(step, float):
        return torch.add(x, v, alpha=step)
    return x + step * v


IMPLIED_COLUMNS = ("oldest", "newest")


def constrained_coefficients(free: torch.Tensor, num_available: int, implied: str = "oldest") -> torch.Tensor:
    """Complete free coefficients under ``sum_j w_j = 1`` over the available history.

    Args:
        free: ``[..., m - 1]`` free coefficients; only the first ``n - 1`` are used.
        num_available: history entries that exist now, ``1 <= n <= m``.
        implied: which coefficient the constraint sets. ``"oldest"`` (the paper's): free column
            j weights ``d_{i-j}``, column ``n - 1`` is ``1 - sum``. ``"newest"``: free column j
            weights ``d_{i-j-1}``, column 0 (the newest output) is ``1 - sum``.
    Returns:
        ``[..., m]`` summing to 1 over the first ``n`` columns, zero beyond them. A constant
        history is then reproduced.
    """
    m = free.shape[-1] + 1
    n = int(num_available)
    if not 1 <= n <= m:
        raise ValueError(f"num_available must be in [1, {m}], got {n}")
    if implied not in IMPLIED_COLUMNS:
        raise ValueError(f"implied must be one of {IMPLIED_COLUMNS}, got {implied!r}")
    w = free.new_zeros(*free.shape[:-1], m)
    used = free[..., : n - 1]
    rest = 1.0 - used.sum(-1)
    if implied == "oldest":
        w[..., : n - 1] = used
        w[..., n - 1] = rest
    else:
        w[..., 1:n] = used
        w[..., 0] = rest
    return w


def free_coefficients(row: torch.Tensor, num_available: int, implied: str = "oldest") -> torch.Tensor:
    """Inverse of :func:`constrained_coefficients`: the free coordinates ``[..., m - 1]`` of a
    full coefficient row ``[..., m]`` (unused free columns are 0)."""
    m = row.shape[-1]
    n = int(num_available)
    if not 1 <= n <= m:
        raise ValueError(f"num_available must be in [1, {m}], got {n}")
    free = row.new_zeros(*row.shape[:-1], m - 1)
    free[..., : n - 1] = row[..., : n - 1] if implied == "oldest" else row[..., 1:n]
    return free
