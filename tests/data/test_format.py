"""The sample format: bit-exact round trips, checksums, meta checks, seeds."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch

from consolver.data.format import (CorruptSampleError, ShardMetaError, check_meta, decode_sample, encode_sample,
                                   FORMAT_VERSION, meta_json)
from consolver.data.writer import make_noise, sample_seed

META = {"backend": "fake", "schedule": "vp", "resolution": 8, "latent_shape": [2, 4, 4], "format_version": FORMAT_VERSION,
        "noise_seed": 123}


def _sample(rng: np.random.Generator, ref: bool = False) -> dict:
    return encode_sample(
        index=7, prompt="a red circle — ünïcode", noise=rng.standard_normal((2, 4, 4), dtype=np.float32),
        target=rng.standard_normal((2, 4, 4), dtype=np.float32),
        target_image=rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        features={"a": rng.standard_normal((3,), dtype=np.float32), "b": rng.integers(0, 9, (2, 2)).astype(np.int64)},
        meta=META, ref_image=rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) if ref else None)


@pytest.mark.parametrize("ref", [False, True])
def test_encode_decode_round_trip_is_bit_exact(ref):
    rng = np.random.default_rng(0)
    raw = _sample(rng, ref)
    rng = np.random.default_rng(0)  # same draws again, to compare against
    noise, target = rng.standard_normal((2, 4, 4), dtype=np.float32), rng.standard_normal((2, 4, 4), dtype=np.float32)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    feat_a, feat_b = rng.standard_normal((3,), dtype=np.float32), rng.integers(0, 9, (2, 2)).astype(np.int64)
    ref_image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) if ref else None
    out = decode_sample(raw, {"backend": "fake"}, load_target_image=True)
    assert out["key"] == "0000000007" and out["index"] == 7 and out["noise_seed"] == 123
    assert out["prompt"] == "a red circle — ünïcode"
    assert torch.equal(out["noise"], torch.from_numpy(noise)) and out["noise"].dtype == torch.float32
    assert torch.equal(out["target_latent"], torch.from_numpy(target))
    assert torch.equal(out["target_image"], torch.from_numpy(image).permute(2, 0, 1))
    assert torch.equal(out["features"]["a"], torch.from_numpy(feat_a))
    assert torch.equal(out["features"]["b"], torch.from_numpy(feat_b)) and out["features"]["b"].dtype == torch.int64
    if ref:
        assert torch.equal(out["ref_image"], torch.from_numpy(ref_image).permute(2, 0, 1))
        assert out["instruction"] == out["prompt"]
    else:
        assert "ref_image" not in out and "instruction" not in out


def test_encoding_is_deterministic():
    assert _sample(np.random.default_rng(1)) == _sample(np.random.default_rng(1))


def test_checksum_mismatch_and_missing_member_are_corrupt():
    raw = _sample(np.random.default_rng(0))
    flipped = bytearray(raw["target.npy"])
    flipped[-1] ^= 0x01  # a bit flip inside the float payload still parses as npy
    with pytest.raises(CorruptSampleError, match="checksum mismatch in 'target.npy'"):
        decode_sample(dict(raw, **{"target.npy": bytes(flipped)}), {})
    # without checksums the flip goes unnoticed: this is what the CRC is for
    assert decode_sample(dict(raw, **{"target.npy": bytes(flipped)}), {}, verify_checksums=False)
    with pytest.raises(CorruptSampleError, match="no 'noise.npy'"):
        decode_sample({k: v for k, v in raw.items() if k != "noise.npy"}, {})
    with pytest.raises(CorruptSampleError, match="meta.json"):
        decode_sample(dict(raw, **{"meta.json": b"{not json"}), {})


def test_meta_json_is_checksummed_and_its_index_must_be_its_key():
    raw = _sample(np.random.default_rng(0))
    assert b'"meta_crc32":' in raw["meta.json"]
    for old, new in ((b'"schedule":"vp"', b'"schedule":"wp"'), (b'"index":7', b'"index":6'), (b'"noise_seed":123', b'"noise_seed":124')):
        changed = dict(raw, **{"meta.json": raw["meta.json"].replace(old, new)})
        with pytest.raises(CorruptSampleError, match="checksum mismatch in 'meta.json'"):
            decode_sample(changed, {"schedule": "vp"})
    # shards without the meta checksum (made before it existed) still get the key/index check
    meta = json.loads(raw["meta.json"])
    del meta["meta_crc32"]
    old_format = dict(raw, **{"meta.json": meta_json(meta)})
    assert decode_sample(old_format, {})["index"] == 7
    with pytest.raises(CorruptSampleError, match="index 6, which is not its key"):
        decode_sample(dict(old_format, **{"meta.json": meta_json(dict(meta, index=6))}), {})


def _png_declaring(width: int, height: int, png: bytes) -> bytes:
    """``png`` with its IHDR size replaced (and the chunk CRC fixed, so only the size is wrong)."""
    data = bytearray(png)
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def test_png_declaring_a_huge_size_is_a_corrupt_sample():
    raw = _sample(np.random.default_rng(0))
    bomb = dict(raw, **{"target.png": _png_declaring(70000, 70000, raw["target.png"])})
    with pytest.raises(CorruptSampleError, match="DecompressionBombError"):
        decode_sample(bomb, {}, load_target_image=True, verify_checksums=False)


def test_identifying_keys_are_compared_whenever_both_sides_have_them():
    expected = {"backend": "fake", "schedule": "vp", "prediction_type": "epsilon", "latent_shape": [2, 4, 4]}
    check_meta(META, expected)  # META (an older shard) records no prediction_type: nothing to compare
    with pytest.raises(ShardMetaError, match=r"prediction_type='epsilon'.*prediction_type='v_prediction'"):
        check_meta(dict(META, prediction_type="epsilon"), dict(expected, prediction_type="v_prediction"))
    with pytest.raises(ShardMetaError, match=r"backend=None.*backend='fake'"):  # but every shard names its backend
        check_meta({k: v for k, v in META.items() if k != "backend"}, expected)


def test_meta_mismatch_names_both_values():
    with pytest.raises(ShardMetaError, match=r"backend='fake'.*backend='sd15' \(backend.name\)"):
        check_meta(META, {"backend": "sd15"})
    with pytest.raises(ShardMetaError, match=r"resolution=8.*resolution=512"):
        check_meta(META, {"resolution": 512})
    with pytest.raises(ShardMetaError, match=r"schedule='vp'.*schedule='flow'"):
        check_meta(META, {"schedule": "flow"})
    check_meta(META, {"latent_shape": (2, 4, 4), "backend": "fake"})  # tuple vs list is not a mismatch
    with pytest.raises(ShardMetaError, match="format_version"):
        check_meta(dict(META, format_version=FORMAT_VERSION + 1), {})
    raw = _sample(np.random.default_rng(0))
    with pytest.raises(ShardMetaError, match=r"features for rewards \['a', 'b'\].*\['clip'\]"):
        decode_sample(raw, {}, required_features=["a", "clip"])
    assert json.loads(raw["meta.json"])["features"] == ["a", "b"]


def test_sample_seeds_and_noise_do_not_depend_on_batching():
    seeds = [sample_seed(0, i) for i in range(6)]
    assert len(set(seeds)) == 6 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(0, 3) == seeds[3] and sample_seed(1, 3) != seeds[3]
    whole = make_noise(seeds, (2, 4, 4))
    parts = torch.cat([make_noise(seeds[:1], (2, 4, 4)), make_noise(seeds[1:4], (2, 4, 4)), make_noise(seeds[4:], (2, 4, 4))])
    assert whole.dtype == torch.float32 and torch.equal(whole, parts)
    assert torch.equal(make_noise(seeds[::-1], (2, 4, 4)), whole.flip(0))
