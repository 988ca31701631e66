"""Stable Diffusion 1.5 (and other SD1.x/2.x-shaped text-to-image pipelines) as a backend.

Components are diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL`` and transformers'
CLIP text encoder and tokenizer, loaded from ``backend.model``: a local pipeline directory
(``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` as ``save_pretrained``
writes them) or a hub id, from safetensors only (see :mod:`consolver.backends.model_source`).

- **Schedule**: a :class:`~consolver.schedules.VPSchedule` from the pipeline scheduler's betas
  (SD1.5: ``scaled_linear`` 0.00085..0.012, 1000 steps), ending on x0 (``set_alpha_to_one``).
  The UNet predicts ``epsilon`` or ``v_prediction`` (the scheduler config's ``prediction_type``);
  :meth:`SD15Backend.predict` always returns epsilon (the VP contract of
  :class:`~consolver.backends.base.Backend`): ``eps = s_t x + a_t v`` for v-prediction models.
  Export writes the model's own prediction type into the scheduler, so a pipeline that passes
  the UNet's raw output gets the same solve.
- **Guidance**: unconditional and conditional branches in one doubled UNet batch. The
  unconditional embedding (the empty prompt) is encoded once, when the backend is built.
- **Precision** (``backend.dtype``): UNet, VAE and text encoder weights in float32, float16 or
  bfloat16; ``predict`` and ``decode`` return float32, so the solver's math stays float32.
- **Memory**: ``decode`` runs the VAE on ``backend.decode_chunk`` latents at a time.
- **Latents**: ``[4, H/8, W/8]`` for SD1.5 (4x64x64 at 512 px), scaled by the VAE's
  ``scaling_factor`` (the UNet sees ``scaling_factor * vae_latent``, as in the pipeline).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional, Sequence

import torch
from tensordict import TensorDict

from consolver.backends.base import Backend, apply_guidance, decode_in_chunks
from consolver.backends.timesteps import epsilon_from, vp_model_timesteps
from consolver.backends.model_source import BackendModelNotFoundError, is_offline, not_found, resolve_model
from consolver.schedules import VPSchedule

logger = logging.getLogger(__name__)

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Scheduler options that change the noise levels; refused rather than silently ignored.
UNSUPPORTED_SCHEDULER_OPTIONS = ("rescale_betas_zero_snr", "use_karras_sigmas", "use_exponential_sigmas",
                                 "use_beta_sigmas")


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def schedule_from_config(config: dict, model: str = "?", backend: str = "sd15",
                         prediction_types: Sequence[str] = PREDICTION_TYPES) -> tuple[VPSchedule, str]:
    """``(VPSchedule, prediction_type)`` from a diffusers VP scheduler config (a pipeline's
    ``scheduler/scheduler_config.json``), with diffusers' defaults for missing keys. The
    schedule ends on x0 whatever the config's ``set_alpha_to_one``: the learned solver's last
    step lands on the clean latent, as in training and export."""
    on = [k for k in UNSUPPORTED_SCHEDULER_OPTIONS if config.get(k)]
    if on:
        raise ValueError(f"the scheduler config of {model!r} turns on {', '.join(on)}, which the {backend} backend does not "
                         f"support (its noise levels would differ from the plain beta schedule)")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in prediction_types:
        raise ValueError(f"the scheduler config of {model!r} has prediction_type={prediction_type!r}; the {backend} "
                         f"backend supports {', '.join(prediction_types)}")
    schedule = VPSchedule.from_betas(
        beta_schedule=config.get("beta_schedule", "linear"), beta_start=float(config.get("beta_start", 0.0001)),
        beta_end=float(config.get("beta_end", 0.02)), num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        set_alpha_to_one=True, trained_betas=config.get("trained_betas"))
    return schedule, prediction_type


def load_components(model: str, dtype: torch.dtype, backend: str = "sd15") -> dict[str, Any]:
    """``{"unet", "vae", "text_encoder", "tokenizer", "scheduler_config", "source"}`` of ``model``
    (weights in ``dtype``, on the CPU, frozen, eval mode). Raises
    :class:`~consolver.backends.model_source.BackendModelNotFoundError` naming ``backend.model``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_model(model, backend, SUBFOLDERS)
    local = {"local_files_only": is_offline()}
    try:
        scheduler_config = dict(DDIMScheduler.load_config(source, subfolder="scheduler", **local))
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **local)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype,
                                                     use_safetensors=True, **local)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, use_safetensors=True, **local)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, use_safetensors=True,
                                                    **local)
    except BackendModelNotFoundError:
        raise
    except OSError as err:  # huggingface_hub's LocalEntryNotFoundError, diffusers' EnvironmentError, ...
        raise not_found(source, backend, err) from err
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler_config": scheduler_config, "source": source}


