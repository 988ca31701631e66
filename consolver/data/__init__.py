"""Offline dataset: WebDataset shards of (prompt, noise, full-step target) and their loader.

    from consolver.data import ShardDataModule, make_shards

Names are imported lazily from :mod:`consolver.data.shards`, so making shards or decoding
samples does not import Lightning.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "datamodule": ("ShardDataModule", "ShardLoader", "expected_meta"),
    "format": ("FORMAT_VERSION", "CorruptSampleError", "ShardMetaError", "check_meta", "decode_sample", "encode_sample"),
    "prompts": ("PromptRecord", "load_prompts"),
    "reader": ("LoaderStats", "ShardStream", "StreamSpec", "collate", "expand_shards", "peek_meta"),
    "writer": ("ShardPlan", "make_noise", "make_shards", "plan_for", "sample_seed"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'consolver.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"consolver.data.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
