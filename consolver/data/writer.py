"""Making shards: prompts -> seeded noise -> full-step reference solve -> WebDataset shards.

Work unit = one shard. Shard ``s`` holds samples ``[s * samples_per_shard, ...)``; sample
``i`` has prompt ``prompts[i % len(prompts)]`` and noise drawn from its own generator seeded
by :func:`sample_seed` (``data.seed``, ``i``), so every byte of a shard depends only on the
config, never on the rank, world size or which shards were made before. Rank ``r`` of ``W``
makes shards ``s`` with ``s % W == r`` (no communication between ranks).

Resuming: a shard is written as ``shard-XXXXXX.tar.partial`` and renamed to
``shard-XXXXXX.tar`` only once complete (atomic), so finished shards are skipped and a
half-written one (a killed run) is rewritten. ``dataset.json`` in the shard directory
records the config fingerprint; resuming with a different config is an error.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import webdataset as wds

from consolver.config import Config, ConfigError, to_container
from consolver.data.format import FORMAT_VERSION, encode_sample, to_numpy, to_uint8_hwc
from consolver.data.prompts import PromptRecord, load_prompts, load_ref_images

logger = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"
PARTIAL_SUFFIX = ".partial"
MANIFEST = "dataset.json"


def sample_seed(base_seed: int, index: int) -> int:
    """The noise seed of sample ``index``: a 63-bit hash of ``(base_seed, index)``."""
    if base_seed < 0 or index < 0:
        raise ValueError(f"seeds and indices must be >= 0, got base_seed={base_seed}, index={index}")
    hi, lo = np.random.SeedSequence([base_seed, index]).generate_state(2, np.uint32)
    return ((int(hi) << 32) | int(lo)) & (2**63 - 1)


def make_noise(seeds: Sequence[int], latent_shape: Sequence[int]) -> torch.Tensor:
    """Standard normal float32 ``[B, *latent_shape]`` on the CPU, row ``b`` from its own
    ``torch.Generator`` seeded with ``seeds[b]`` (independent of the batch it sits in)."""
    rows = [torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32)
            for s in seeds]
    return torch.stack(rows) if rows else torch.empty(0, *latent_shape)


def resolve_rank(rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """``(rank, world_size)`` from the arguments, else torchrun's ``RANK``/``WORLD_SIZE``, else (0, 1)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


@dataclass(frozen=True)
class ShardPlan:
    """Which samples go into which shard file."""

    shard_dir: Path
    num_samples: int
    samples_per_shard: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.samples_per_shard)

    def path(self, shard: int) -> Path:
        return self.shard_dir / (SHARD_PATTERN % shard)

    def indices(self, shard: int) -> range:
        start = shard * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, self.num_samples))

    def shards_for_rank(self, rank: int, world_size: int) -> List[int]:
        return list(range(rank, self.num_shards, world_size))

    def pending(self, rank: int, world_size: int) -> List[int]:
        """This rank's shards that are not complete yet."""
        return [s for s in self.shards_for_rank(rank, world_size) if not self.path(s).is_file()]

    def brace_pattern(self) -> str:
        """All shards as one brace pattern, e.g. ``<dir>/shard-{000000..000003}.tar``."""
        last = SHARD_PATTERN % (self.num_shards - 1)
        first = SHARD_PATTERN % 0
        stem, ext = first[: first.index("0")], first[first.rindex("0") + 1:]
        digits = last[len(stem): len(last) - len(ext)]
        return str(self.shard_dir / f"{stem}{{{'0' * len(digits)}..{digits}}}{ext}")


def plan_for(cfg: Config) -> ShardPlan:
    return ShardPlan(Path(cfg.data.shard_dir), cfg.data.num_samples, cfg.data.samples_per_shard)


#: Keys of ``meta.json`` that the writer owns (a backend's ``meta()`` must not use them).
WRITER_META_KEYS = ("format_version", "guidance", "reference_solver", "reference_steps", "timestep_spacing",
                    "noise_base_seed", "noise_seed", "dtype", "index", "features", "crc32", "meta_crc32")


