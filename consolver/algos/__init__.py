"""Training algorithms, one file each over :class:`~consolver.algos.base.PreviewAlgorithm`,
chosen by ``algo.name``."""

import importlib

#: config name -> "module:class"
ALGORITHMS = {
    "ppo": "consolver.algos.ppo:PPO",
    "grpo": "consolver.algos.grpo:GRPO",
    "rloo": "consolver.algos.rloo:RLOO",
    "distill": "consolver.algos.distill:Distill",
}


def algorithm_class(name: str):
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; valid algorithms: {', '.join(ALGORITHMS)}")
    module, cls = ALGORITHMS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_algorithm(cfg, runtime=None):
    """The LightningModule of ``cfg.algo.name``."""
    return algorithm_class(cfg.algo.name)(cfg, runtime)


__all__ = ["ALGORITHMS", "algorithm_class", "build_algorithm"]
