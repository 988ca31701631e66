"""Any diffusers image model that is a UNet2DModel or a DiT, as a backend (``backend.name: diffusers``).

Expected pipeline directory (``backend.model``: the directory, or a hub id with the same files;
weights from ``*.safetensors`` only)::

    <model>/
      model_index.json       {"_class_name": "DDPMPipeline" | "LDMPipeline" | "DiTPipeline" | ...,
                              "unet": ["diffusers", "UNet2DModel"]            (or)
                              "transformer": ["diffusers", "DiTTransformer2DModel"],
                              "vae": ["diffusers", "AutoencoderKL"]          (or "vqvae": [.., "VQModel"]),
                              "scheduler": ["diffusers", "DDPMScheduler"],   (any VP scheduler)
                              "id2label": {"0": "name, synonym, ...", ...}  (optional: class names)
                              "labels": {"name": 0, ...}}                    (optional: class names)
      unet/ | transformer/   config.json + diffusion_pytorch_model.safetensors
      vae/ | vqvae/          latent models only: config.json + diffusion_pytorch_model.safetensors
      scheduler/             scheduler_config.json: betas, num_train_timesteps, prediction_type

``model_index.json`` decides the classes (without it, each subfolder's ``config.json``
``_class_name`` does). A class-conditional UNet2DModel pipeline is exactly what
``DDPMPipeline(unet, scheduler).save_pretrained(dir)`` writes, with ``id2label`` added to its
``model_index.json`` for class names (e.g. a DDPMScheduler with SD1.5's ``scaled_linear``
0.00085..0.012 betas; its UNet has ``num_class_embeds`` rows, the last one the null class).

Models:

- ``UNet2DModel`` in pixel space (``google/ddpm-cifar10-32``): unconditional, or class-conditional
  (``num_class_embeds``; ``class_labels`` passed as the pipeline would).
- ``UNet2DModel`` + ``VQModel`` / ``AutoencoderKL`` (``CompVis/ldm-celebahq-256``): latents
  decoded as ``LDMPipeline`` does (``latents / scaling_factor``, VQ quantisation inside decode).
- ``DiTTransformer2DModel`` (or a legacy ``Transformer2DModel`` with ``ada_norm_zero``) + VAE
  (``facebook/DiT-XL-2-256``): class-conditional, learned-sigma output of which the first
  ``in_channels`` channels (epsilon) are used, as ``DiTPipeline`` does.

Conditions are class names or ids (see :mod:`consolver.backends.class_labels`); ``none`` is the
unconditional condition. Guidance is one doubled batch, as the family's pipeline does it: DiT
``[cond; null]``, UNet2DModel ``[null; cond]``, with the null class ``backend.null_class``
(default: DiT ``num_classes``, i.e. 1000 for ImageNet as ``DiTPipeline`` hard-codes; a
class-conditional UNet2DModel ``num_class_embeds - 1``). An unconditional model ignores guidance
(one warning).

Schedule: a :class:`~consolver.schedules.VPSchedule` from the scheduler config's betas (ending
on x0). The model predicts ``epsilon``, ``v_prediction`` or ``sample`` (config
``prediction_type``); :meth:`DiffusersModelBackend.predict` returns epsilon, and export writes
the model's own prediction type into the scheduler. Timesteps reach the model's time embedding
as float tensors carrying the caller's gradient (learned step grids).

Precision, memory and device: ``backend.dtype`` (weights), ``backend.decode_chunk`` (latents per
decode call), ``backend.device``; ``predict`` and ``decode`` return float32. Pixel-space models
"decode" by mapping [-1, 1] to [0, 1].
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tensordict import TensorDict

from consolver.backends.base import Backend, apply_guidance, decode_in_chunks
from consolver.backends.class_labels import ClassConditions, first_names, label_map
from consolver.backends.model_source import BackendModelNotFoundError, is_offline, not_found, resolve_model
from consolver.backends.sd15 import DTYPES, resolve_device, schedule_from_config
from consolver.backends.timesteps import epsilon_from, vp_model_timesteps

logger = logging.getLogger(__name__)

NAME = "diffusers"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: denoiser class name -> family; ``Transformer2DModel`` is diffusers' legacy name of DiT.
DENOISERS = {"UNet2DModel": "unet", "DiTTransformer2DModel": "dit", "Transformer2DModel": "dit"}
AUTOENCODERS = ("AutoencoderKL", "VQModel")
DENOISER_FOLDERS = ("unet", "transformer")
AUTOENCODER_FOLDERS = ("vae", "vqvae")
#: scheduler options the ODE solver does not reproduce (logged, not refused: they shape sampling, not the ODE).
IGNORED_SAMPLER_OPTIONS = ("clip_sample", "thresholding")


def _read_model_index(source: str, local: dict) -> dict:
    """``model_index.json`` of ``source`` (a local dir or a hub id), or, for a local directory
    without one, an index built from each subfolder's ``config.json`` ``_class_name``."""
    path = Path(source)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return json.loads((path / "model_index.json").read_text())
        index = {}
        for sub in (*DENOISER_FOLDERS, *AUTOENCODER_FOLDERS):
            config = path / sub / "config.json"
            if config.is_file():
                index[sub] = ["diffusers", json.loads(config.read_text()).get("_class_name")]
        if (path / "scheduler").is_dir():
            index["scheduler"] = ["diffusers", "scheduler"]
        return index
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(source, **local))