def sample_meta(cfg: Config, backend) -> Dict[str, Any]:
    """Meta shared by every sample of a dataset: ``backend.meta()`` plus the solve settings
    (``meta.json`` adds ``noise_seed``, ``index``, ``features`` and ``crc32``)."""
    clash = sorted(set(backend.meta()) & set(WRITER_META_KEYS))
    if clash:
        raise ValueError(f"backend {backend.name!r} meta() uses keys reserved for shard meta: {clash}")
    return dict(
        backend.meta(),
        format_version=FORMAT_VERSION,
        guidance=float(cfg.guidance),
        reference_solver=cfg.reference.solver,
        reference_steps=int(cfg.reference.num_steps),
        timestep_spacing=cfg.solver.timestep_spacing,
        noise_base_seed=int(cfg.data.seed),
        dtype=str(getattr(backend, "dtype", "float32")),  # what the backend computes in, not only what was asked
    )


def _weights_sha256(module) -> Optional[str]:
    """Hash of a module's parameters and buffers (reward features depend on the weights)."""
    if module is None or not hasattr(module, "state_dict"):
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(to_numpy(tensor.reshape(-1)).tobytes())
    return digest.hexdigest()


def fingerprint(cfg: Config, backend, prompts: Sequence[PromptRecord], reward=None) -> Dict[str, Any]:
    """Everything that changes the bytes of the shards (compared when resuming)."""
    digest = hashlib.sha256("\n".join(f"{p.text}\t{p.ref_image or ''}" for p in prompts).encode()).hexdigest()
    return json.loads(json.dumps(dict(
        sample_meta(cfg, backend),
        num_samples=cfg.data.num_samples, samples_per_shard=cfg.data.samples_per_shard,
        solve_batch_size=cfg.data.solve_batch_size, prompts_sha256=digest, num_prompts=len(prompts),
        rewards=[{k: v for k, v in r.items() if v is not None} for r in to_container(cfg)["rewards"]],
        reward_weights_sha256=_weights_sha256(reward),
        backend_config=backend_fingerprint(cfg),
    )))


#: Config sections (and keys) of ``backend`` that only some backends read: left out of the other
#: backends' fingerprints, so adding such a section leaves existing shards valid.  # flux_kontext / toy_edit
BACKEND_SECTIONS = {"flux": ("flux_kontext",), "null_class": ("diffusers",)}
#: Backend config keys that only say where and in what pieces the work runs (not what is made).
UNFINGERPRINTED_BACKEND_KEYS = ("decode_chunk",)


def backend_fingerprint(cfg: Config) -> Dict[str, Any]:
    """The ``backend`` config section as it determines the shards: the device blanked, the memory
    levers (``backend.decode_chunk``) left out, so changing them resumes the same shards, and
    sections of other backends left out."""
    section = to_container(cfg)["backend"] | {"device": None}
    if isinstance(section.get("toy"), dict):  # toy keys added later count only when set, so older shards stay valid
        from consolver.backends.toy import LATER_TOY_KEYS

        section["toy"] = {k: v for k, v in section["toy"].items() if LATER_TOY_KEYS.get(k, object()) != v}
    return {k: v for k, v in section.items() if k not in UNFINGERPRINTED_BACKEND_KEYS
            and cfg.backend.name in BACKEND_SECTIONS.get(k, (cfg.backend.name,))}


def check_manifest(plan: ShardPlan, print_: Mapping[str, Any]) -> None:
    """Write ``dataset.json`` (atomically), or check that an existing one matches."""
    path = plan.shard_dir / MANIFEST
    manifest = {"format_version": FORMAT_VERSION, "num_shards": plan.num_shards, "shards": plan.brace_pattern(),
                "fingerprint": dict(print_)}
    if path.is_file():
        old = _read_manifest(path).get("fingerprint", {})
        diff = sorted(k for k in set(old) | set(print_) if old.get(k) != print_.get(k))
        if diff:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {print_.get(k)!r}" for k in diff[:5])
            raise ConfigError(f"{plan.shard_dir} holds shards made with another config ({details}); "
                              f"use a new data.shard_dir or delete the old shards")
        return
    plan.shard_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _read_manifest(path: Path) -> Dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        manifest = err
    if not isinstance(manifest, dict):
        detail = f" ({manifest})" if isinstance(manifest, Exception) else " (not a JSON object)"
        raise ConfigError(f"shard manifest {str(path)!r} is corrupt{detail}; it records which config made the shards "
                          f"in data.shard_dir: restore it, or delete that directory and make the shards again")
    return manifest


