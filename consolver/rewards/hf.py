"""Shared plumbing for rewards backed by pretrained vision networks (depth, segformer, clip, dino).

- **Loading**: a reward's ``model`` option is a hub id, a local directory, or an already built
  ``nn.Module``. Ids and directories load with the library's own ``from_pretrained``
  (transformers or segmentation-models-pytorch); with no network and no local copy the error
  (:class:`ModelNotAvailableError`) names the model id and the config key ``rewards[i].model``.
  ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) is honoured at call time.
- **Safe weights only**: networks load from ``*.safetensors`` (transformers with
  ``use_safetensors=True``; SMP hub checkpoints by their ``model.safetensors``), never from
  pickle files (``pytorch_model.bin``), which can run code when loaded; a checkpoint with only
  pickle weights is refused (:class:`UnsafeWeightsError`).
- **Preprocessing on the device** (:class:`ImageProcessing`): resize with
  ``torch.nn.functional.interpolate``, centre crop and normalise with the model's own
  image-processor constants (``preprocessor_config.json`` when there is one, else the known
  defaults of the architecture). No PIL anywhere; batched.
- **Precision**: optional fp16/bf16 autocast around the network; scores are computed in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from consolver.rewards.base import Reward

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ModelSpec = Union[str, os.PathLike, nn.Module, None]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_TRUE = {"1", "on", "yes", "true"}
# PIL resampling codes (as stored in preprocessor_config.json) -> interpolate modes.
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}
_DTYPES = {"float32": None, "fp32": None, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelNotAvailableError(OSError):
    """A reward network that cannot be loaded: not a local directory and not reachable on the Hub."""


class UnsafeWeightsError(ModelNotAvailableError):
    """A reward checkpoint whose weights exist only as pickle files (no safetensors)."""


#: File suffixes of pickle-based weight files (loading one can run arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set (read at call time)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def not_available(reward: str, model_id: str, cause: str, local: bool = False) -> ModelNotAvailableError:
    """The error for a reward network that cannot be loaded, naming the id and the config key.
    ``local``: ``model_id`` is a local path (no download is suggested for it)."""
    key = f"`rewards[i].model` (the `model` option of the {reward!r} entry of `rewards`)"
    if local:
        return ModelNotAvailableError(
            f"reward {reward!r} cannot load model {model_id!r}: {cause}. Set the config key {key} to an existing "
            f"directory holding the model (its config.json and *.safetensors weights), or to a hub id.")
    return ModelNotAvailableError(
        f"reward {reward!r} cannot load model {model_id!r}: {cause}. Download it where the Hugging Face "
        f"Hub is reachable (e.g. `hf download {model_id} --local-dir <dir>`) and set the config key "
        f"{key} to that local directory, or to a hub id that is in the local cache."
    )


def unsafe_weights(reward: str, source: str, found: str) -> UnsafeWeightsError:
    """The error for a checkpoint that has pickle weights (``found``) but no safetensors."""
    return UnsafeWeightsError(
        f"reward {reward!r} cannot load model {source!r}: it has {found} and no *.safetensors weights; reward "
        f"networks load from safetensors only (use_safetensors=True: a pickle file can run code when loaded). "
        f"Convert the checkpoint where you trust it (load it and save_pretrained() it, which writes "
        f"model.safetensors) and set the config key `rewards[i].model` to that directory.")


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", "./", "../", "~", "\\")) or text.count("/") > 1 or "\\" in text
            or re.match(r"[A-Za-z]:[\\/]", text) is not None)


def resolve_source(model: Union[str, os.PathLike], reward: str) -> str:
    """``model`` as an existing local directory, else as a hub id; raises when it is neither
    (a missing local path is reported as such, with no download suggested)."""
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise not_available(reward, text, "it is a file, not a model directory", local=True)
    if _looks_like_path(text) or not _HUB_ID.fullmatch(text):
        raise not_available(reward, text, "no such local directory", local=True)
    return text


def require_safetensors(source: str, reward: str) -> None:
    """Refuse a local checkpoint directory whose weights are only pickle files."""
    directory = Path(source)
    if not directory.is_dir():
        return
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise unsafe_weights(reward, source, "only pickle weights (" + ", ".join(pickles) + ")")


def safetensors_snapshot(source: str, reward: str, local_files_only: bool = False) -> str:
    """A local directory holding ``source``'s ``config.json`` and ``model.safetensors``: ``source``
    itself when it is a directory, else the Hub snapshot with those two files fetched (for
    loaders that would fall back to a pickle ``pytorch_model.bin``, as SMP's does)."""
    if Path(source).is_dir():
        return source
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hub_errors

    missing = getattr(hub_errors, "RemoteEntryNotFoundError", hub_errors.EntryNotFoundError)
    try:
        weights = hf_hub_download(source, "model.safetensors", local_files_only=local_files_only)
    except hub_errors.LocalEntryNotFoundError:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(source, "pytorch_model.bin"), str):
            raise unsafe_weights(reward, source, "only pickle weights (pytorch_model.bin) in the Hub cache") from None
        raise
    except missing:
        raise unsafe_weights(reward, source, "no model.safetensors on the Hub") from None
    hf_hub_download(source, "config.json", local_files_only=local_files_only)
    return str(Path(weights).parent)


