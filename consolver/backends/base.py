"""The Backend protocol: a frozen pretrained diffusion model seen as an ODE right-hand side.

A backend encodes prompts (and reference images for editing models) once, predicts the
model output ``d`` (epsilon on a VP schedule, velocity on a flow-matching schedule) with
classifier-free guidance computed in one doubled batch, and decodes latents to images.

Timestep units are the scheduler's: on a VP schedule the discrete training timestep in
``[0, T)``; on a flow-matching schedule ``sigma * num_train_timesteps``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence

import numpy as np
import torch
from tensordict import TensorDict

from consolver.schedules import Schedule


def apply_guidance(unconditional: torch.Tensor, conditional: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance ``u + g (c - u)``; ``g = 1`` returns the conditional output."""
    if guidance == 1.0:
        return conditional
    return unconditional + guidance * (conditional - unconditional)


def decode_in_chunks(latents: torch.Tensor, chunk: int, decode_chunk, resolution: int) -> torch.Tensor:
    """Images ``[B, 3, resolution, resolution]`` in [0, 1]: ``decode_chunk`` (latents -> images in
    [-1, 1], float32) on ``chunk`` latents at a time, so peak decode memory is bounded by ``chunk``."""
    images = [(decode_chunk(c) * 0.5 + 0.5).clamp(0, 1) for c in latents.split(chunk)]
    return torch.cat(images) if images else latents.new_zeros(0, 3, resolution, resolution)


class Backend(ABC):
    """A pretrained text-to-image (or editing) diffusion model, frozen.

    Attributes:
        name: registry name (config ``backend.name``), e.g. ``"toy"``, ``"sd15"``.
        schedule: the model's :class:`~consolver.schedules.VPSchedule` or
            :class:`~consolver.schedules.FlowMatchingSchedule`.
        latent_shape: per-sample latent shape ``(C, H, W)``.
        resolution: decoded image side in pixels.
        dtype: the precision the model really computes in (config ``backend.dtype`` where the
            backend honours it); recorded in shard meta.
        image_seq_len: packed image tokens of one latent (FLUX-style backends with a dynamically
            shifted schedule; :meth:`schedule_mu` reads it), else absent.
    """

    name: str
    schedule: Schedule
    latent_shape: tuple[int, ...]
    resolution: int
    device: torch.device = torch.device("cpu")
    dtype: str = "float32"

    @property
    def prediction_type(self) -> str:
        """``"epsilon"`` on a VP schedule, ``"flow_prediction"`` on a flow-matching one."""
        return "epsilon" if self.schedule.kind == "vp" else "flow_prediction"

    @abstractmethod
    def encode(self, prompts: Sequence[str], ref_images: Optional[torch.Tensor] = None) -> TensorDict:
        """Conditioning for ``B`` prompts (and ``[B, 3, H, W]`` reference images in [0, 1] for
        editing backends), as a TensorDict with ``batch_size=[B]`` on the backend's device, so it
        can be indexed, repeated for groups of rollouts and moved like any tensor."""

    @abstractmethod
    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: TensorDict, guidance: float) -> torch.Tensor:
        """Model output ``d`` for latents ``x [B, *latent_shape]`` at timesteps ``t`` (scalar or
        ``[B]``, scheduler units), with guidance scale ``guidance`` (1 = no guidance). Same shape
        as ``x``; the unconditional and conditional branches run as one doubled batch."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, resolution, resolution]`` in [0, 1] from latents ``[B, *latent_shape]``."""

    def schedule_mu(self) -> Optional[float]:
        """The dynamic-shift ``mu`` of this backend's flow-matching schedule at its latent size, as
        FLUX pipelines compute it from the packed image token count (``image_seq_len``) and the
        scheduler config; ``None`` on a VP or statically shifted schedule."""
        if self.schedule.kind != "flow" or not self.schedule.use_dynamic_shifting:
            return None
        seq_len = getattr(self, "image_seq_len", None)
        if seq_len is None:
            raise ValueError(f"backend {self.name!r} has a dynamically shifted schedule but no image_seq_len")
        return self.schedule.mu(seq_len)

    def timestep_kwargs(self, num_steps: int) -> dict:
        """Keyword arguments (besides ``num_inference_steps``) of ``scheduler.set_timesteps`` for a
        K-step solve, exactly as the model's own pipeline passes them, so that training, targets and
        an exported scheduler inside that pipeline share one grid: ``{}`` by default; with dynamic
        shifting FLUX pipelines' unshifted ``sigmas = linspace(1, 1/K, K)`` and ``mu``."""
        mu = self.schedule_mu()
        if mu is None:
            return {}
        K = int(num_steps)
        return {"sigmas": np.linspace(1.0, 1.0 / K, K), "mu": mu}

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raise ``ValueError`` for a prompt this backend cannot encode, cheaply and without
        encoding (``make_shards`` checks the whole prompt list before it writes anything)."""
        for n, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt {n} is empty")

    def meta(self) -> dict:
        """What identifies this backend's outputs (written into shards, checked when reading)."""
        return {
            "backend": self.name,
            "schedule": self.schedule.kind,
            "prediction_type": self.prediction_type,
            "resolution": self.resolution,
            "latent_shape": list(self.latent_shape),
        }

    @classmethod
    def config_meta(cls, cfg) -> dict:
        """The part of :meth:`meta` that the config (a :class:`~consolver.config.BackendConfig`)
        determines without building the backend (used to check shards when no backend is built).
        Backends whose config determines more override this."""
        return {"backend": cfg.name, "resolution": int(cfg.resolution)}


def timestep_kwargs(backend, num_steps: int) -> dict:
    """``backend.timestep_kwargs(num_steps)``, or ``{}`` for a backend-like object without it."""
    method = getattr(backend, "timestep_kwargs", None)
    return dict(method(num_steps)) if callable(method) else {}
