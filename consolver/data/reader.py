"""Streaming shards: shard list -> split by node and worker -> tar members -> samples ->
shuffle buffer -> decode -> batches, all inside the DataLoader worker.

Corrupt input never stops training: a sample with a missing member, bad bytes or a CRC
mismatch (``meta.json`` included) is skipped; a shard that cannot be opened, or whose tar
stream breaks, ends early (everything before the break is still read; a damaged member header
is skipped over and the members after it are read); a shard with no valid tar member at all
(not a tar: text, an HTML error page, random bytes) is a shard error too. All are logged and
counted in :class:`LoaderStats`. A meta mismatch (wrong backend/schedule/resolution) of a
sample whose ``meta.json`` passes its checksum is never skipped: it raises.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from consolver.config import ConfigError
from consolver.data.format import CorruptSampleError, decode_sample, parse_meta

logger = logging.getLogger(__name__)

STATS_KEY = "__loader_stats__"  # rides on batches from the workers; removed by ShardLoader
_LOG_FIRST = 20  # log every problem up to this many per worker, then every 1000th


@dataclass
class LoaderStats:
    """Problems met while reading: ``skipped_samples`` (undecodable / incomplete / CRC
    mismatch) and ``shard_errors`` (shard could not be opened or its tar stream broke)."""

    skipped_samples: int = 0
    shard_errors: int = 0
    messages: List[str] = field(default_factory=list)  # the first few, for reports

    def _log(self, count: int, what: str) -> None:
        if count <= _LOG_FIRST or count % 1000 == 0:
            logger.warning("%s (%d so far in this worker)", what, count)
            if len(self.messages) < _LOG_FIRST:
                self.messages.append(what)

    def skip_sample(self, err: Exception, url: Optional[str] = None) -> None:
        self.skipped_samples += 1
        self._log(self.skipped_samples, f"skipped corrupt sample in {url or '?'}: {err}")

    def shard_error(self, err: Exception, url: str) -> None:
        self.shard_errors += 1
        self._log(self.shard_errors, f"shard {url}: {type(err).__name__}: {err}")

    def as_dict(self) -> Dict[str, int]:
        return {"skipped_samples": self.skipped_samples, "shard_errors": self.shard_errors}


def expand_shards(spec: str | Sequence[str], key: Optional[str] = None) -> List[str]:
    """Shard URLs from ``"::"``-separated parts: brace patterns (``a-{000..009}.tar``), ``pipe:``
    commands, URLs, local files, or directories (their ``*.tar`` files, sorted).

    Local paths must exist; errors name ``key`` (the config key the spec came from)."""
    where = f"{key}={spec!r}: " if key else ""
    parts = [p for s in ([spec] if isinstance(spec, str) else spec) for p in str(s).split("::") if p]
    urls: List[str] = []
    for part in parts:
        local = not part.startswith("pipe:") and "://" not in part
        if local and os.path.isdir(part):
            found = sorted(str(p) for p in Path(part).glob("*.tar"))
            if not found:
                raise ConfigError(f"{where}no *.tar shards in directory {part!r}")
            urls += found
            continue
        expanded = list(braceexpand.braceexpand(part))
        missing = [u for u in expanded if not os.path.exists(u)] if local else []
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConfigError(f"{where}shard path {missing[0]!r}{more} does not exist; make the shards "
                              f"(tools/make_shards.py) or fix the path")
        urls += expanded
    if not urls:
        raise ConfigError(f"{where}no shards in {spec!r}")
    return urls


def tar_members(sources, stats: LoaderStats) -> Iterator[Dict[str, Any]]:
    """Members ``{"fname", "data", "__url__"}`` of opened shards, then ``{}`` after each shard
    (so webdataset's grouping never merges samples across shards). Damaged member headers are
    skipped over (``ignore_zeros``); a broken stream ends the shard, and a shard with no valid
    member at all (``ignore_zeros`` skips every block of a file that is not a tar) is an
    error too; both are counted in ``stats``."""
    for source in sources:
        url, members, failed = source["url"], 0, False
        try:
            with tarfile.open(fileobj=source["stream"], mode="r|*", ignore_zeros=True) as tar:
                for info in tar:
                    if info.isreg():
                        members += 1
                        yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
                    tar.members = []  # streaming: do not keep every header
        except Exception as err:  # noqa: BLE001 - truncated/garbled tar: count, keep what was read
            failed = True
            stats.shard_error(err, url)
        finally:
            close = getattr(source["stream"], "close", None)
            if close is not None:
                try:
                    close()
                except Exception as err:  # noqa: BLE001 - e.g. a pipe: command that exited non-zero
                    failed = True
                    stats.shard_error(err, url)
        if not members and not failed:
            stats.shard_error(tarfile.ReadError("no valid tar member: not a tar file, or an empty one"), url)
        yield {}


def collate(samples: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Batch decoded samples: tensors are stacked (``[B, ...]``), ints become int64 ``[B]``,
    strings become lists, nested dicts (``features``) are collated per key."""
    out: Dict[str, Any] = {}
    for key, first in samples[0].items():
        values = [s[key] for s in samples]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, Mapping):
            out[key] = collate(values) if first else {}
        elif isinstance(first, int):
            out[key] = torch.tensor(values, dtype=torch.int64)
        else:
            out[key] = list(values)
    return out