def load_pretrained(load: Callable[..., nn.Module], source: str, reward: str) -> nn.Module:
    """``load(source, local_files_only=...)`` with missing-files errors turned into
    :class:`ModelNotAvailableError` (a local directory or the HF cache is used when offline)."""
    offline = is_offline()
    require_safetensors(source, reward)
    try:
        return load(source, local_files_only=offline)
    except ModelNotAvailableError:
        raise
    except OSError as err:
        if not Path(source).is_dir() and "safetensors" in str(err) and not offline:
            raise unsafe_weights(reward, source, f"no safetensors weights on the Hub ({str(err).splitlines()[0][:200]})") from err
        where = "the local directory" if Path(source).is_dir() else "the Hugging Face Hub cache"
        state = ("offline mode (HF_HUB_OFFLINE) is on" if offline else
                 "the Hub could not be reached or has no such model (with no network, HF_HUB_OFFLINE=1 fails fast)")
        cause = f"{where} lacks its files and {state} ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        raise not_available(reward, source, cause) from err


def load_transformers(model_class: Any, source: str, reward: str, **kwargs: Any) -> nn.Module:
    """``model_class.from_pretrained(source, use_safetensors=True)`` through :func:`load_pretrained`,
    refusing checkpoints that leave weights uninitialised."""

    def load(src: str, **kw: Any) -> nn.Module:
        model, info = model_class.from_pretrained(src, output_loading_info=True, use_safetensors=True, **kwargs, **kw)
        check_loading_info(model, info, src, reward)
        return model

    return load_pretrained(load, source, reward)


