"""FLUX.1-Kontext backend (``backend.name: flux_kontext``): instruction editing with a rectified
flow transformer, from the components of diffusers' ``FluxKontextPipeline``.

Loaded from ``backend.model`` (a local pipeline directory or a hub id; safetensors only):
``FluxTransformer2DModel``, ``AutoencoderKL``, CLIP + T5 text encoders and tokenizers, and the
scheduler config (its flow shift and dynamic-shift line). Everything follows the pipeline:

- latents ``[B, C, h, w]`` (C = 16 for FLUX; ``h = w = 2 * (resolution // 16)``) are packed into
  2x2 patches, ``[B, (h/2)(w/2), 4C]`` (:mod:`consolver.backends.packing`);
- the reference image is VAE-encoded (distribution mode), scaled ``(z - shift_factor) *
  scaling_factor``, packed, and concatenated after the latent tokens along the token axis, with
  its own ids (first id axis 1); the output keeps the latent tokens;
- the transformer takes ``timestep / 1000`` (scheduler timesteps are ``sigma * 1000``) and the
  guidance scale as an embedding (FLUX-dev guidance distillation: one batch, no CFG doubling);
- the schedule is flow matching with the model's dynamic shift: ``mu`` from the packed image
  token count and the scheduler config (:meth:`Backend.schedule_mu`), on FLUX's unshifted sigmas
  ``linspace(1, 1/K, K)`` (:meth:`Backend.timestep_kwargs`).

The reference image is encoded at ``backend.resolution`` (the pipeline with ``height = width =
resolution``, ``max_area = resolution**2`` and ``_auto_resize=False``; at 1024 these are the
pipeline's defaults for a square reference).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from tensordict import TensorDict

from consolver.backends.base import Backend
from consolver.backends.packing import image_ids, pack, unpack
from consolver.schedules import FlowMatchingSchedule

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotAvailableError(OSError):
    """The pipeline named by ``backend.model`` cannot be loaded (no local copy, no network, no safetensors)."""


def not_available(model: str, cause: str) -> ModelNotAvailableError:
    """The error naming the model id and the config key ``backend.model``."""
    if Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        hint = "set the config key backend.model to a directory saved by FluxKontextPipeline.save_pretrained"
    else:
        hint = (f"download it where the Hugging Face Hub is reachable (`hf download {model} --local-dir <dir>`; "
                f"FLUX.1-Kontext-dev is gated: accept its licence first) and set the config key backend.model to "
                f"that local directory")
    return ModelNotAvailableError(f"backend 'flux_kontext' cannot load model {model!r} (config backend.model): "
                                  f"{cause}; {hint}")


def load_pipeline(model: str, dtype: torch.dtype):
    """``FluxKontextPipeline.from_pretrained(model, use_safetensors=True)`` with clear errors."""
    from diffusers import FluxKontextPipeline

    path = Path(model).expanduser()
    if model.startswith((".", "/", "~")) and not path.is_dir():
        raise not_available(model, "no such local directory")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        pipe = FluxKontextPipeline.from_pretrained(str(path) if path.is_dir() else model, dtype=dtype,
                                                   use_safetensors=True, local_files_only=offline)
    except OSError as err:  # missing files, no network, no safetensors (huggingface_hub errors are OSErrors)
        where = "the local directory lacks its files" if path.is_dir() else "it is not in the local Hugging Face cache and the Hub could not be reached"
        raise not_available(model, f"{where} ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe


class FluxKontextBackend(Backend):
    """FLUX.1-Kontext as a frozen ODE right-hand side (see the module docstring).

    Args:
        model: local pipeline directory or hub id (config ``backend.model``).
        resolution: image side in pixels (square), a multiple of ``2 * vae_scale_factor``.
        dtype: ``float32`` | ``float16`` | ``bfloat16`` (config ``backend.dtype``).
        device: ``auto`` (CUDA when available) | ``cpu`` | ``cuda[:N]``.
        max_sequence_length: T5 tokens (config ``backend.flux.max_sequence_length``, 512 as the pipeline).
        pipeline: an already built ``FluxKontextPipeline`` (tests); ``model`` is then only recorded.
    """

    name = "flux_kontext"

    def __init__(self, model: str, resolution: int = 1024, dtype: str = "bfloat16", device: str = "auto",
                 max_sequence_length: int = 512, pipeline=None):
        if dtype not in DTYPES:
            raise ValueError(f"backend.dtype={dtype!r} is not valid; choose one of: {', '.join(DTYPES)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device, self.dtype, self.torch_dtype = torch.device(device), dtype, DTYPES[dtype]
        self.model = str(model)
        self.max_sequence_length = int(max_sequence_length)
        pipe = pipeline if pipeline is not None else load_pipeline(self.model, self.torch_dtype)
        self.pipe = pipe.to(self.device)
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.requires_grad_(False).eval()
        multiple = 2 * pipe.vae_scale_factor
        if resolution % multiple:
            raise ValueError(f"backend.resolution={resolution} must be a multiple of {multiple} (VAE factor x 2x2 packing)")
        self.resolution = int(resolution)
        side = 2 * (self.resolution // multiple)
        self.latent_shape = (pipe.transformer.config.in_channels // 4, side, side)
        self.image_seq_len = (side // 2) ** 2
        sc = pipe.scheduler.config
        self.schedule = FlowMatchingSchedule(
            int(sc.get("num_train_timesteps", 1000)), float(sc.get("shift", 1.0)), bool(sc.get("use_dynamic_shifting", False)),
            float(sc.get("base_shift", 0.5)), float(sc.get("max_shift", 1.15)), int(sc.get("base_image_seq_len", 256)),
            int(sc.get("max_image_seq_len", 4096)))
        logger.info("flux_kontext backend: %s at %dx%d (%d image tokens, mu=%s), %s on %s", self.model, self.resolution,
                    self.resolution, self.image_seq_len, self.schedule_mu(), dtype, self.device)

    @classmethod
    def from_config(cls, cfg) -> "FluxKontextBackend":
        """From a :class:`~consolver.config.BackendConfig` (``cfg.flux`` holds the FLUX options)."""
        if not cfg.model:
            raise ValueError("backend.model must name the FLUX.1-Kontext pipeline (hub id or local directory), "
                             "e.g. black-forest-labs/FLUX.1-Kontext-dev")
        return cls(cfg.model, cfg.resolution, cfg.dtype, cfg.device, cfg.flux.max_sequence_length)

    # ------------------------------------------------------------ Backend protocol

    @torch.no_grad()
    def encode_reference(self, ref_images: torch.Tensor) -> torch.Tensor:
        """Packed reference latents ``[B, (h/2)(w/2), 4C]`` from images ``[B, 3, H, W]`` in [0, 1]
        (resized to ``resolution`` if needed), as the pipeline's ``_encode_vae_image`` + packing."""
        vae = self.pipe.vae
        x = ref_images.to(self.device, torch.float32)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = torch.nn.functional.interpolate(x, size=(self.resolution,) * 2, mode="bicubic", align_corners=False)
        z = vae.encode((x * 2 - 1).to(self.torch_dtype)).latent_dist.mode()
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor
        return pack(z)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], ref_images: Optional[torch.Tensor] = None) -> TensorDict:
        """``TensorDict(prompt_embeds [B, S, D], pooled_prompt_embeds [B, P], ref_tokens [B, L, 4C])``:
        the instructions encoded by CLIP (pooled) and T5, and the reference images ``[B, 3, H, W]``
        in [0, 1] VAE-encoded and packed, once per sample (the env repeats the TensorDict for groups)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if ref_images is None:
            raise ValueError("flux_kontext edits a reference image: pass ref_images (making shards: set "
                             "data.ref_image_column to the JSONL/parquet column of image paths)")
        if ref_images.shape[0] != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {ref_images.shape[0]} reference images")
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=self.device,
                                                    num_images_per_prompt=1,
                                                    max_sequence_length=self.max_sequence_length)
        return TensorDict({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
                           "ref_tokens": self.encode_reference(ref_images)},
                          batch_size=[len(prompts)], device=self.device)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, t, cond: TensorDict, guidance: float) -> torch.Tensor:
        """Velocity ``[B, C, h, w]`` for latents ``x`` at timesteps ``t`` (``sigma * 1000``, scalar or
        ``[B]``), with the guidance embedding ``guidance``; returned in ``x``'s dtype."""
        B, _, h, w = x.shape
        transformer = self.pipe.transformer
        tokens = pack(x.to(self.device, self.torch_dtype))
        ref = cond["ref_tokens"].to(self.device, self.torch_dtype)
        ids = torch.cat([image_ids(h, w, 0, self.device, self.torch_dtype),  # the reference is encoded at the
                         image_ids(h, w, 1, self.device, self.torch_dtype)])  # same resolution (encode_reference)
        embeds = cond["prompt_embeds"].to(self.device, self.torch_dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.torch_dtype)
        timestep = torch.as_tensor(t, device=self.device).reshape(-1).expand(B).to(self.torch_dtype)
        g = None
        if transformer.config.guidance_embeds:
            g = torch.full([1], float(guidance), device=self.device, dtype=torch.float32).expand(B)
        out = transformer(hidden_states=torch.cat([tokens, ref], dim=1), timestep=timestep / 1000, guidance=g,
                          pooled_projections=cond["pooled_prompt_embeds"].to(self.device, self.torch_dtype),
                          encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=ids, return_dict=False)[0]
        return unpack(out[:, : tokens.shape[1]], h, w).to(x.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, resolution, resolution]`` float32 in [0, 1] from latents ``[B, C, h, w]``."""
        vae = self.pipe.vae
        z = latents.to(self.device, self.torch_dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
        return ((image.float() + 1) * 0.5).clamp(0, 1)

    def meta(self) -> dict:
        return {**super().meta(), "model": self.model, "max_sequence_length": self.max_sequence_length}


__all__ = ["FluxKontextBackend", "ModelNotAvailableError", "load_pipeline", "not_available"]
