"""Where a pretrained backend's weights come from: a local pipeline directory or a hub id.

``backend.model`` is either a directory laid out as diffusers' ``save_pretrained`` writes a
pipeline (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ...) or a
Hugging Face Hub id. Weights load from ``*.safetensors`` only (``use_safetensors=True``).
With ``HF_HUB_OFFLINE=1`` (read at call time) only local directories and the Hub cache are
used. A model that cannot be found raises :class:`BackendModelNotFoundError`, whose message
names the id and the config key ``backend.model``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_TRUE = {"1", "on", "yes", "true"}


class BackendModelNotFoundError(OSError):
    """The pretrained model of a backend (config ``backend.model``) cannot be loaded."""


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read at call time."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", "./", "../", "~", "\\")) or text.count("/") > 1 or "\\" in text
            or re.match(r"[A-Za-z]:[\\/]", text) is not None)


def resolve_model(model: str, backend: str, subfolders: Sequence[str]) -> str:
    """``model`` as an existing local pipeline directory (checked to hold ``subfolders``), else as
    a hub id. A path that does not exist, or a directory that lacks a component, is an error
    naming ``backend.model``."""
    if not model:
        raise BackendModelNotFoundError(f"backend {backend!r} needs a pretrained model: set the config key "
                                        f"`backend.model` to a hub id or a local pipeline directory")
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        missing = [s for s in subfolders if not (path / s).is_dir()]
        if missing:
            raise BackendModelNotFoundError(
                f"backend {backend!r}: the local directory {text!r} (config `backend.model`) is not a diffusers "
                f"pipeline directory: it lacks {', '.join(s + '/' for s in missing)} (expected "
                f"{', '.join(s + '/' for s in subfolders)} as `save_pretrained` writes them)")
        return str(path)
    if path.exists() or _looks_like_path(text) or not _HUB_ID.fullmatch(text):
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise BackendModelNotFoundError(
            f"backend {backend!r}: model {text!r} {what}; set the config key `backend.model` to a local pipeline "
            f"directory (with {', '.join(s + '/' for s in subfolders)}) or to a hub id")
    return text


def not_found(model: str, backend: str, err: BaseException) -> BackendModelNotFoundError:
    """The error for a hub id (or directory) whose files could not be loaded."""
    cause = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
    if Path(model).is_dir():
        return BackendModelNotFoundError(
            f"backend {backend!r} could not load the local pipeline directory {model!r} (config `backend.model`): "
            f"{cause}. Weights load from *.safetensors only; re-save the pipeline with "
            f"save_pretrained(safe_serialization=True) if it has only pickle (.bin) weights")
    state = ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if is_offline() else
             "the Hub could not be reached (no network) and it is not in the local Hugging Face cache, or the Hub "
             "has no such model or no safetensors weights for it")
    return BackendModelNotFoundError(
        f"backend {backend!r}: model {model!r} could not be found offline: {state} ({cause}). Download it where "
        f"the Hub is reachable (e.g. `hf download {model} --local-dir <dir>`) and set the config key "
        f"`backend.model` to that local directory")


__all__ = ["BackendModelNotFoundError", "is_offline", "not_found", "resolve_model"]