def _component(index: dict, folders: Sequence[str], valid: Sequence[str], what: str, model: str) -> Optional[tuple]:
    """``(folder, class name)`` of the one component of ``index`` in ``folders``, or ``None``."""
    found = [(k, index[k][1]) for k in folders if isinstance(index.get(k), (list, tuple)) and index[k][1]]
    if not found:
        return None
    folder, cls = found[0]
    if cls not in valid:
        raise ValueError(f"backend {NAME!r}: {model!r} has a {cls} as its {what} ({folder}/); supported: "
                         f"{', '.join(valid)}")
    return folder, cls


def load_components(model: str, dtype: torch.dtype) -> dict[str, Any]:
    """``{"denoiser", "family", "autoencoder", "scheduler_config", "model_index", "source"}`` of
    ``model`` (weights in ``dtype``, on the CPU, frozen, eval mode; ``autoencoder`` is ``None`` in
    pixel space). Raises :class:`~consolver.backends.model_source.BackendModelNotFoundError`
    naming ``backend.model`` when it cannot be found or loaded, ``ValueError`` for an unsupported
    model class."""
    import diffusers

    source = resolve_model(model, NAME, ())
    local = {"local_files_only": is_offline()}
    try:
        index = _read_model_index(source, local)
        denoiser = _component(index, DENOISER_FOLDERS, tuple(DENOISERS), "denoiser", model)
        if denoiser is None:
            raise ValueError(f"backend {NAME!r}: {model!r} has no denoiser: model_index.json lists neither unet/ nor "
                             f"transformer/ (supported: {', '.join(DENOISERS)})")
        if "scheduler" not in index:
            raise ValueError(f"backend {NAME!r}: {model!r} has no scheduler/ (its betas define the schedule)")
        autoencoder = _component(index, AUTOENCODER_FOLDERS, AUTOENCODERS, "autoencoder", model)
        if Path(source).is_dir():  # a clear error before diffusers' own for a missing folder
            resolve_model(source, NAME, [denoiser[0], "scheduler"] + ([autoencoder[0]] if autoencoder else []))
        scheduler_config = dict(diffusers.DDPMScheduler.load_config(source, subfolder="scheduler", **local))
        folder, cls = denoiser
        family = DENOISERS[cls]
        loader = diffusers.DiTTransformer2DModel if family == "dit" else diffusers.UNet2DModel
        net = loader.from_pretrained(source, subfolder=folder, torch_dtype=dtype, use_safetensors=True, **local)
        vae = None
        if autoencoder is not None:
            vae_class = getattr(diffusers, autoencoder[1])
            vae = vae_class.from_pretrained(source, subfolder=autoencoder[0], torch_dtype=dtype, use_safetensors=True,
                                            **local)
    except BackendModelNotFoundError:
        raise
    except OSError as err:  # huggingface_hub's LocalEntryNotFoundError, diffusers' EnvironmentError, ...
        raise not_found(source, NAME, err) from err
    if family == "dit" and vae is None:
        raise ValueError(f"backend {NAME!r}: {model!r} is a DiT without a vae/ (DiT denoises VAE latents)")
    for module in (net, vae):
        if module is not None:
            module.requires_grad_(False).eval()
    return {"denoiser": net, "family": family, "autoencoder": vae, "scheduler_config": scheduler_config,
            "model_index": index, "source": source}


