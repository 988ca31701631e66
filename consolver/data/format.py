"""The shard sample format: one sample = the tar members sharing a ``__key__``.

Members of sample ``<key>`` (``<key>`` = the global sample index, 10 digits):

=====================  =====================================================================
``prompt.txt``         UTF-8 text the backend encodes (the instruction, for editing backends)
``noise.npy``          float32 ``[*latent_shape]``: exactly the initial noise of the solve
``target.npy``         float32 ``[*latent_shape]``: the full-step reference solve's latent
``target.png``         8-bit RGB ``[H, W]``: ``decode(target)`` rounded to uint8
``feat.<name>.npy``    each configured reward's ``features(decode(target))`` (float image,
                       not the rounded PNG), ``[*feature_shape]``, float32 when it was bf16
``ref.png``            editing backends: the reference image passed to ``encode``
``instruction.txt``    editing backends: the instruction (same text as ``prompt.txt``)
``meta.json``          backend meta (``Backend.meta()``), guidance, reference solver/steps,
                       seeds, format version, the CRC32 of every other member, and
                       ``meta_crc32``: the CRC32 of its own canonical JSON without that key
=====================  =====================================================================

Everything is encoded deterministically (sorted JSON, fixed PNG settings), so the same inputs
give the same bytes. A sample whose ``meta.json`` fails its own checksum, or whose ``index``
is not its key, is corrupt (skipped), never taken for a dataset of another backend.
"""

from __future__ import annotations

import io
import json
import re
import zlib
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from consolver.config import ConfigError

#: Bumped when the member layout or meaning changes; readers refuse newer versions.
FORMAT_VERSION = 1
#: Meta keys compared between shards and the training config, with the config key to name.
META_CONFIG_KEYS = {"backend": "backend.name", "resolution": "backend.resolution",
                    "schedule": "the backend's schedule", "latent_shape": "the backend's latent_shape",
                    "prediction_type": "the backend's prediction type", "toy": "backend.toy"}
FEATURE_PREFIX = "feat."
#: Meta keys every shard has; other expected keys are compared only when the shard records them
#: (shards made before a key was introduced lack it).
REQUIRED_META_KEYS = ("backend",)
META_CRC_KEY = "meta_crc32"


class CorruptSampleError(ValueError):
    """A sample that cannot be decoded (missing member, bad bytes, checksum mismatch)."""


class ShardMetaError(ConfigError):
    """Shards made for a different backend/schedule/resolution than the training config."""


