"""consolver: train and ship ConsistencySolver, a learnable multistep ODE solver that makes
few-step diffusion previews look like the full-step final image."""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = ["__version__", "ConsistencySolverScheduler"]


def __getattr__(name):
    # Lazy so that `import consolver` stays cheap (no diffusers import) for tools and workers.
    if name == "ConsistencySolverScheduler":
        from consolver.scheduler import ConsistencySolverScheduler

        return ConsistencySolverScheduler
    raise AttributeError(f"module 'consolver' has no attribute {name!r}")
