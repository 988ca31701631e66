"""make_shards: contents, determinism, rank independence, resuming, prompt sources, editing."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from consolver.config import ConfigError, load_config
from consolver.data import PromptRecord, ShardDataModule, load_prompts, make_noise, make_shards, sample_seed
from consolver.data.writer import ReferenceSolver, sample_meta

from .conftest import PROMPTS, FakeBackend, FakeReward, make_cfg


def _members(path: Path) -> dict:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _shard_bytes(shard_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(shard_dir.glob("shard-*"))}


def _all_samples(cfg, backend=None, **overrides) -> dict:
    dm = ShardDataModule(cfg, backend=backend or FakeBackend(), **overrides)
    dm.setup()
    out = {}
    for batch in dm.train_dataloader():
        for b, key in enumerate(batch["key"]):
            out[key] = {k: (v[b] if not isinstance(v, dict) else {n: t[b] for n, t in v.items()}) for k, v in batch.items()}
    return out


def test_shards_hold_what_the_solver_made_bit_exact(fake_shards):
    assert sorted(p.name for p in fake_shards.iterdir()) == ["dataset.json"] + [f"shard-{s:06d}.tar" for s in range(8)]
    members = _members(fake_shards / "shard-000001.tar")
    assert sorted(members)[:7] == ["0000000004.feat.fake_mean.npy", "0000000004.meta.json", "0000000004.noise.npy",
                                   "0000000004.prompt.txt", "0000000004.target.npy", "0000000004.target.png",
                                   "0000000005.feat.fake_mean.npy"]
    with tarfile.open(fake_shards / "shard-000001.tar") as tar:
        assert {(m.mtime, m.uname, m.mode) for m in tar.getmembers()} == {(0, "consolver", 0o444)}
    meta = json.loads(members["0000000004.meta.json"])
    assert meta["backend"] == "fake" and meta["schedule"] == "vp" and meta["reference_solver"] == "dpmsolver++"
    assert meta["reference_steps"] == 8 and meta["guidance"] == 3.0 and meta["noise_seed"] == sample_seed(0, 4)
    # the written bytes are exactly what the solver encodes for the same batches (4..6, 7)
    cfg = make_cfg(fake_shards)
    solver = ReferenceSolver(cfg, FakeBackend(), [PromptRecord(p) for p in PROMPTS], FakeReward())
    again = solver([4, 5, 6]) + solver([7])
    for sample in again:
        for name, data in sample.items():
            if name != "__key__":
                assert members[f"{sample['__key__']}.{name}"] == data, name
    # and read back through the loader they are the same tensors
    samples = _all_samples(cfg)
    assert sorted(samples) == [f"{i:010d}" for i in range(32)]
    for i in (0, 5, 31):
        s = samples[f"{i:010d}"]
        assert s["prompt"] == PROMPTS[i % len(PROMPTS)] and int(s["noise_seed"]) == sample_seed(0, i)
        assert torch.equal(s["noise"], make_noise([sample_seed(0, i)], (2, 4, 4))[0])
    image = FakeBackend().decode(samples["0000000005"]["target_latent"][None])
    assert torch.equal(samples["0000000005"]["features"]["fake_mean"], FakeReward().features(image)[0])


def test_same_config_same_bytes_for_any_world_size(fake_shards, tmp_path):
    cfg = make_cfg(tmp_path / "two_ranks")
    for rank in (1, 0):
        make_shards(cfg, rank, 2, backend=FakeBackend(), reward=FakeReward())
    assert _shard_bytes(tmp_path / "two_ranks") == _shard_bytes(fake_shards)


def test_interrupted_run_resumes_to_the_uninterrupted_result(fake_shards, tmp_path, caplog):
    cfg = make_cfg(tmp_path / "resumed")
    seen = []

    def crash(n):
        seen.append(n)
        if sum(seen) >= 10:  # dies inside shard 2 (samples 8..11)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_shards(cfg, backend=FakeBackend(), reward=FakeReward(), on_progress=crash)
    names = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert names == ["dataset.json", "shard-000000.tar", "shard-000001.tar"]  # nothing half-written is kept
    # a hard kill (SIGKILL, node loss) leaves a half-written file behind: emulate one for shard 5
    half = (fake_shards / "shard-000005.tar").read_bytes()
    (tmp_path / "resumed" / "shard-000005.tar.partial").write_bytes(half[: len(half) // 2])
    made = []
    with caplog.at_level(logging.WARNING, logger="consolver.data.writer"):
        summary = make_shards(cfg, backend=FakeBackend(), reward=FakeReward(), on_progress=made.append)
    assert summary["made"] == [2, 3, 4, 5, 6, 7] and summary["skipped"] == 2 and sum(made) == 24
    assert "rewriting half-written shard" in caplog.text and "shard-000005.tar.partial" in caplog.text
    assert _shard_bytes(tmp_path / "resumed") == _shard_bytes(fake_shards)
    assert make_shards(cfg, backend=FakeBackend(), reward=FakeReward())["made"] == []


def test_resuming_with_another_config_is_refused(shard_copy):
    with pytest.raises(ConfigError, match=r"another config \(noise_base_seed: 0 -> 1"):
        make_shards(make_cfg(shard_copy, "data.seed=1"), backend=FakeBackend(), reward=FakeReward())


def test_corrupt_manifest_names_the_file(shard_copy):
    (shard_copy / "dataset.json").write_text('{"format_version": 1, "fingerp')
    with pytest.raises(ConfigError, match=rf"shard manifest '{shard_copy / 'dataset.json'}' is corrupt.*data.shard_dir"):
        make_shards(make_cfg(shard_copy), backend=FakeBackend(), reward=FakeReward())
    (shard_copy / "dataset.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"dataset.json' is corrupt \(not a JSON object\)"):
        make_shards(make_cfg(shard_copy), backend=FakeBackend(), reward=FakeReward())


TOY_FAST = ["backend.toy.renders_per_prompt=2", "backend.toy.num_train_prompts=2", "backend.toy.num_heldout_prompts=1",
            "reference.num_steps=4", "data.num_samples=4", "data.samples_per_shard=4", "data.solve_batch_size=4",
            "rewards=[{name: pixel_psnr}]", "data.num_workers=0"]


def test_prompts_are_checked_before_the_manifest_is_written(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\na mauve circle on the left\n", encoding="utf-8")
    cfg = load_config(None, TOY_FAST + [f"data.shard_dir={tmp_path / 'shards'}", f"data.prompts={prompts}"])
    with pytest.raises(ConfigError, match=r"prompt 1 of data.prompts=.*prompts.txt' cannot be used: unknown color 'mauve'"):
        make_shards(cfg)
    assert not (tmp_path / "shards" / "dataset.json").exists()
    prompts.write_text("a red circle on the left\na blue circle on the left\n", encoding="utf-8")  # fixed: not "another config"
    assert make_shards(cfg)["made"] == [0]


def test_prompt_file_that_is_not_utf8_names_file_and_key(tmp_path):
    for suffix in (".txt", ".jsonl"):
        path = tmp_path / f"latin1{suffix}"
        path.write_bytes("a caf\xe9 on the left\n".encode("latin-1"))
        with pytest.raises(ConfigError, match=rf"data.prompts='{path}': not UTF-8 text \(line 1, byte 5"):
            load_prompts(make_cfg(tmp_path, f"data.prompts={path}").data)


class NaNBackend(FakeBackend):
    def predict(self, x, t, cond, guidance):
        out = super().predict(x, t, cond, guidance)
        out[1] = float("nan")  # the second sample of every batch diverges
        return out


def test_non_finite_targets_are_never_written(tmp_path):
    cfg = make_cfg(tmp_path / "shards", "data.num_samples=4")
    with pytest.raises(ValueError, match=r"non-finite latents for samples \[1\]"):
        make_shards(cfg, backend=NaNBackend(), reward=FakeReward())
    assert not list((tmp_path / "shards").glob("shard-*"))


def test_shard_meta_records_the_precision_the_backend_used(tmp_path):
    backend = FakeBackend()
    assert sample_meta(make_cfg(tmp_path), backend)["dtype"] == "float32"
    backend.dtype = "bfloat16"  # e.g. a backend that computes in bf16 whatever the config asked for
    assert sample_meta(make_cfg(tmp_path), backend)["dtype"] == "bfloat16"


def test_prompt_sources(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \n", encoding="utf-8")
    cfg = make_cfg(tmp_path, f"data.prompts={txt}")
    assert [r.text for r in load_prompts(cfg.data)] == ["a cat", "a dog"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"caption": "x", "id": 1}\n{"caption": "y"}\n', encoding="utf-8")
    cfg = make_cfg(tmp_path, f"data.prompts={jsonl}", "data.prompt_column=caption")
    assert [r.text for r in load_prompts(cfg.data)] == ["x", "y"]
    with pytest.raises(ConfigError, match="no column 'prompt'"):
        load_prompts(make_cfg(tmp_path, f"data.prompts={jsonl}").data)
    parquet = tmp_path / "p.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": ["p0", "p1"]}), parquet)
        assert [r.text for r in load_prompts(make_cfg(tmp_path, f"data.prompts={parquet}").data)] == ["p0", "p1"]
    except ImportError:
        parquet.write_bytes(b"PAR1")
        with pytest.raises(ConfigError, match="needs pyarrow"):
            load_prompts(make_cfg(tmp_path, f"data.prompts={parquet}").data)
    assert [r.text for r in load_prompts(make_cfg(tmp_path).data, FakeBackend())] == PROMPTS
    with pytest.raises(ConfigError, match="data.prompts is not set"):
        load_prompts(make_cfg(tmp_path).data, object())


def test_editing_shards_carry_reference_images(tmp_path):
    rows = []
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (20, 12), color).save(tmp_path / f"ref{i}.png")
        rows.append(json.dumps({"instruction": f"make it {i}", "image": f"ref{i}.png"}))
    (tmp_path / "edits.jsonl").write_text("\n".join(rows) + "\n")
    cfg = make_cfg(tmp_path / "shards", f"data.prompts={tmp_path / 'edits.jsonl'}", "data.prompt_column=instruction",
                   "data.ref_image_column=image", "data.num_samples=4")
    make_shards(cfg, backend=FakeBackend(editing=True), reward=FakeReward())
    samples = _all_samples(cfg, FakeBackend(editing=True))
    s = samples["0000000001"]
    assert s["instruction"] == s["prompt"] == "make it 1"
    assert s["ref_image"].dtype == torch.uint8 and s["ref_image"].shape == (3, 8, 8)
    assert torch.equal(s["ref_image"][:, 0, 0], torch.tensor([0, 0, 255], dtype=torch.uint8))
    assert samples["0000000000"]["ref_image"][0].float().mean() == 255
    members = _members(tmp_path / "shards" / "shard-000000.tar")
    assert members["0000000003.instruction.txt"] == b"make it 1" and "0000000003.ref.png" in members
