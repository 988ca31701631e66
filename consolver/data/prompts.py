"""Prompt lists for making shards: a text file, a JSONL/parquet column, or the backend's own.

Editing backends also take a reference image per prompt: ``data.ref_image_column`` names a
JSONL/parquet column of image paths (relative paths are resolved against the prompt file).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from consolver.config import ConfigError, DataConfig

logger = logging.getLogger(__name__)


class PromptRecord(NamedTuple):
    text: str  # what the backend encodes (the instruction, for editing backends)
    ref_image: Optional[str] = None  # reference image path (editing backends)


def _read_text(path: Path, data: DataConfig) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise ConfigError(f"data.prompts={data.prompts!r}: not UTF-8 text (line {line}, byte {err.start}: {err.reason}); "
                          f"save the prompt file as UTF-8") from None


def _rows_jsonl(path: Path, data: DataConfig) -> List[dict]:
    rows = []
    for lineno, line in enumerate(_read_text(path, data).split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    return rows


def _rows_parquet(path: Path, columns: Sequence[str]) -> List[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"reading {path} needs pyarrow (pip install pyarrow), or use a .txt/.jsonl prompt file") from None
    return pq.read_table(path, columns=list(columns)).to_pylist()


def _records_from_rows(rows: List[dict], path: Path, data: DataConfig) -> List[PromptRecord]:
    records = []
    for n, row in enumerate(rows):
        for column in filter(None, (data.prompt_column, data.ref_image_column)):
            if column not in row:
                raise ConfigError(f"{path} row {n} has no column {column!r} (data.prompt_column / "
                                  f"data.ref_image_column); columns: {', '.join(map(str, row))}")
        ref = None
        if data.ref_image_column:
            ref = str(row[data.ref_image_column])
            ref = ref if Path(ref).is_absolute() else str(path.parent / ref)
        records.append(PromptRecord(str(row[data.prompt_column]), ref))
    return records


def load_prompts(data: DataConfig, backend=None) -> List[PromptRecord]:
    """The prompt list of ``data.prompts`` (``.txt``: one per line, blank lines skipped;
    ``.jsonl``/``.parquet``: ``data.prompt_column``), else ``backend.prompts(data.split)``."""
    if data.prompts is None:
        if backend is None or not hasattr(backend, "prompts"):
            name = getattr(backend, "name", None)
            raise ConfigError(f"data.prompts is not set and backend {name!r} has no prompt list of its own; "
                              f"set data.prompts to a .txt, .jsonl or .parquet file")
        if hasattr(backend, "prompt_records"):  # an editing toy world: instructions + its own reference PNGs
            records = list(backend.prompt_records(data.split, Path(data.shard_dir) / "refs"))
        else:
            records = [PromptRecord(str(p)) for p in backend.prompts(data.split)]
    else:
        path = Path(data.prompts)
        if not path.is_file():
            raise ConfigError(f"data.prompts={data.prompts!r}: file not found")
        if data.ref_image_column and path.suffix == ".txt":
            raise ConfigError("data.ref_image_column needs a .jsonl or .parquet prompt file, not .txt")
        if path.suffix == ".txt":
            text = _read_text(path, data)
            records = [PromptRecord(line.strip()) for line in text.splitlines() if line.strip()]
        elif path.suffix == ".jsonl":
            records = _records_from_rows(_rows_jsonl(path, data), path, data)
        elif path.suffix == ".parquet":
            columns = [c for c in (data.prompt_column, data.ref_image_column) if c]
            records = _records_from_rows(_rows_parquet(path, columns), path, data)
        else:
            raise ConfigError(f"data.prompts={data.prompts!r}: unknown format; use .txt, .jsonl or .parquet")
    if not records:
        raise ConfigError(f"no prompts found in {data.prompts or 'the backend prompt list'}")
    logger.info("%d prompts from %s", len(records), data.prompts or f"the backend's {data.split!r} list")
    return records


def load_ref_images(records: Sequence[PromptRecord], resolution: int) -> Optional[np.ndarray]:
    """uint8 ``[B, resolution, resolution, 3]`` reference images (bicubic resize), or ``None``
    when the records carry none. Mixing records with and without images is an error."""
    paths = [r.ref_image for r in records]
    if all(p is None for p in paths):
        return None
    if any(p is None for p in paths):
        raise ConfigError("some prompts have a reference image and some do not")
    images = []
    for p in paths:
        try:
            with Image.open(p) as image:
                image = image.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
                images.append(np.asarray(image, dtype=np.uint8))
        except OSError as err:
            raise ConfigError(f"cannot read reference image {p!r}: {err}") from None
    return np.stack(images)
