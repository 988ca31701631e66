"""``ShardDataModule``: the offline dataset as a LightningDataModule.

Batch structure (a ``dict``; ``L = backend.latent_shape``, ``B <= data.batch_size``)::

    key            list[str]  [B]           sample key (10-digit global index)
    index          int64      [B]           global sample index
    noise_seed     int64      [B]           the seed of the sample's noise (make_noise)
    prompt         list[str]  [B]           text the backend encodes
    noise          float32    [B, *L]       exact initial noise of the reference solve
    target_latent  float32    [B, *L]       full-step reference solve result
    features       dict[str, Tensor]        per reward name, its cached target features
                                            [B, *feature_shape] (dtype as the reward made them)
    target_image   uint8      [B, 3, H, W]  only with data.load_target_image (0..255)
    ref_image      uint8      [B, 3, H, W]  editing datasets only (0..255)
    instruction    list[str]  [B]           editing datasets only

Loader options: ``data.shard_shuffle`` (per-epoch shard order, identical on every rank),
``data.shuffle_buffer`` (samples per worker), ``data.resampled`` + ``data.epoch_length``
(shards drawn with replacement, exactly ``ceil(epoch_length / (batch_size * workers))``
batches per worker: every rank sees the same number of batches, as DDP needs). Without
resampling each epoch reads every shard once, split disjointly over ranks and workers;
ranks can then see different batch counts, so use resampled mode for DDP.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from typing import Any, Dict, Iterator, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from consolver.config import Config, ConfigError
from consolver.data.format import check_features, check_meta
from consolver.data.reader import STATS_KEY, ShardStream, StreamSpec, expand_shards, peek_meta

logger = logging.getLogger(__name__)


def expected_meta(cfg: Config, backend=None) -> Dict[str, Any]:
    """What shards must match: everything ``backend.meta()`` reports (name, schedule, prediction
    type, resolution, latent shape, ...) when a backend is given, else what the config alone
    determines of it (:func:`consolver.backends.config_meta`: for the toy backend all of it)."""
    from consolver.backends import config_meta

    meta: Dict[str, Any] = {"backend": cfg.backend.name, "resolution": int(cfg.backend.resolution)}
    meta.update(backend.meta() if backend is not None else config_meta(cfg.backend))
    return meta


class ShardLoader(DataLoader):
    """DataLoader over a :class:`ShardStream` (batches are made in the workers, ``batch_size=None``).

    Each ``iter()`` starts the next epoch (``set_epoch`` before the workers start, so workers
    must not be persistent) and gathers the workers' problem counters into :attr:`stats`.
    """

    def __init__(self, dataset: ShardStream, num_workers: int = 0, **kwargs):
        dataset.emit_stats = True
        super().__init__(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False, **kwargs)
        self.epoch = 0
        self.skip_batches = 0  # resume: batches of the next epoch already consumed (read and dropped)
        self._totals: Counter = Counter()
        self._live: Dict[int, Dict[str, int]] = {}

    def __len__(self) -> int:
        n = self.dataset.num_batches(self.num_workers)
        if n is None:
            raise TypeError("a non-resampled shard stream has no fixed length")
        return n

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        self._fold()
        self.dataset.set_epoch(self.epoch)
        self.epoch += 1
        skip, self.skip_batches = self.skip_batches, 0
        try:
            for batch in super().__iter__():
                stats = batch.pop(STATS_KEY, None)
                if stats is not None:
                    self._live[stats.pop("worker")] = stats
                if batch and skip > 0:
                    skip -= 1
                elif batch:
                    yield batch
        finally:
            self._fold()

    def _fold(self) -> None:
        if not self._live:
            return
        epoch = Counter()
        for stats in self._live.values():
            epoch.update(stats)
        self._live = {}
        self._totals.update(epoch)
        if any(epoch.values()):
            logger.warning("epoch %d: skipped %d corrupt samples, %d shard errors", self.epoch - 1,
                           epoch["skipped_samples"], epoch["shard_errors"])

    @property
    def stats(self) -> Dict[str, int]:
        """``{"skipped_samples", "shard_errors"}`` summed over workers and epochs so far."""
        total = Counter({"skipped_samples": 0, "shard_errors": 0}) + self._totals
        for stats in self._live.values():
            total.update(stats)
        return {"skipped_samples": total["skipped_samples"], "shard_errors": total["shard_errors"]}


class ShardDataModule(L.LightningDataModule):
    """Streams ``data.train_shards`` (default: ``data.shard_dir``) and ``data.val_shards``.

    Args:
        cfg: the training :class:`~consolver.config.Config`.
        backend: the training backend; when given, its ``meta()`` (schedule, prediction type,
            latent shape, ...) is what the shards must match; without it, what the config alone
            determines of that meta (:func:`consolver.backends.config_meta`).
        reward_names: rewards whose cached features are loaded (default: ``cfg.rewards``);
            a shard without one of them is an error.

    ``setup()`` checks the first shard's ``meta.json`` (fail fast); every sample is checked
    again while streaming. Mismatches raise :class:`~consolver.data.format.ShardMetaError`.
    """

    def __init__(self, cfg: Config, backend=None, reward_names: Optional[Sequence[str]] = None):
        super().__init__()
        self.cfg = cfg
        self.expected_meta = expected_meta(cfg, backend)
        names = [r.name for r in cfg.rewards] if reward_names is None else list(reward_names)
        self.reward_names = names
        self.train_set: Optional[ShardStream] = None
        self.val_set: Optional[ShardStream] = None
        self._loaders: list[ShardLoader] = []
        self._epoch = 0
        self._skip = 0
        self._resume: Optional[tuple] = None

    def _check(self, urls: Sequence[str]) -> None:
        meta = peek_meta(urls[0])
        check_meta(meta, self.expected_meta, f"shards {urls[0]}")
        check_features(meta, self.reward_names, f"shards {urls[0]}")
        if meta.get("guidance") != float(self.cfg.guidance):
            warnings.warn(f"shards were made with guidance={meta.get('guidance')}, training uses guidance="
                          f"{self.cfg.guidance}: the targets were solved with another guidance", stacklevel=2)

    def _world_size(self) -> int:
        if self.trainer is not None:
            return self.trainer.world_size
        return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    def _spec(self, urls, train: bool) -> StreamSpec:
        data = self.cfg.data
        per_worker = None
        if train and data.resampled:
            if not data.epoch_length or data.epoch_length < 1:
                raise ConfigError("data.resampled=true needs data.epoch_length (samples per epoch per rank)")
            per_worker = math.ceil(data.epoch_length / (data.batch_size * max(1, data.num_workers)))
        return StreamSpec(
            urls=list(urls), expected_meta=self.expected_meta, batch_size=data.batch_size,
            required_features=self.reward_names, shard_shuffle=train and data.shard_shuffle,
            shuffle_buffer=data.shuffle_buffer if train else 0, resampled=train and data.resampled,
            batches_per_worker=per_worker, load_target_image=data.load_target_image,
            verify_checksums=data.verify_checksums, seed=int(self.cfg.seed))

    def setup(self, stage: Optional[str] = None) -> None:
        data = self.cfg.data
        if data.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer must be >= 0, got {data.shuffle_buffer}")
        if self.train_set is None:
            urls = expand_shards(data.train_shards or data.shard_dir,
                                 "data.train_shards" if data.train_shards else "data.shard_dir")
            self._check(urls)
            self.train_set = ShardStream(self._spec(urls, train=True))
            readers = self._world_size() * max(1, data.num_workers)
            if not data.resampled and len(urls) < readers:
                warnings.warn(f"{len(urls)} train shards for {readers} readers (ranks x workers): some read nothing; "
                              f"make more, smaller shards or use data.resampled", stacklevel=2)
            if not data.resampled and self._world_size() > 1:
                warnings.warn("DDP without data.resampled: ranks may get different batch counts; set "
                              "data.resampled=true and data.epoch_length", stacklevel=2)
        if self.val_set is None and data.val_shards:
            urls = expand_shards(data.val_shards, "data.val_shards")
            self._check(urls)
            self.val_set = ShardStream(self._spec(urls, train=False))

    def _loader(self, dataset: ShardStream) -> ShardLoader:
        loader = ShardLoader(dataset, num_workers=self.cfg.data.num_workers, pin_memory=torch.cuda.is_available())
        self._loaders.append(loader)
        return loader

    def train_dataloader(self) -> ShardLoader:
        if self.train_set is None:
            self.setup("fit")
        loader = self._loader(self.train_set)
        if self._resume is not None:  # a resumed run's data position wins over the epoch counter
            self._epoch, self._skip = self._resume
            self._resume = None
        loader.epoch, loader.skip_batches = self._epoch, self._skip
        self._skip = 0
        return loader

    def val_dataloader(self):
        if self.val_set is None:
            self.setup("validate")
        return self._loader(self.val_set) if self.val_set is not None else []

    @property
    def stats(self) -> Dict[str, int]:
        """Corrupt samples skipped and shard errors, over every loader this module made."""
        total = Counter({"skipped_samples": 0, "shard_errors": 0})
        for loader in self._loaders:
            total.update(loader.stats)
        return dict(total)

    def state_dict(self) -> Dict[str, Any]:
        train = [lo for lo in self._loaders if lo.dataset is self.train_set]
        return {"epoch": train[-1].epoch if train else self._epoch}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._epoch = int(state_dict.get("epoch", 0))

    def resume_at(self, epoch: int, batches: int) -> None:
        """Start the next train loader in ``epoch`` (its shard order and sample order), after
        dropping its first ``batches`` batches: the data position of a resumed run (the training
        module records how many batches of the epoch it consumed)."""
        self._resume = (int(epoch), int(batches))