def _side(sample_size) -> int:
    if isinstance(sample_size, (list, tuple)):
        if len(set(sample_size)) != 1:
            raise ValueError(f"backend {NAME!r} supports square models only, got sample_size={list(sample_size)}")
        return int(sample_size[0])
    return int(sample_size)


class DiffusersModelBackend(Backend):
    """A frozen diffusers UNet2DModel or DiT (see the module docstring).

    Args:
        model: hub id or local pipeline directory (config ``backend.model``).
        resolution: decoded image side in pixels (config ``backend.resolution``); must be the
            model's own (``sample_size`` times the autoencoder's downsampling).
        dtype: ``"float32"`` | ``"float16"`` | ``"bfloat16"``: the precision of the weights.
        device: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"cuda:N"``.
        decode_chunk: latents per decode call.
        null_class: class id of the unconditional branch (config ``backend.null_class``; default
            DiT ``num_classes``, UNet2DModel ``num_class_embeds - 1``).
        components: prebuilt :func:`load_components` output instead of loading ``model``.
    """

    name = NAME
    #: ``predict`` refuses non-integer timesteps (the model was trained on integers); ``False`` only
    #: for finite-difference checks of d(model)/dt at real t.
    integer_timesteps = True

    def __init__(self, model: str, resolution: Optional[int] = None, dtype: str = "float32",
                 device: str | torch.device = "auto", decode_chunk: int = 8, null_class: Optional[int] = None,
                 components: Optional[dict[str, Any]] = None):
        if dtype not in DTYPES:
            raise ValueError(f"backend.dtype={dtype!r} is not valid; choose one of: {', '.join(DTYPES)}")
        if decode_chunk < 1:
            raise ValueError(f"backend.decode_chunk must be >= 1, got {decode_chunk}")
        self.model = str(model)
        self.dtype, self.torch_dtype = dtype, DTYPES[dtype]
        self.device = resolve_device(device)
        self.decode_chunk = int(decode_chunk)
        parts = components if components is not None else load_components(self.model, self.torch_dtype)
        self.family = parts["family"]
        self.denoiser = parts["denoiser"].to(self.device)
        self.autoencoder = None if parts["autoencoder"] is None else parts["autoencoder"].to(self.device)
        self.model_index = dict(parts["model_index"])
        config = parts["scheduler_config"]
        self.schedule, self.model_prediction_type = schedule_from_config(config, self.model, NAME, PREDICTION_TYPES)
        ignored = [k for k in IGNORED_SAMPLER_OPTIONS if config.get(k)]
        if ignored:
            logger.info("diffusers backend: the scheduler config turns on %s; the ODE solver does not use it",
                        ", ".join(ignored))
        self._init_shapes(resolution)
        self.conditions = ClassConditions(*self._class_table(null_class), label_map(self.model_index), self.model)
        self._warned_guidance = False
        if self.device.type == "cpu" and self.torch_dtype == torch.float16:
            logger.warning("diffusers backend: float16 weights on the CPU are slow; use backend.dtype=float32 or "
                           "bfloat16 there, float16 on a GPU")
        logger.info("diffusers backend: %s (%s%s), %d px (latents %s), %s model, %s, null class %s, %s on %s",
                    self.model, type(self.denoiser).__name__,
                    f" + {type(self.autoencoder).__name__}" if self.autoencoder is not None else ", pixel space",
                    self.resolution, self.latent_shape, self.model_prediction_type,
                    "class-conditional" if self.conditional else "unconditional", self.null_class, self.dtype,
                    self.device)

    def _init_shapes(self, resolution: Optional[int]) -> None:
        cfg = self.denoiser.config
        side = _side(cfg.sample_size)
        self.vae_scale_factor = 1
        self.scaling_factor, self.shift_factor = 1.0, 0.0
        if self.autoencoder is not None:
            vae_cfg = self.autoencoder.config
            self.vae_scale_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
            self.scaling_factor = float(getattr(vae_cfg, "scaling_factor", None) or 1.0)
            self.shift_factor = float(getattr(vae_cfg, "shift_factor", None) or 0.0)
        native = side * self.vae_scale_factor
        if resolution is not None and int(resolution) != native:
            raise ValueError(f"backend.resolution={resolution} but {self.model!r} generates {native} px images "
                             f"(sample_size {side} x {self.vae_scale_factor}); set backend.resolution={native}")
        self.resolution = native
        self.latent_channels = int(cfg.in_channels)
        self.latent_shape = (self.latent_channels, side, side)

    def _class_table(self, null_class: Optional[int]) -> tuple[Optional[int], Optional[int]]:
        """``(rows of the class embedding or None, null class)``."""
        if self.family == "dit":
            embedder = self.denoiser.transformer_blocks[0].norm1.emb.class_embedder
            rows, default = embedder.embedding_table.num_embeddings, int(embedder.num_classes)
        else:
            table = self.denoiser.class_embedding
            if table is None:
                if null_class is not None:
                    raise ValueError(f"backend.null_class={null_class} but {self.model!r} is an unconditional "
                                     f"UNet2DModel (no class embedding); leave backend.null_class unset")
                return None, None
            if not isinstance(table, torch.nn.Embedding):
                raise ValueError(f"backend {NAME!r}: {self.model!r} has class_embed_type="
                                 f"{self.denoiser.config.class_embed_type!r}; only a class-id embedding "
                                 f"(num_class_embeds) is supported")
            rows = table.num_embeddings
            default = rows - 1
        return rows, (default if null_class is None else int(null_class))

    @classmethod
    def from_config(cls, cfg) -> "DiffusersModelBackend":
        """From a :class:`~consolver.config.BackendConfig` (``model``, ``resolution``, ``dtype``,
        ``device``, ``decode_chunk``, ``null_class``)."""
        return cls(model=cfg.model, resolution=cfg.resolution, dtype=cfg.dtype, device=cfg.device,
                   decode_chunk=cfg.decode_chunk, null_class=cfg.null_class)

    @classmethod
    def config_meta(cls, cfg) -> dict:
        """Backend, resolution and the VP/epsilon contract (every model here is VP; predict returns epsilon)."""
        return {"backend": cls.name, "resolution": int(cfg.resolution), "schedule": "vp", "prediction_type": "epsilon"}

    # ------------------------------------------------------------ conditions

    @property
    def conditional(self) -> bool:
        return self.conditions.conditional

    @property
    def null_class(self) -> Optional[int]:
        return self.conditions.null_class

    def prompts(self, split: str = "train") -> list[str]:
        """The model's own condition list (used when ``data.prompts`` is unset): ``["none"]`` for an
        unconditional model, else the first name of every labelled class (the same for every
        split). ``ValueError`` for a class-conditional model without class names."""
        if not self.conditional:
            return ["none"]
        names = first_names(self.model_index)
        if not names:
            raise ValueError(f"{self.model!r} has no class names (id2label) in its model_index.json: set data.prompts "
                             f"to a file of class ids")
        return names

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """``ValueError`` for a prompt that is not a class of this model (see :meth:`class_ids`)."""
        self.class_ids(prompts)

    def class_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Class ids ``[B]`` int64 of ``prompts`` (null class for ``none``; -1 on an unconditional model)."""
        return torch.tensor([self.conditions.class_id(p) for p in prompts], dtype=torch.int64)

    def encode(self, prompts: Sequence[str], ref_images: Optional[torch.Tensor] = None) -> TensorDict:
        """``TensorDict(class_labels=[B] int64, batch_size=[B])`` on the device."""
        if ref_images is not None:
            raise ValueError(f"the {NAME} backend generates from classes; it takes no reference images "
                             f"(data.ref_image_column)")
        if isinstance(prompts, str):
            prompts = [prompts]
        labels = self.class_ids(prompts)
        return TensorDict({"class_labels": labels}, batch_size=[len(prompts)], device=self.device)

    # ------------------------------------------------------------ the model

    def _forward(self, sample: torch.Tensor, steps: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The denoiser's raw output ``[N, C, h, w]`` float32 (DiT: its first ``C`` channels)."""
        if self.family == "dit":
            out = self.denoiser(sample, timestep=steps, class_labels=labels, return_dict=False)[0]
            return out[:, : self.latent_channels].float()
        return self.denoiser(sample, steps, class_labels=labels, return_dict=False)[0].float()

    def predict(self, x: torch.Tensor, t, cond: TensorDict, guidance: float) -> torch.Tensor:
        """Guided epsilon ``[B, *latent_shape]`` (``x``'s dtype, at least float32) for latents ``x``
        at timesteps ``t`` (scalar or ``[B]``, integer values; a float tensor that requires grad
        passes its gradient through the time embedding and the prediction-type conversion).

        Class-conditional models with ``guidance != 1``: one call on the doubled batch (DiT
        ``[cond; null]``, UNet2DModel ``[null; cond]``), guidance in float32 on the raw output,
        then the conversion to epsilon; a batch of null-class rows only (prompt ``none``) is one
        plain call, since guidance leaves it unchanged. Unconditional models: one plain call."""
        B = x.shape[0]
        labels = cond["class_labels"].to(self.device)
        if labels.shape[0] != B:
            raise ValueError(f"cond has batch {labels.shape[0]} but x has batch {B}")
        steps = vp_model_timesteps(t, B, self.schedule.num_train_timesteps, self.device,
                                   self.integer_timesteps)
        sample = x.to(self.device, self.torch_dtype)
        if not self.conditional:
            if guidance != 1.0 and not self._warned_guidance:
                self._warned_guidance = True
                warnings.warn(f"{self.model!r} is unconditional: guidance={guidance} is ignored (set guidance: 1.0)",
                              stacklevel=2)
            out = self._forward(sample, steps, None)
        elif guidance == 1.0 or bool((labels == self.null_class).all()):
            # guidance is the identity on null-class rows (cond = uncond): one plain call, half the cost
            out = self._forward(sample, steps, labels)
        else:
            null = torch.full_like(labels, self.null_class)
            both = torch.cat([labels, null] if self.family == "dit" else [null, labels])
            out = self._forward(torch.cat([sample, sample]), torch.cat([steps, steps]), both)
            uncond, cond_out = (out[B:], out[:B]) if self.family == "dit" else (out[:B], out[B:])
            out = apply_guidance(uncond, cond_out, guidance)
        out = epsilon_from(self.model_prediction_type, out, x, steps, self.schedule)
        return out.to(torch.promote_types(x.dtype, torch.float32))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, resolution, resolution]`` float32 in [0, 1] from latents ``[B, *latent_shape]``,
        ``backend.decode_chunk`` at a time (differentiable; VQ quantisation passes gradients straight
        through). Pixel space: ``x / 2 + 0.5`` clamped; latent: the autoencoder on
        ``latents / scaling_factor (+ shift_factor)``, then the same map."""
        def decode_chunk(chunk: torch.Tensor) -> torch.Tensor:
            if self.autoencoder is None:
                return chunk.to(self.device, torch.float32)
            z = chunk.to(self.device, self.torch_dtype) / self.scaling_factor + self.shift_factor
            return self.autoencoder.decode(z, return_dict=False)[0].float()

        return decode_in_chunks(latents, self.decode_chunk, decode_chunk, self.resolution)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, *latent_shape]`` float32 of images ``[B, 3, H, W]`` in [0, 1] (pixel space:
        ``2 x - 1``; AutoencoderKL: the posterior mean; VQModel: the unquantised encoding; scaled)."""
        x = images.to(self.device, self.torch_dtype) * 2 - 1
        if self.autoencoder is None:
            return x.float()
        encoded = self.autoencoder.encode(x)
        z = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
        return (z.float() - self.shift_factor) * self.scaling_factor

    def meta(self) -> dict:
        return dict(super().meta(), model_family=self.family, conditional=self.conditional, null_class=self.null_class)


__all__ = ["DiffusersModelBackend", "PREDICTION_TYPES", "load_components"]
