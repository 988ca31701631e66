"""Streaming: rank/worker splitting, resampling, corrupt shards, meta checks, URL forms, Lightning."""

from __future__ import annotations

import gzip
import logging
import random
import tarfile
from pathlib import Path

import pytest
import torch

from consolver.config import ConfigError, load_config
from consolver.data import ShardDataModule, ShardLoader, ShardMetaError, ShardStream, StreamSpec, expand_shards
from consolver.data.writer import make_shards
from consolver.schedules import FlowMatchingSchedule

from .conftest import FakeBackend, FakeReward, make_cfg

ROOT = Path(__file__).resolve().parents[2]
ALL_KEYS = {f"{i:010d}" for i in range(32)}
EXPECTED = FakeBackend().meta()


def _spec(urls, **kw) -> StreamSpec:
    return StreamSpec(**dict(dict(urls=urls, expected_meta=EXPECTED, batch_size=4, shuffle_buffer=8), **kw))


def _keys(loader) -> list:
    return [k for batch in loader for k in batch["key"]]


@pytest.mark.slow
def test_ranks_and_workers_read_disjoint_samples_that_cover_the_set(fake_shards, monkeypatch):
    urls = expand_shards(str(fake_shards))
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in ("0", "1"):  # real DataLoader worker processes, 2 per rank
        monkeypatch.setenv("RANK", rank)
        per_rank.append(_keys(ShardLoader(ShardStream(_spec(urls)), num_workers=2)))
    assert len(per_rank[0]) == len(set(per_rank[0])) == 16 and len(per_rank[1]) == 16
    assert not set(per_rank[0]) & set(per_rank[1]) and set(per_rank[0]) | set(per_rank[1]) == ALL_KEYS
    # each (rank, worker) pair alone: four disjoint quarters (webdataset reads WORKER/NUM_WORKERS)
    monkeypatch.setenv("NUM_WORKERS", "2")
    quarters = []
    for rank in ("0", "1"):
        for worker in ("0", "1"):
            monkeypatch.setenv("RANK", rank)
            monkeypatch.setenv("WORKER", worker)
            stream = ShardStream(_spec(urls))
            quarters.append({k for batch in stream for k in batch["key"]})
    assert [len(q) for q in quarters] == [8, 8, 8, 8] and set().union(*quarters) == ALL_KEYS


def test_shard_order_changes_per_epoch_but_is_reproducible(fake_shards):
    urls = expand_shards(str(fake_shards))
    loader = ShardLoader(ShardStream(_spec(urls)))
    first, second = _keys(loader), _keys(loader)
    assert sorted(first) == sorted(second) == sorted(ALL_KEYS) and first != second
    assert _keys(ShardLoader(ShardStream(_spec(urls)))) == first


@pytest.mark.slow
def test_resampled_mode_has_a_fixed_epoch_length_on_every_rank(fake_shards, monkeypatch):
    urls = expand_shards(str(fake_shards))
    monkeypatch.setenv("WORLD_SIZE", "2")
    counts = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        cfg = make_cfg(fake_shards, "data.resampled=true", "data.epoch_length=20", "data.num_workers=2")
        dm = ShardDataModule(cfg, backend=FakeBackend())
        dm.setup()
        loader = dm.train_dataloader()
        batches = list(loader)
        assert len(loader) == len(batches) == 6  # ceil(20 / (4 * 2)) = 3 batches per worker
        assert all(len(b["key"]) == 4 for b in batches)
        counts.append(len(batches))
    assert counts == [6, 6]


def test_resampled_mode_needs_an_epoch_length(fake_shards):
    with pytest.raises(ConfigError, match="data.epoch_length"):
        ShardDataModule(make_cfg(fake_shards, "data.resampled=true"), backend=FakeBackend()).setup()


def _corrupt(shard_dir: Path) -> None:
    """Flip a payload byte of sample 13, garble a member header of sample 14, truncate shard 6
    inside sample 25 (losing 25, 26, 27)."""
    path = shard_dir / "shard-000003.tar"
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    data = bytearray(path.read_bytes())
    target = members["0000000013.target.npy"]
    data[target.offset_data + target.size - 1] ^= 0xFF
    header = members["0000000014.noise.npy"].offset
    data[header: header + 512] = b"\x7f" * 512
    path.write_bytes(bytes(data))
    path = shard_dir / "shard-000006.tar"
    with tarfile.open(path) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "0000000025.noise.npy").offset_data + 100
    path.write_bytes(path.read_bytes()[:cut])


