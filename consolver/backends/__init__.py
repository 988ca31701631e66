"""Diffusion backends behind one protocol (see :mod:`consolver.backends.base`)."""

from consolver.backends.base import Backend, apply_guidance

BACKENDS = ("toy", "sd15", "flux_kontext")


def build_backend(cfg) -> Backend:
    """The backend named by ``cfg.name`` (a :class:`~consolver.config.BackendConfig`).

    Heavy backends are imported only when asked for.
    """
    if cfg.name == "toy":
        from consolver.backends.toy import ToyBackend

        return ToyBackend.from_config(cfg)
    if cfg.name == "sd15":
        from consolver.backends.sd15 import SD15Backend

        return SD15Backend.from_config(cfg)
    if cfg.name == "flux_kontext":
        from consolver.backends.flux_kontext import FluxKontextBackend

        return FluxKontextBackend.from_config(cfg)
    raise ValueError(f"unknown backend {cfg.name!r}; valid backends: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "apply_guidance", "build_backend"]