def _commit(partial_name: str) -> None:
    """ShardWriter ``post`` hook: flush to disk, then atomically give the shard its final name."""
    with open(partial_name, "rb") as f:
        os.fsync(f.fileno())
    os.replace(partial_name, partial_name[: -len(PARTIAL_SUFFIX)])


def write_shard(plan: ShardPlan, shard: int, samples) -> None:
    """Write the encoded samples (an iterable of member dicts) as shard ``shard``.

    Uses one ``webdataset.ShardWriter`` per shard (``start_shard=shard``, fixed mtime), writing
    ``<name>.partial`` and renaming it when complete; on an exception nothing is committed.
    """
    partial = plan.path(shard).with_name(plan.path(shard).name + PARTIAL_SUFFIX)
    if partial.exists():
        logger.warning("rewriting half-written shard %s (left by an interrupted run)", partial)
    pattern = str(plan.shard_dir).replace("%", "%%") + os.sep + SHARD_PATTERN + PARTIAL_SUFFIX
    writer = wds.ShardWriter(pattern, maxcount=len(plan.indices(shard)) or 1, start_shard=shard, verbose=0,
                             post=_commit, encoder=False, mtime=0, user="consolver", group="consolver")
    try:
        for sample in samples:
            writer.write(sample)
    except BaseException:
        writer.post = None  # close the tar stream without committing the half-written shard
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()


class ReferenceSolver:
    """Turns sample indices into encoded samples: noise, reference solve, decode, reward features."""

    def __init__(self, cfg: Config, backend, prompts: Sequence[PromptRecord], reward=None, scheduler=None):
        from consolver.sampling import make_scheduler

        self.cfg, self.backend, self.prompts, self.reward = cfg, backend, list(prompts), reward
        self.scheduler = scheduler or make_scheduler(cfg.reference.solver, backend.schedule,
                                                     timestep_spacing=cfg.solver.timestep_spacing)
        self.reward_names = [r.name for r in cfg.rewards] or ([reward.name] if reward is not None else [])
        self.meta = sample_meta(cfg, backend)

    def _features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.reward is None:
            return {}
        feats = self.reward.features(images)
        if isinstance(feats, Mapping):
            return dict(feats)
        if len(self.reward_names) != 1:
            raise ValueError(f"reward returned one feature tensor for rewards {self.reward_names}")
        return {self.reward_names[0]: feats}

    @torch.no_grad()
    def __call__(self, indices: Sequence[int]) -> List[Dict[str, Any]]:
        """Encoded samples (member dicts, see :mod:`consolver.data.format`) for ``indices``."""
        cfg, backend = self.cfg, self.backend
        records = [self.prompts[i % len(self.prompts)] for i in indices]
        seeds = [sample_seed(cfg.data.seed, i) for i in indices]
        noise = make_noise(seeds, backend.latent_shape)
        refs = load_ref_images(records, backend.resolution)  # uint8 [B, H, W, 3] or None
        texts = [r.text for r in records]
        ref_float = None if refs is None else torch.from_numpy(refs).permute(0, 3, 1, 2).float().div(255)
        cond = backend.encode(texts) if ref_float is None else backend.encode(texts, ref_float.to(backend.device))
        target = self._solve(noise.to(backend.device), cond)
        bad = [i for i, ok in zip(indices, torch.isfinite(target).flatten(1).all(1).tolist()) if not ok]
        if bad:  # never write NaN/inf targets: the solve diverged or the model overflowed
            raise ValueError(f"the reference solve gave non-finite latents for samples {bad[:10]} (backend "
                             f"{backend.name!r}, backend.dtype={cfg.backend.dtype}, guidance={cfg.guidance}, "
                             f"reference.solver={cfg.reference.solver}); nothing was written for their shard")
        images = backend.decode(target)
        feats = {k: to_numpy(v) for k, v in self._features(images).items()}
        pngs, target = to_uint8_hwc(images), to_numpy(target).astype(np.float32)
        return [encode_sample(i, texts[b], noise[b].numpy(), target[b], pngs[b],
                              {k: v[b] for k, v in feats.items()}, dict(self.meta, noise_seed=seeds[b]),
                              None if refs is None else refs[b])
                for b, i in enumerate(indices)]

    def _solve(self, noise: torch.Tensor, cond) -> torch.Tensor:
        from consolver.sampling import sample

        return sample(self.backend, self.scheduler, noise, cond, float(self.cfg.guidance), int(self.cfg.reference.num_steps))