@pytest.mark.slow
def test_corrupt_shards_lose_only_the_bad_samples(shard_copy, caplog):
    _corrupt(shard_copy)
    cfg = make_cfg(shard_copy, "data.num_workers=2")
    dm = ShardDataModule(cfg, backend=FakeBackend())
    dm.setup()
    keys = _keys(dm.train_dataloader())
    lost = {f"{i:010d}" for i in (13, 14, 25, 26, 27)}
    assert sorted(keys) == sorted(ALL_KEYS - lost)
    assert dm.stats == {"skipped_samples": 3, "shard_errors": 1}
    # the same in-process, where the log is visible too
    loader = ShardLoader(ShardStream(_spec(expand_shards(str(shard_copy)), shuffle_buffer=0)))
    with caplog.at_level(logging.WARNING, logger="consolver.data"):
        assert sorted(_keys(loader)) == sorted(ALL_KEYS - lost)
    assert loader.stats == {"skipped_samples": 3, "shard_errors": 1}
    assert "checksum mismatch in 'target.npy'" in caplog.text and "no 'noise.npy'" in caplog.text
    assert "shard-000006.tar" in caplog.text and "skipped 3 corrupt samples, 1 shard errors" in caplog.text


def test_shards_that_are_not_tars_are_counted_and_logged(shard_copy, caplog):
    """ignore_zeros skips every invalid header, so a file with no tar member at all used to read
    as an empty shard: no error, no log, its samples silently lost."""
    junk = {
        "shard-000002.tar": b"just some text, not a tar\n" * 100,
        "shard-000003.tar": random.Random(0).randbytes(4096),
        "shard-000004.tar": b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>\n" * 20,
        "shard-000005.tar": gzip.compress(random.Random(1).randbytes(4096), mtime=0),
    }
    for name, data in junk.items():
        (shard_copy / name).write_bytes(data)
    loader = ShardLoader(ShardStream(_spec(expand_shards(str(shard_copy)), shuffle_buffer=0)))
    with caplog.at_level(logging.WARNING, logger="consolver.data"):
        keys = _keys(loader)
    assert sorted(keys) == sorted(ALL_KEYS - {f"{i:010d}" for i in range(8, 24)})
    assert loader.stats == {"skipped_samples": 0, "shard_errors": 4}
    for name in junk:
        assert f"{name}: ReadError: no valid tar member" in caplog.text


def _edit_meta(path: Path, index: int, old: bytes, new: bytes) -> None:
    """Replace ``old`` by ``new`` (same length) inside sample ``index``'s meta.json, in place."""
    assert len(old) == len(new)
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name == f"{index:010d}.meta.json")
    data = bytearray(path.read_bytes())
    body = bytes(data[member.offset_data: member.offset_data + member.size])
    assert body.count(old) == 1
    data[member.offset_data: member.offset_data + member.size] = body.replace(old, new)
    path.write_bytes(bytes(data))


def test_corrupt_meta_json_is_a_skipped_sample_not_a_fatal_meta_error(shard_copy, caplog):
    _edit_meta(shard_copy / "shard-000000.tar", 0, b'"schedule":"vp"', b'"schedule":"wp"')  # the sample setup() peeks at
    _edit_meta(shard_copy / "shard-000002.tar", 9, b'"index":9,', b'"index":8,')  # index no longer its key
    dm = ShardDataModule(make_cfg(shard_copy), backend=FakeBackend())
    dm.setup()
    with caplog.at_level(logging.WARNING, logger="consolver.data"):
        keys = _keys(dm.train_dataloader())
    assert sorted(keys) == sorted(ALL_KEYS - {"0000000000", "0000000009"})
    assert dm.stats == {"skipped_samples": 2, "shard_errors": 0}
    assert caplog.text.count("checksum mismatch in 'meta.json'") >= 2


def test_shards_of_another_schedule_are_refused_without_a_backend(tmp_path):
    """With no backend passed, the config alone says what the shards must be (toy: all of it)."""
    shipped = ROOT / "data" / "toy_shards"  # VP shards of the toy world
    base = [f"data.shard_dir={shipped}", "data.num_workers=0"]
    ShardDataModule(load_config(ROOT / "conf" / "toy_shards_tiny.yaml", base)).setup()
    flow = load_config(ROOT / "conf" / "toy_shards_tiny.yaml", base + ["backend.toy.schedule=flow"])
    with pytest.raises(ShardMetaError, match=r"schedule='vp'.*schedule='flow'"):
        ShardDataModule(flow).setup()
    other_world = load_config(ROOT / "conf" / "toy_shards_tiny.yaml", base + ["backend.toy.component_std=0.1"])
    with pytest.raises(ShardMetaError, match=r"'toy'.*\(backend.toy\)"):
        ShardDataModule(other_world).setup()