def read_json(source: str, filename: str) -> Optional[dict]:
    """``filename`` of a local directory or a hub repo (cache only when offline) as a dict;
    ``None`` when it does not exist or cannot be fetched."""
    local = Path(source) / filename
    if Path(source).is_dir():
        return json.loads(local.read_text()) if local.is_file() else None
    from transformers.utils import cached_file

    try:
        path = cached_file(source, filename, local_files_only=is_offline(),
                           _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None
    return json.loads(Path(path).read_text()) if path else None


def check_loading_info(model: nn.Module, info: Mapping[str, Any], source: str, reward: str) -> None:
    """Warn about weights a checkpoint left uninitialised; refuse it when most are missing
    (the wrong architecture: its scores would come from a random network)."""
    missing = list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
    if not missing:
        return
    total = max(1, len(model.state_dict()))
    message = (f"reward {reward!r}: checkpoint {source!r} left {len(missing)} of {total} weights "
               f"uninitialised (e.g. {missing[:5]})")
    if len(missing) > total // 2:
        raise ValueError(message + "; is it the right architecture for this reward?")
    logger.warning(message)


def parse_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """Autocast dtype from a config value: ``None``/float32 (no autocast), float16/fp16, bfloat16/bf16."""
    if dtype is None or dtype == torch.float32:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
    elif str(dtype).lower() in _DTYPES:
        return _DTYPES[str(dtype).lower()]
    raise ValueError(f"reward dtype {dtype!r} is not valid; choose one of: float32, float16, bfloat16")


def _hw(value: Any) -> Tuple[int, int]:
    if isinstance(value, Mapping):
        return int(value["height"]), int(value["width"])
    return int(value), int(value)


@functools.lru_cache(maxsize=16)
def _normalization(mean: Tuple[float, ...], std: Tuple[float, ...], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` as ``[1, 3, 1, 1]`` float32 tensors on ``device``, made once per device."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


@dataclass(frozen=True)
class ImageProcessing:
    """Batched, on-device equivalent of a Hugging Face image processor.

    Exactly one of ``size`` (``(height, width)``, optionally aspect-preserving and rounded to
    ``multiple_of`` like DPT) and ``shortest_edge`` (short side, like CLIP) is set; ``crop``
    is an optional centre crop; ``mean``/``std`` normalise images scaled to [0, 1].
    """

    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    size: Optional[Tuple[int, int]] = None
    shortest_edge: Optional[int] = None
    crop: Optional[Tuple[int, int]] = None
    resample: str = "bilinear"
    keep_aspect_ratio: bool = False
    multiple_of: int = 1

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ImageProcessing":
        """From image-processor config keys (``size``, ``crop_size``, ``do_center_crop``,
        ``image_mean``, ``image_std``, ``resample``, ``keep_aspect_ratio``, ``ensure_multiple_of``)."""
        size, shortest, crop = config.get("size"), None, None
        if config.get("do_center_crop", "crop_size" in config) and config.get("crop_size") is not None:
            crop = _hw(config["crop_size"])
        if isinstance(size, Mapping) and "shortest_edge" in size:
            size, shortest = None, int(size["shortest_edge"])
        elif isinstance(size, (int, float)) and crop is not None:  # legacy int size with a crop
            size, shortest = None, int(size)
        elif size is not None:
            size = _hw(size)
        if not config.get("do_resize", True):
            size = shortest = None
        normalize, resample = config.get("do_normalize", True), config.get("resample", 2)
        return cls(
            mean=tuple(float(v) for v in config.get("image_mean", IMAGENET_MEAN)) if normalize else (0.0,) * 3,
            std=tuple(float(v) for v in config.get("image_std", IMAGENET_STD)) if normalize else (1.0,) * 3,
            size=size, shortest_edge=shortest, crop=crop,
            resample=resample if isinstance(resample, str) else _RESAMPLE.get(int(resample), "bilinear"),
            keep_aspect_ratio=bool(config.get("keep_aspect_ratio", False)),
            multiple_of=int(config.get("ensure_multiple_of", 1) or 1),
        )

    def resized_shape(self, height: int, width: int) -> Tuple[int, int]:
        """Output ``(height, width)`` of the resize step for an input of that size."""
        if self.shortest_edge is not None:
            short, long = sorted((height, width))
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            return (new_short, new_long) if height <= width else (new_long, new_short)
        if self.size is None:
            return height, width
        scale_h, scale_w = self.size[0] / height, self.size[1] / width
        if self.keep_aspect_ratio:  # scale as little as possible (DPT)
            if abs(1 - scale_w) < abs(1 - scale_h):
                scale_h = scale_w
            else:
                scale_w = scale_h
        m = self.multiple_of
        return max(m, round(scale_h * height / m) * m), max(m, round(scale_w * width / m) * m)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> normalised ``[B, 3, h, w]`` float32 on the same device."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"reward images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        x = images.float().clamp(0.0, 1.0)  # as the uint8 conversion of an image would
        shape = self.resized_shape(*x.shape[-2:])
        if shape != tuple(x.shape[-2:]):
            smooth = self.resample in ("bilinear", "bicubic")
            x = F.interpolate(x, size=shape, mode=self.resample, antialias=smooth,
                              **({"align_corners": False} if smooth else {}))
            x = x.clamp(0.0, 1.0)  # bicubic overshoot; PIL clamps to the uint8 range
        if self.crop is not None:
            ch, cw = self.crop
            h, w = x.shape[-2:]
            if ch > h or cw > w:
                raise ValueError(f"crop {self.crop} is larger than the resized image {(h, w)}")
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        mean, std = _normalization(self.mean, self.std, x.device)
        return (x - mean) / std


class PretrainedReward(Reward):
    """Base of rewards backed by a pretrained network: loading, preprocessing, autocast.

    Subclasses set ``default_model`` and ``processor_defaults`` and implement
    :meth:`load_model` (hub id or local directory -> module) and :meth:`embed`
    (normalised pixels -> network output). Image-processor constants are merged as
    architecture defaults < the checkpoint's ``preprocessor_config.json`` < ``processor``.
    """

    default_model: str = ""
    processor_defaults: Mapping[str, Any] = {}

    def __init__(self, model: ModelSpec = None, dtype: Union[str, torch.dtype, None] = None,
                 processor: Optional[Mapping[str, Any]] = None):
        super().__init__()
        model = self.default_model if model is None else model
        config = dict(self.processor_defaults)
        if isinstance(model, nn.Module):
            self.model_id = getattr(model, "name_or_path", "") or type(model).__name__
            self.model = model
        else:
            source = resolve_source(model, self.name)
            self.model_id = source
            self.model = self.load_model(source)
            config.update(self.checkpoint_processor(source) or {})
        config.update(processor or {})
        self.processing = ImageProcessing.from_config(config)
        self.autocast_dtype = parse_dtype(dtype)
        self.freeze()
        logger.info("reward %s: model %s, preprocessing %s, autocast %s",
                    self.name, self.model_id, self.processing, self.autocast_dtype)

    @abstractmethod
    def load_model(self, source: str) -> nn.Module:
        """The network from a hub id or a local directory (use :func:`load_pretrained`)."""

    @abstractmethod
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Network output for normalised pixels ``[B, 3, h, w]``."""

    def checkpoint_processor(self, source: str) -> Optional[dict]:
        """Image-processor config stored with the checkpoint (``preprocessor_config.json``)."""
        return read_json(source, "preprocessor_config.json")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def run(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocess ``[B, 3, H, W]`` in [0, 1] on the network's device, run it (autocast
        when a dtype is set) and return its output as float32. No gradients: rewards are frozen."""
        pixels = self.processing(images.to(self.device))
        if self.autocast_dtype is None:
            context = contextlib.nullcontext()
        else:
            context = torch.autocast(device_type=pixels.device.type, dtype=self.autocast_dtype)
        with context:
            out = self.embed(pixels)
        return out.float()


class EmbeddingReward(PretrainedReward):
    """Cosine similarity of image embeddings on the paper's scale ``(cos + 1) * 50`` in [0, 100].

    ``features(target)``: unit-norm embeddings ``[B, D]`` float32. ``score``: ``[B]``.
    """

    def features(self, target: torch.Tensor) -> torch.Tensor:
        """Unit-norm target embeddings ``[B, D]`` from images ``[B, 3, H, W]`` in [0, 1]."""
        return F.normalize(self.run(target), dim=-1)

    def score(self, preview: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        """``(cos(embed(preview), target) + 1) * 50``: ``[B]`` in [0, 100], 100 for identical images."""
        pred = F.normalize(self.run(preview), dim=-1)
        target = F.normalize(target_features.to(pred.device, torch.float32), dim=-1)
        cos = (pred * target).sum(-1).clamp(-1.0, 1.0)
        return (cos + 1.0) * 50.0


__all__ = [
    "CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "EmbeddingReward", "ImageProcessing",
    "ModelNotAvailableError", "PretrainedReward", "UnsafeWeightsError", "check_loading_info", "is_offline",
    "load_pretrained", "load_transformers", "not_available", "parse_dtype", "read_json", "require_safetensors",
    "resolve_source", "safetensors_snapshot", "unsafe_weights",
]