@dataclass
class StreamSpec:
    """How a :class:`ShardStream` reads (see ``DataConfig`` for the meaning of each field)."""

    urls: List[str]
    expected_meta: Dict[str, Any]
    batch_size: int
    required_features: Optional[List[str]] = None
    shard_shuffle: bool = True
    shuffle_buffer: int = 0
    resampled: bool = False
    batches_per_worker: Optional[int] = None  # resampled mode: fixed epoch length
    partial_batches: bool = True
    load_target_image: bool = False
    verify_checksums: bool = True
    seed: int = 0


class ShardStream(IterableDataset):
    """Batches (see :func:`collate` and ``ShardDataModule``) streamed from WebDataset shards.

    Without resampling, every epoch reads every shard once: the shard list is shuffled with
    ``(seed, epoch)`` (the same order on every rank), then ``wds.split_by_node`` and
    ``wds.split_by_worker`` give each (rank, worker) a disjoint subset. With resampling, each
    (rank, worker) draws shards with replacement from its own ``(seed, epoch, rank, worker)``
    generator and yields exactly ``batches_per_worker`` batches. ``set_epoch`` must be called
    before iterating (``ShardLoader`` does it).
    """

    def __init__(self, spec: StreamSpec, emit_stats: bool = False):
        super().__init__()
        if spec.resampled and not spec.batches_per_worker:
            raise ConfigError("resampled reading needs a fixed epoch length (data.epoch_length)")
        self.spec, self.emit_stats, self.epoch = spec, emit_stats, 0
        self.stats = LoaderStats()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def num_batches(self, num_workers: int) -> Optional[int]:
        """Batches per rank per epoch in resampled mode (``None`` otherwise)."""
        return None if not self.spec.resampled else self.spec.batches_per_worker * max(1, num_workers)

    def _shards(self, rank: int, worker: int) -> Iterator[Dict[str, str]]:
        urls = list(self.spec.urls)
        if self.spec.resampled:
            rng = random.Random(f"resample/{self.spec.seed}/{self.epoch}/{rank}/{worker}")
            return self._resampled(urls, rng)
        if self.spec.shard_shuffle:
            random.Random(f"shards/{self.spec.seed}/{self.epoch}").shuffle(urls)
        return wds.split_by_worker(wds.split_by_node({"url": u} for u in urls))

    def _resampled(self, urls: List[str], rng: random.Random) -> Iterator[Dict[str, str]]:
        """Shards drawn with replacement, forever, unless none of them yields a sample."""
        limit = 3 * len(urls) + 10
        while True:
            if self._shards_since_sample > limit:
                raise RuntimeError(f"read {limit} shards of {urls[0]}... without one readable sample; "
                                   f"first problems: {self.stats.messages[:3]}")
            self._shards_since_sample += 1
            yield {"url": rng.choice(urls)}

    def _decoded(self, samples) -> Iterator[Dict[str, Any]]:
        spec = self.spec
        for raw in samples:
            try:
                sample = decode_sample(raw, spec.expected_meta, spec.required_features, spec.load_target_image,
                                       spec.verify_checksums)
            except CorruptSampleError as err:  # ShardMetaError is not caught: a wrong dataset is fatal
                self.stats.skip_sample(err, raw.get("__url__"))
                continue
            self._shards_since_sample = 0
            yield sample

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        spec, self.stats, self._shards_since_sample = self.spec, LoaderStats(), 0
        streams = wds.tariterators.url_opener(self._shards(rank, worker), handler=self._open_failed)
        samples = wds.tariterators.group_by_keys(tar_members(streams, self.stats), handler=self._group_failed)
        if spec.shuffle_buffer > 1:
            rng = random.Random(f"samples/{spec.seed}/{self.epoch}/{rank}/{worker}")
            samples = wds.filters._shuffle(samples, spec.shuffle_buffer, min(spec.shuffle_buffer, 100), rng=rng)
        batches = wds.filters._batched(self._decoded(samples), spec.batch_size, collation_fn=collate,
                                       partial=spec.partial_batches and not spec.resampled)
        if spec.resampled:
            batches = itertools.islice(batches, spec.batches_per_worker)
        for batch in batches:
            yield self._with_stats(batch)
        if self.emit_stats:
            yield self._with_stats({})  # stats-only marker: the last word of this worker

    def _with_stats(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        if self.emit_stats:
            info = get_worker_info()
            batch[STATS_KEY] = dict(self.stats.as_dict(), worker=0 if info is None else info.id)
        return batch

    def _open_failed(self, err: Exception) -> bool:
        self.stats.shard_error(err, str(err.args[-1]) if err.args else "?")
        return True

    def _group_failed(self, err: Exception) -> bool:
        self.stats.shard_error(err, "?")
        return True


def peek_meta(url: str) -> Dict[str, Any]:
    """``meta.json`` of the first sample of shard ``url`` whose meta is intact (to check shards
    before training); corrupt ones are logged and skipped, as the reader does."""
    stats = LoaderStats()
    streams = wds.tariterators.url_opener([{"url": url}], handler=wds.reraise_exception)
    for member in tar_members(streams, stats):
        if member and member["fname"].endswith(".meta.json"):
            key = wds.tariterators.base_plus_ext(member["fname"])[0]
            try:
                return parse_meta(member["data"], key)
            except CorruptSampleError as err:
                stats.skip_sample(err, url)
    detail = f": {stats.messages[0]}" if stats.messages else ""
    raise ConfigError(f"shard {url} has no readable meta.json{detail}")
