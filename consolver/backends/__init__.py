"""Diffusion backends behind one protocol (see :mod:`consolver.backends.base`)."""

import importlib

from consolver.backends.base import Backend, apply_guidance

#: config name -> "module:class"; each backend is imported only when asked for.
BACKENDS = {
    "toy": "consolver.backends.toy:ToyBackend",
}


def build_backend(cfg) -> Backend:
    """The backend named by ``cfg.name`` (a :class:`~consolver.config.BackendConfig`)."""
    if cfg.name not in BACKENDS:
        raise ValueError(f"unknown backend {cfg.name!r}; valid backends: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[cfg.name].split(":")
    return getattr(importlib.import_module(module), cls).from_config(cfg)


__all__ = ["BACKENDS", "Backend", "apply_guidance", "build_backend"]