def make_shards(
    cfg: Config,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    backend=None,
    reward=None,
    scheduler=None,
    on_progress: Optional[Callable[[int], None]] = None,
    on_start: Optional[Callable[[int], None]] = None,
) -> Dict[str, Any]:
    """Make this rank's missing shards of ``cfg.data`` (see the module docstring).

    ``backend``/``reward``/``scheduler`` default to those built from ``cfg``
    (``build_backend(cfg.backend)``, ``build_rewards(cfg.rewards)`` when rewards are configured,
    ``make_scheduler(cfg.reference.solver, ...)``). ``on_start(num_pending_samples)`` and
    ``on_progress(num_new_samples)`` drive a progress bar. Returns a summary dict.
    """
    rank, world_size = resolve_rank(rank, world_size)
    backend = backend if backend is not None else _build_backend(cfg)
    if reward is None and cfg.rewards:
        from consolver.rewards import build_rewards

        reward = build_rewards(cfg.rewards).to(backend.device)
    if reward is None:
        warnings.warn("no rewards configured: the shards cache no target features, so training cannot use them "
                      "(configure rewards: before making shards)", stacklevel=2)
    prompts = load_prompts(cfg.data, backend)
    check_prompts(backend, prompts, cfg.data.prompts)  # before dataset.json: fixing a prompt must not be "another config"
    plan = plan_for(cfg)
    check_manifest(plan, fingerprint(cfg, backend, prompts, reward))
    pending = plan.pending(rank, world_size)
    done = len(plan.shards_for_rank(rank, world_size)) - len(pending)
    logger.info("rank %d/%d: %d shards to make, %d already complete in %s", rank, world_size, len(pending), done,
                plan.shard_dir)
    if on_start is not None:
        on_start(sum(len(plan.indices(s)) for s in pending))
    solver = ReferenceSolver(cfg, backend, prompts, reward, scheduler)
    for shard in pending:
        write_shard(plan, shard, _shard_samples(plan, shard, solver, cfg.data.solve_batch_size, on_progress))
    return {"rank": rank, "world_size": world_size, "made": pending, "skipped": done, "shards": plan.brace_pattern()}


def check_prompts(backend, prompts: Sequence[PromptRecord], source: Optional[str] = None) -> None:
    """Raise :class:`ConfigError` naming the first prompt the backend cannot encode, or the first
    missing reference image; encodes nothing (``backend.check_prompts`` parses)."""
    where = f"data.prompts={source!r}" if source else f"the {getattr(backend, 'name', '?')!r} backend's prompt list"
    check = getattr(backend, "check_prompts", None)
    for n, record in enumerate(prompts):
        try:
            if check is not None:
                check([record.text])
        except ValueError as err:
            raise ConfigError(f"prompt {n} of {where} cannot be used: {err}") from None
        if record.ref_image is not None and not Path(record.ref_image).is_file():
            raise ConfigError(f"prompt {n} of {where}: reference image {record.ref_image!r} not found "
                              f"(data.ref_image_column)")


def _shard_samples(plan: ShardPlan, shard: int, solver: ReferenceSolver, batch_size: int, on_progress):
    indices = plan.indices(shard)
    for start in range(0, len(indices), batch_size):
        batch = indices[start: start + batch_size]
        yield from solver(list(batch))
        if on_progress is not None:
            on_progress(len(batch))


def _build_backend(cfg: Config):
    from consolver.backends import build_backend

    backend_cfg = cfg.backend
    local_rank = os.environ.get("LOCAL_RANK")
    if backend_cfg.device == "auto" and local_rank is not None and torch.cuda.is_available():
        backend_cfg = copy.deepcopy(backend_cfg)
        backend_cfg.device = f"cuda:{local_rank}"
    return build_backend(backend_cfg)