class SD15Backend(Backend):
    """A frozen SD1.5-shaped latent diffusion model (see the module docstring).

    Args:
        model: hub id or local pipeline directory (config ``backend.model``).
        resolution: image side in pixels (512 for SD1.5); a multiple of the VAE's downsampling.
        dtype: ``"float32"`` | ``"float16"`` | ``"bfloat16"``: the precision of the weights.
        device: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"cuda:N"``.
        decode_chunk: latents per VAE decode call.
        components: prebuilt :func:`load_components` output instead of loading ``model``.
    """

    name = "sd15"
    #: ``predict`` refuses non-integer timesteps (the UNet was trained on integers); ``False`` only
    #: for finite-difference checks of d(model)/dt at real t.
    integer_timesteps = True

    def __init__(self, model: str, resolution: int = 512, dtype: str = "float32", device: str | torch.device = "auto",
                 decode_chunk: int = 8, components: Optional[dict[str, Any]] = None):
        if dtype not in DTYPES:
            raise ValueError(f"backend.dtype={dtype!r} is not valid; choose one of: {', '.join(DTYPES)}")
        if decode_chunk < 1:
            raise ValueError(f"backend.decode_chunk must be >= 1, got {decode_chunk}")
        self.model = str(model)
        self.dtype = dtype
        self.torch_dtype = DTYPES[dtype]
        self.device = resolve_device(device)
        self.decode_chunk = int(decode_chunk)
        parts = components if components is not None else load_components(self.model, self.torch_dtype, self.name)
        self.unet = parts["unet"].to(self.device)
        self.vae = parts["vae"].to(self.device)
        self.text_encoder = parts["text_encoder"].to(self.device)
        self.tokenizer = parts["tokenizer"]
        self.schedule, self.model_prediction_type = schedule_from_config(parts["scheduler_config"], self.model)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = int(resolution)
        if self.resolution % self.vae_scale_factor:
            raise ValueError(f"backend.resolution={self.resolution} must be a multiple of the VAE's downsampling factor "
                             f"{self.vae_scale_factor}")
        side = self.resolution // self.vae_scale_factor
        self.latent_shape = (int(self.unet.config.in_channels), side, side)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        if self.device.type == "cpu" and self.torch_dtype == torch.float16:
            warnings.warn("sd15 backend: float16 weights on the CPU are slow; use backend.dtype=float32 or bfloat16 "
                          "there, float16 on a GPU", stacklevel=2)
        self._uncond = self._embed([""])  # [1, L, D]: the unconditional branch, encoded once
        logger.info("sd15 backend: %s, %d px (latents %s), %s on %s, %s model, decode chunks of %d", self.model,
                    self.resolution, self.latent_shape, self.dtype, self.device, self.model_prediction_type,
                    self.decode_chunk)

    @classmethod
    def from_config(cls, cfg) -> "SD15Backend":
        """From a :class:`~consolver.config.BackendConfig` (``model``, ``resolution``, ``dtype``,
        ``device``, ``decode_chunk``)."""
        return cls(model=cfg.model, resolution=cfg.resolution, dtype=cfg.dtype, device=cfg.device,
                   decode_chunk=cfg.decode_chunk)

    # ------------------------------------------------------------ text

    @torch.no_grad()
    def _embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP hidden states ``[B, L, D]`` (weights' dtype) of ``prompts``, padded to the
        tokenizer's ``model_max_length`` and truncated, as ``StableDiffusionPipeline.encode_prompt``."""
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        return self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]

    def encode(self, prompts: Sequence[str], ref_images: Optional[torch.Tensor] = None) -> TensorDict:
        """``TensorDict(prompt_embeds=[B, L, D], batch_size=[B])`` on the device, one text-encoder
        call for the whole batch (the environment repeats it for a group's rollouts)."""
        if ref_images is not None:
            raise ValueError("the sd15 backend is text-to-image; it takes no reference images (data.ref_image_column)")
        if isinstance(prompts, str):
            prompts = [prompts]
        self.check_prompts(prompts)
        embeds = self._embed(prompts)
        return TensorDict({"prompt_embeds": embeds}, batch_size=[len(prompts)], device=self.device)

    # ------------------------------------------------------------ the model

    def predict(self, x: torch.Tensor, t, cond: TensorDict, guidance: float) -> torch.Tensor:
        """Guided epsilon for latents ``x [B, 4, h, w]`` at timesteps ``t`` (scalar or ``[B]``, integer
        values; a float tensor that requires grad passes its gradient through the UNet's time
        embedding and the v -> epsilon conversion, for learned step grids).

        One UNet call on the doubled batch ``[uncond; cond]`` (only the conditional half when
        ``guidance == 1``), in the weights' dtype; guidance and the v -> epsilon conversion in
        float32. Returns ``[B, 4, h, w]`` in ``x``'s dtype (at least float32)."""
        B = x.shape[0]
        embeds = cond["prompt_embeds"].to(self.device)
        if embeds.shape[0] != B:
            raise ValueError(f"cond has batch {embeds.shape[0]} but x has batch {B}")
        steps = vp_model_timesteps(t, B, self.schedule.num_train_timesteps, self.device,
                                   self.integer_timesteps)  # float, keeps t's grad
        sample = x.to(self.device, self.torch_dtype)
        if guidance != 1.0:
            sample = torch.cat([sample, sample])
            embeds = torch.cat([self._uncond.expand(B, -1, -1), embeds])
            steps = torch.cat([steps, steps])
        out = self.unet(sample, steps, encoder_hidden_states=embeds.to(self.torch_dtype), return_dict=False)[0].float()
        if guidance != 1.0:
            out = apply_guidance(out[:B], out[B:], guidance)
        out = epsilon_from(self.model_prediction_type, out, x, steps[:B], self.schedule)
        return out.to(torch.promote_types(x.dtype, torch.float32))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, resolution, resolution]`` float32 in [0, 1] from latents ``[B, 4, h, w]``,
        ``backend.decode_chunk`` at a time (differentiable: no ``no_grad`` inside)."""
        def decode_chunk(chunk: torch.Tensor) -> torch.Tensor:
            z = chunk.to(self.device, self.torch_dtype) / self.scaling_factor + self.shift_factor
            return self.vae.decode(z, return_dict=False)[0].float()

        return decode_in_chunks(latents, self.decode_chunk, decode_chunk, self.resolution)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, 4, h, w]`` float32 (posterior means, scaled) of images ``[B, 3, H, W]`` in [0, 1]."""
        z = self.vae.encode((images.to(self.device, self.torch_dtype) * 2 - 1)).latent_dist.mean.float()
        return (z - self.shift_factor) * self.scaling_factor


__all__ = ["PREDICTION_TYPES", "SD15Backend", "load_components", "resolve_device", "schedule_from_config"]
