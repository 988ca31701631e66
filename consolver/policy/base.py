"""Coefficient policies: small networks that choose the multistep coefficients per step.

The default observation depends only on the step (``t_i``, ``t_{i+1}``, ``i``, ``K``), never on
the sample, so a trained policy compiles into a per-K coefficient table at export and costs
nothing at inference. Policies that look at the sample set ``depends_on_sample = True`` and
receive the model-output history too. At inference a policy acts by its **mode**: previews
are deterministic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Dict, Optional, Sequence, Type

import torch
from torch import nn

from consolver.solvers.lmm import constrained_coefficients

#: Width of :func:`step_observation`.
OBSERVATION_DIM = 4

_REGISTRY: Dict[str, Type["CoefficientPolicy"]] = {}


def register_policy(name: str) -> Callable[[Type["CoefficientPolicy"]], Type["CoefficientPolicy"]]:
    def decorate(cls: Type["CoefficientPolicy"]) -> Type["CoefficientPolicy"]:
        cls.policy_name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def build_policy(name: str, **kwargs) -> "CoefficientPolicy":
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def step_observation(t: torch.Tensor, t_next: torch.Tensor, step_index: int, num_steps: int, num_train_timesteps: int) -> torch.Tensor:
    """Observation ``[B, 4]`` float32: ``(t_i/T, t_{i+1}/T, i/K, 1/K)``.

    ``t`` in scheduler units (VP: integer timestep, the final step is -1; flow: sigma * T), so
    the first two entries are in about [-0.001, 1]; ``t``/``t_next`` are scalars or ``[B]``.
    """
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    t_next = torch.as_tensor(t_next, dtype=torch.float32, device=t.device).reshape(-1)
    t, t_next = torch.broadcast_tensors(t, t_next)
    step = torch.full_like(t, step_index / num_steps)
    return torch.stack([t / num_train_timesteps, t_next / num_train_timesteps, step, torch.full_like(t, 1.0 / num_steps)], -1)


def history_similarity(history: Sequence[torch.Tensor], order: int) -> torch.Tensor:
    """Sample features ``[B, order - 1]``: cosine similarity of the newest model output with each
    older one (history newest first; 0 where the history does not reach)."""
    newest = history[0].flatten(1).float()
    out = newest.new_zeros(newest.shape[0], order - 1)
    for j, older in enumerate(history[1:order]):
        out[:, j] = torch.nn.functional.cosine_similarity(newest, older.flatten(1).float(), dim=1)
    return out


class CoefficientPolicy(nn.Module, ABC):
    """Maps a step observation to coefficients ``[B, order]`` for ``d_i, d_{i-1}, ...``.

    Subclasses implement :meth:`mode_free` (deterministic free coefficients ``[B, order - 1]``,
    the constrained ones are completed so that they sum to 1 over the available history) and
    :meth:`export_kwargs` (constructor arguments, so the scheduler can save and rebuild it).
    """

    policy_name: str = "policy"
    depends_on_sample: bool = False
    implied: str = "oldest"  # which coefficient sum-to-one sets (consolver.solvers.lmm.constrained_coefficients)

    def __init__(self, order: int):
        super().__init__()
        if order < 1:
            raise ValueError(f"policy order must be >= 1, got {order}")
        self.order = int(order)

    @abstractmethod
    def mode_free(self, observation: torch.Tensor, history: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """Free coefficients ``[B, order - 1]`` chosen deterministically (the distribution's mode)."""

    @abstractmethod
    def export_kwargs(self) -> dict:
        """JSON-serialisable constructor arguments."""

    def mode(self, observation: torch.Tensor, num_available: int, history: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """Deterministic coefficients ``[B, order]`` summing to 1 over ``num_available`` entries."""
        return constrained_coefficients(self.mode_free(observation, history), min(num_available, self.order), self.implied)


@register_policy("time_mlp")
class TimeMLPPolicy(CoefficientPolicy):
    """MLP on the step observation; free coefficients ``offset + tanh(out) * scale``.

    ``offset``/``scale`` give each free coefficient its range ``offset +- scale``. The output
    layer starts at zero, so an untrained policy sits at ``offset``, by default DDIM's free
    coefficients ``(1, 0, ...)``: it starts as DDIM (the paper's ranges ``[1, 3]``, ``[-2, 0]``
    put DDIM on their edges, which a tanh never reaches).
    """

    def __init__(self, order: int = 4, hidden: int = 64, offset: Optional[Sequence[float]] = None,
                 scale: Optional[Sequence[float]] = None):
        super().__init__(order)
        free = self.order - 1
        default_offset = [1.0] + [0.0] * max(free - 1, 0)
        self.hidden = int(hidden)
        self.register_buffer("offset", torch.tensor(list(offset) if offset is not None else default_offset[:free], dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(list(scale) if scale is not None else [1.0] * free, dtype=torch.float32))
        self.net = nn.Sequential(nn.Linear(OBSERVATION_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, max(free, 1)))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def mode_free(self, observation, history=None):
        out = torch.tanh(self.net(observation.to(self.offset)))[..., : self.order - 1]
        return self.offset + out * self.scale

    def export_kwargs(self) -> dict:
        return {"order": self.order, "hidden": self.hidden, "offset": self.offset.tolist(), "scale": self.scale.tolist()}
