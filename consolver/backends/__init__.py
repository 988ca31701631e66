"""Diffusion backends behind one protocol (see :mod:`consolver.backends.base`)."""

import importlib

#: config name -> "module:class"; each backend is imported only when asked for.
BACKENDS = {
    "toy": "consolver.backends.toy:ToyBackend",
    "sd15": "consolver.backends.sd15:SD15Backend",
    "flux_kontext": "consolver.backends.flux_kontext:FluxKontextBackend",
    "toy_edit": "consolver.backends.toy_edit:ToyEditBackend",
    "diffusers": "consolver.backends.diffusers_model:DiffusersModelBackend",
}


def backend_class(name: str) -> type:
    """The backend class registered as ``name`` (imported on demand)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def __getattr__(name):
    # lazy: `consolver.backends.model_source` (error types the tools catch) must not import torch
    if name in ("Backend", "apply_guidance"):
        from consolver.backends import base

        return getattr(base, name)
    raise AttributeError(f"module 'consolver.backends' has no attribute {name!r}")


def build_backend(cfg) -> "Backend":
    """The backend named by ``cfg.name`` (a :class:`~consolver.config.BackendConfig`)."""
    return backend_class(cfg.name).from_config(cfg)


def config_meta(cfg) -> dict:
    """What a backend built from ``cfg`` would report in ``meta()``, as far as the config alone
    determines it (see :meth:`Backend.config_meta`); builds nothing."""
    return backend_class(cfg.name).config_meta(cfg)


__all__ = ["BACKENDS", "Backend", "apply_guidance", "backend_class", "build_backend", "config_meta"]