def sample_key(index: int) -> str:
    """The ``__key__`` of sample ``index``: zero-padded so keys sort like indices."""
    return f"{index:010d}"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of a uint8 ``[H, W, 3]`` array (fixed compression level: deterministic bytes)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` float in [0, 1] -> uint8 ``[B, H, W, 3]`` (round to nearest)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """CPU numpy copy; bfloat16 (which numpy lacks) becomes float32."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def encode_sample(
    index: int,
    prompt: str,
    noise: np.ndarray,
    target: np.ndarray,
    target_image: np.ndarray,
    features: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    ref_image: Optional[np.ndarray] = None,
) -> Dict[str, Any]:
    """Members of one sample as bytes, plus ``__key__``; ``meta.json`` gets ``index``, the
    feature names and the CRC32 of every other member. Images are uint8 ``[H, W, 3]``."""
    members = {
        "prompt.txt": prompt.encode("utf-8"),
        "noise.npy": npy_bytes(noise.astype(np.float32, copy=False)),
        "target.npy": npy_bytes(target.astype(np.float32, copy=False)),
        "target.png": png_bytes(target_image),
    }
    for name, value in features.items():
        members[f"{FEATURE_PREFIX}{name}.npy"] = npy_bytes(value)
    if ref_image is not None:
        members["ref.png"] = png_bytes(ref_image)
        members["instruction.txt"] = prompt.encode("utf-8")
    full_meta = dict(meta, index=index, features=sorted(features),
                     crc32={name: zlib.crc32(data) for name, data in sorted(members.items())})
    full_meta[META_CRC_KEY] = zlib.crc32(meta_json(full_meta))
    members["meta.json"] = meta_json(full_meta)
    return {"__key__": sample_key(index), **members}


def meta_json(meta: Mapping[str, Any]) -> bytes:
    """Canonical ``meta.json`` bytes: sorted keys, no spaces, and no NaN/inf (``ValueError``)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def parse_meta(data: bytes, key: Optional[str] = None, verify_checksum: bool = True) -> Dict[str, Any]:
    """The ``meta.json`` of sample ``key`` as a dict, checked: valid JSON object, its own
    checksum (``meta_crc32``, when recorded and ``verify_checksum``), ``index`` matching ``key``.
    Raises :class:`CorruptSampleError`."""
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptSampleError(f"sample {key!r}: unreadable meta.json ({err})") from None
    if not isinstance(meta, dict):
        raise CorruptSampleError(f"sample {key!r}: meta.json is not an object")
    if verify_checksum and META_CRC_KEY in meta:
        try:
            crc = zlib.crc32(meta_json({k: v for k, v in meta.items() if k != META_CRC_KEY}))
        except ValueError:  # NaN/inf: never written, so a corruption
            crc = None
        if crc != meta[META_CRC_KEY]:
            raise CorruptSampleError(f"sample {key!r}: checksum mismatch in 'meta.json'")
    if key is not None and "index" in meta:
        index = meta["index"]
        if not isinstance(index, int) or isinstance(index, bool) or index < 0 or sample_key(index) != key:
            raise CorruptSampleError(f"sample {key!r}: meta.json says index {index!r}, which is not its key")
    return meta


def _normalize(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, numpy scalars rejected early


def check_meta(meta: Mapping[str, Any], expected: Mapping[str, Any], source: str = "shards") -> None:
    """Raise :class:`ShardMetaError` naming both values when a key of ``expected`` differs.

    Every key of ``expected`` that the shard meta records is compared; a key it lacks is an
    error only for ``REQUIRED_META_KEYS`` (older shards lack keys added since)."""
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ShardMetaError(f"{source} have format_version {version!r}; this reader supports <= {FORMAT_VERSION}")
    for key, want in expected.items():
        if key not in meta and key not in REQUIRED_META_KEYS:
            continue
        have = meta.get(key)
        if _normalize(have) != _normalize(want):
            where = META_CONFIG_KEYS.get(key, key)
            raise ShardMetaError(
                f"shard meta mismatch for {key!r}: {source} were made with {key}={have!r}, but the training "
                f"config has {key}={want!r} ({where}); remake the shards or fix the config")


def check_features(meta: Mapping[str, Any], required: Sequence[str], source: str = "shards") -> None:
    """Raise :class:`ShardMetaError` when a reward used for training has no cached features."""
    missing = [name for name in required if name not in meta.get("features", ())]
    if missing:
        raise ShardMetaError(f"{source} cache target features for rewards {meta.get('features')}, but training "
                             f"uses {missing}; remake the shards with these rewards configured")


_NPY_HEADER = re.compile(rb"\{'descr': '([^']+)', 'fortran_order': (True|False), 'shape': \(([0-9, ]*)\), *\} *\n?")


def _load_npy(data: bytes) -> torch.Tensor:
    """An ``.npy`` file's array as a tensor.

    Parses the header with a regular expression instead of ``np.load``: numpy evaluates npy
    headers with ``ast.literal_eval``, which on CPython 3.11 < 3.11.9 can fail spuriously in
    DataLoader workers ("AST constructor recursion depth mismatch"), and costs ~20 us per array.
    Headers this does not recognise fall back to ``np.load``.
    """
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not an .npy file")
    start = 10 if data[6] == 1 else 12
    end = start + int.from_bytes(data[8:start], "little")
    match = _NPY_HEADER.fullmatch(data[start:end])
    if match is None:
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    dtype = np.dtype(match[1].decode("ascii"))
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    shape = tuple(int(n) for n in match[3].split(b",") if n.strip())
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - end != count * dtype.itemsize:
        raise ValueError(f"npy payload has {len(data) - end} bytes, header says {count * dtype.itemsize}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    array = array.reshape(shape, order="F" if match[2] == b"True" else "C")
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), order="C"))  # writable native-order copy


def _load_png(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        array = np.array(image.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1)  # uint8 [3, H, W]


def _member(raw: Mapping[str, Any], name: str) -> bytes:
    if name not in raw:
        raise CorruptSampleError(f"sample {raw.get('__key__')!r} has no {name!r} member")
    return raw[name]


def decode_sample(
    raw: Mapping[str, Any],
    expected_meta: Mapping[str, Any],
    required_features: Optional[Sequence[str]] = None,
    load_target_image: bool = False,
    verify_checksums: bool = True,
) -> Dict[str, Any]:
    """Decode the members ``raw`` (as grouped by webdataset) into one sample.

    Returns ``{"key": str, "index": int, "noise_seed": int, "prompt": str, "noise": float32
    [*latent_shape], "target_latent": float32 [*latent_shape], "features": {name: [...]},
    ["target_image": uint8 [3, H, W]], ["ref_image": uint8 [3, H, W], "instruction": str]}``.
    ``required_features=None`` loads every cached feature. Raises :class:`ShardMetaError`
    (fatal: wrong dataset) or :class:`CorruptSampleError` (skip this sample).
    """
    source = f"shard {raw.get('__url__', '?')}"
    meta = parse_meta(_member(raw, "meta.json"), raw.get("__key__"), verify_checksums)
    check_meta(meta, expected_meta, source)
    names = list(meta.get("features", ())) if required_features is None else list(required_features)
    check_features(meta, names, source)
    if verify_checksums:
        for name, crc in meta.get("crc32", {}).items():
            if zlib.crc32(_member(raw, name)) != crc:
                raise CorruptSampleError(f"sample {raw.get('__key__')!r}: checksum mismatch in {name!r}")
    try:
        sample = {
            "key": raw["__key__"], "index": int(meta["index"]), "noise_seed": int(meta["noise_seed"]),
            "prompt": _member(raw, "prompt.txt").decode("utf-8"),
            "noise": _load_npy(_member(raw, "noise.npy")),
            "target_latent": _load_npy(_member(raw, "target.npy")),
            "features": {n: _load_npy(_member(raw, f"{FEATURE_PREFIX}{n}.npy")) for n in names},
        }
        if load_target_image:
            sample["target_image"] = _load_png(_member(raw, "target.png"))
        if "ref.png" in meta.get("crc32", raw):
            sample["ref_image"] = _load_png(_member(raw, "ref.png"))
            sample["instruction"] = _member(raw, "instruction.txt").decode("utf-8")
    except CorruptSampleError:
        raise
    except (KeyError, ValueError, OSError, EOFError, SyntaxError, Image.DecompressionBombError) as err:
        # bad npy/png/utf-8 bytes, a PNG declaring a huge size, missing meta fields
        raise CorruptSampleError(f"sample {raw.get('__key__')!r}: {type(err).__name__}: {err}") from None
    return sample