def test_missing_shard_paths_name_the_config_key(tmp_path):
    missing = tmp_path / "no-shards-here"
    with pytest.raises(ConfigError, match=rf"data.shard_dir=.*shard path '{missing}' does not exist"):
        ShardDataModule(make_cfg(missing), backend=FakeBackend()).setup()
    pattern = f"{missing}/shard-{{000000..000003}}.tar"
    cfg = make_cfg(tmp_path, f"data.train_shards='{pattern}'")
    with pytest.raises(ConfigError, match=r"data.train_shards=.*shard-000000.tar' \(and 3 more\) does not exist"):
        ShardDataModule(cfg, backend=FakeBackend()).setup()


@pytest.mark.slow
def test_meta_mismatch_stops_with_both_values(fake_shards, tmp_path):
    with pytest.raises(ShardMetaError, match=r"backend='fake'.*backend='toy' \(backend.name\)"):
        ShardDataModule(make_cfg(fake_shards)).setup()
    flow = FakeBackend()
    flow.schedule = FlowMatchingSchedule()
    with pytest.raises(ShardMetaError, match=r"schedule='vp'.*schedule='flow'"):
        ShardDataModule(make_cfg(fake_shards), backend=flow).setup()
    big = FakeBackend()
    big.resolution = 16
    with pytest.raises(ShardMetaError, match=r"resolution=8.*resolution=16"):
        ShardDataModule(make_cfg(fake_shards), backend=big).setup()
    with pytest.raises(ShardMetaError, match=r"training uses \['clip'\]"):
        ShardDataModule(make_cfg(fake_shards), backend=FakeBackend(), reward_names=["clip"]).setup()
    # a mismatching shard later in the stream (not the one setup() peeks at) is caught while reading
    other = FakeBackend()
    other.latent_shape = (2, 2, 8)
    make_shards(make_cfg(tmp_path / "other", "data.num_samples=4"), backend=other, reward=FakeReward())
    urls = [str(fake_shards / "shard-000000.tar"), str(tmp_path / "other" / "shard-000000.tar")]
    with pytest.raises(ShardMetaError, match=r"latent_shape=\[2, 2, 8\].*latent_shape=\[2, 4, 4\]"):
        _keys(ShardLoader(ShardStream(_spec(urls, shard_shuffle=False)), num_workers=1))


@pytest.mark.slow
def test_url_forms_and_batch_structure(fake_shards):
    brace = str(fake_shards / "shard-{000000..000003}.tar")
    pipe = f"pipe:cat {fake_shards}/shard-{{000004..000007}}.tar"
    urls = expand_shards(f"{brace}::{pipe}")
    assert len(urls) == 8 and urls[4] == f"pipe:cat {fake_shards}/shard-000004.tar"
    assert expand_shards(str(fake_shards)) == [str(fake_shards / f"shard-{s:06d}.tar") for s in range(8)]
    loader = ShardLoader(ShardStream(_spec(urls, load_target_image=True, batch_size=5)), num_workers=2)
    batches = list(loader)
    assert sorted(k for b in batches for k in b["key"]) == sorted(ALL_KEYS) and loader.stats["shard_errors"] == 0
    batch = batches[0]
    assert set(batch) == {"key", "index", "noise_seed", "prompt", "noise", "target_latent", "features", "target_image"}
    assert len(batch["key"]) == len(batch["prompt"]) == 5 and isinstance(batch["prompt"][0], str)
    assert batch["index"].dtype == batch["noise_seed"].dtype == torch.int64 and batch["index"].shape == (5,)
    assert batch["noise"].shape == batch["target_latent"].shape == (5, 2, 4, 4)
    assert batch["noise"].dtype == batch["target_latent"].dtype == torch.float32
    assert batch["features"]["fake_mean"].shape == (5, 3)
    assert batch["target_image"].shape == (5, 3, 8, 8) and batch["target_image"].dtype == torch.uint8


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`", "ignore:Your `IterableDataset` has `__len__`")
def test_lightning_trainer_consumes_the_datamodule(fake_shards):
    import lightning as L

    class Consumer(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.keys = []

        def training_step(self, batch, batch_idx):
            self.keys += batch["key"]
            return (self.w - batch["target_latent"].mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cfg = make_cfg(fake_shards, "data.resampled=true", "data.epoch_length=8")
    dm, model = ShardDataModule(cfg, backend=FakeBackend()), Consumer()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert len(model.keys) == 16 and trainer.global_step == 4 and dm.state_dict() == {"epoch": 2}
    assert dm.stats == {"skipped_samples": 0, "shard_errors": 0}
