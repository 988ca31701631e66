"""The Reward protocol, the registry that maps config names to rewards, and composites.

A reward compares a preview with its full-step target, batched on the device:
``forward(preview [B,3,H,W] in [0,1], target [B,3,H,W] in [0,1]) -> [B]`` (higher is better).
It splits into ``features(target)`` (target side, cacheable in shards so the target is never
re-encoded during training) and ``score(preview, target_features)``.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from typing import Callable, Dict, Mapping, Optional, Sequence, Type

import torch
from torch import nn

logger = logging.getLogger(__name__)

_REGISTRY: Dict[str, Type["Reward"]] = {}


def register_reward(name: str) -> Callable[[Type["Reward"]], Type["Reward"]]:
    """Class decorator: make a reward buildable by its config name."""

    def decorate(cls: Type["Reward"]) -> Type["Reward"]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"reward name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered_rewards() -> list[str]:
    _import_builtin_rewards()
    return sorted(_REGISTRY)


def build_reward(name: str, **kwargs) -> "Reward":
    """Instantiate the reward registered as ``name`` with its options."""
    _import_builtin_rewards()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def _import_builtin_rewards() -> None:
    # Built-in rewards register themselves on import; importing lazily keeps heavy
    # dependencies (transformers, smp) out of processes that never build them.
    import importlib

    for module in ("pixel", "toy", "depth", "segformer", "clip", "dino", "toy_dino"):
        try:
            importlib.import_module(f"consolver.rewards.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"consolver.rewards.{module}":
                raise


class Reward(nn.Module, ABC):
    """A frozen similarity model; always in eval mode, no parameter requires grad."""

    name: str = "reward"

    def freeze(self) -> "Reward":
        """Call at the end of ``__init__``: eval mode, no grads."""
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "Reward":  # noqa: D102 - rewards never train
        return super().train(False)

    @abstractmethod
    def features(self, target: torch.Tensor) -> torch.Tensor:
        """Target-side features ``[B, ...]`` from images ``[B, 3, H, W]`` in [0, 1]."""

    @abstractmethod
    def score(self, preview: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        """Rewards ``[B]`` of previews ``[B, 3, H, W]`` in [0, 1] against cached target features."""

    def forward(self, preview: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.score(preview, self.features(target))


class CompositeReward(Reward):
    """Weighted sum of named rewards; features are a dict ``{name: [B, ...]}``."""

    name = "composite"

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float]):
        super().__init__()
        if set(rewards) != set(weights):
            raise ValueError(f"weights {sorted(weights)} do not match rewards {sorted(rewards)}")
        self.rewards = nn.ModuleDict(dict(rewards))
        self.weights = dict(weights)
        self.freeze()

    def features(self, target: torch.Tensor) -> Dict[str, torch.Tensor]:  # type: ignore[override]
        return {name: reward.features(target) for name, reward in self.rewards.items()}

    def score(self, preview: torch.Tensor, target_features: Mapping[str, torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        total: Optional[torch.Tensor] = None
        for name, reward in self.rewards.items():
            part = self.weights[name] * reward.score(preview, target_features[name])
            total = part if total is None else total + part
        return total


def build_rewards(specs: Sequence[Mapping]) -> Reward:
    """A reward from config entries ``[{name, weight, **options}]``: the single reward itself
    when one is given with weight 1, else a :class:`CompositeReward`."""
    if not specs:
        raise ValueError("no reward configured; set `rewards` (valid: " + ", ".join(registered_rewards()) + ")")
    rewards, weights = {}, {}
    for i, spec in enumerate(specs):
        spec = dict(spec)
        name, weight = spec.pop("name"), float(spec.pop("weight", 1.0))
        if name in rewards:
            raise ValueError(f"reward {name!r} is configured twice")
        if not math.isfinite(weight):
            raise ValueError(f"rewards[{i}].weight={weight} is not a finite number")
        try:
            rewards[name] = build_reward(name, **{k: v for k, v in spec.items() if v is not None})
        except (ValueError, TypeError) as err:  # name the config entry (bad option or value)
            raise (TypeError if isinstance(err, TypeError) else ValueError)(f"rewards[{i}] ({name}): {err}") from None
        weights[name] = weight
    if len(rewards) == 1 and next(iter(weights.values())) == 1.0:
        return next(iter(rewards.values()))
    return CompositeReward(rewards, weights)
