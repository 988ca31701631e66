"""The offline dataset in one import: writer, reader and DataModule (see the submodules).

- :mod:`consolver.data.format`: the sample format (members of one sample, meta checks).
- :mod:`consolver.data.prompts`: prompt lists (txt / JSONL / parquet / the backend's own).
- :mod:`consolver.data.writer`: ``make_shards`` (seeded noise, reference solve, resumable).
- :mod:`consolver.data.reader`: ``ShardStream`` (streaming, splitting, corrupt-sample skipping).
- :mod:`consolver.data.datamodule`: ``ShardDataModule`` (batch structure documented there).
"""

from consolver.data.datamodule import ShardDataModule, ShardLoader, expected_meta
from consolver.data.format import (FORMAT_VERSION, CorruptSampleError, ShardMetaError, check_meta, decode_sample,
                                   encode_sample)
from consolver.data.prompts import PromptRecord, load_prompts
from consolver.data.reader import LoaderStats, ShardStream, StreamSpec, collate, expand_shards, peek_meta
from consolver.data.writer import ShardPlan, make_noise, make_shards, plan_for, sample_seed

__all__ = [
    "FORMAT_VERSION", "CorruptSampleError", "LoaderStats", "PromptRecord", "ShardDataModule", "ShardLoader",
    "ShardMetaError", "ShardPlan", "ShardStream", "StreamSpec", "check_meta", "collate", "decode_sample",
    "encode_sample", "expand_shards", "expected_meta", "load_prompts", "make_noise", "make_shards", "peek_meta",
    "plan_for", "sample_seed",
]
