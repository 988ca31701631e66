"""Previews and finals as tensors: seeds -> noise -> K-step learned solve | full-step reference solve.

The noise of seed ``s`` is ``make_noise([s], backend.latent_shape)`` (:mod:`consolver.data.writer`),
row by row, so a seed means the same noise in a preview, its final and a shard sample whose
``noise_seed`` is ``s``. A final is the reference solve make_shards runs for its targets
(``cfg.reference.solver`` in ``cfg.reference.num_steps`` steps, ``cfg.guidance``,
``cfg.solver.timestep_spacing``, :func:`consolver.sampling.sample`).

Bit-exactness on the CPU: the BLAS matmuls inside a backend may round a row differently when
the batch has another shape (MKL does for batches below 4 rows), although a row never depends on
the *content* or position of the other rows. :func:`refine` with ``exact=True`` (off by default:
it costs a full writer batch per solve) therefore solves in chunks of exactly ``cfg.data.solve_batch_size`` rows, the writer's batch
shape, padding the last chunk with copies of its first row: a final is then bit for bit the
``target.npy`` that make_shards writes for the same prompt and noise seed.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from consolver.data.prompts import PromptRecord, load_ref_images
from consolver.data.writer import make_noise
from consolver.sampling import make_scheduler, sample

logger = logging.getLogger(__name__)

#: ``progress(description, total) -> advance(n)``: a progress-bar factory (the tool passes tqdm's).
Progress = Callable[[str, int], Callable[[int], None]]
#: Row names of the training-free solvers ``--compare`` accepts.
COMPARE_NAMES = {"ddim": "DDIM", "dpmsolver++": "DPM-Solver++ 2M", "unipc": "UniPC", "euler": "Euler",
                 "adams_bashforth": "Adams-Bashforth 2", "ipndm": "iPNDM 2"}
LEARNED = "ConsistencySolver"
MAX_SEED = 2**63 - 1


def parse_seeds(text: str) -> List[int]:
    """``"0-15"``, ``"3,7"`` or ``"0-3,9"`` -> the seeds in the order given, duplicates dropped."""
    seeds: List[int] = []
    parts = [p.strip() for p in str(text).split(",")]
    for part in parts:
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise ValueError(f"seed range {text!r} does not parse; use e.g. 0-15, 3,7 or 0-3,9 (non-negative integers)")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if hi < lo or hi > MAX_SEED:
            raise ValueError(f"seed range {text!r}: {part!r} must be increasing and at most {MAX_SEED}")
        if hi - lo >= 100_000:
            raise ValueError(f"seed range {text!r}: {part!r} has {hi - lo + 1} seeds; at most 100000 at once")
        seeds.extend(range(lo, hi + 1))
    return list(dict.fromkeys(seeds))


def format_seeds(seeds: Sequence[int]) -> str:
    """The inverse of :func:`parse_seeds` for display: ``[0, 1, 2, 9]`` -> ``"0-2,9"``."""
    out, run = [], []
    for s in list(seeds) + [None]:
        if run and (s is None or s != run[-1] + 1):
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
            run = []
        if s is not None:
            run.append(int(s))
    return ",".join(out)


def load_solver(path: Union[str, Path]):
    """``ConsistencySolverScheduler.from_pretrained(path)``; a one-line ``FileNotFoundError`` when
    ``path`` is not a saved scheduler directory."""
    from consolver.scheduler import ConsistencySolverScheduler

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"solver directory {str(path)!r} not found; pass the scheduler folder that training "
                                f"wrote, e.g. outputs/toy_depth/scheduler (python tools/fit.py)")
    if not (path / "scheduler_config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no scheduler_config.json: not a saved scheduler directory")
    return ConsistencySolverScheduler.from_pretrained(str(path))


def check_num_steps(solver, num_steps: int, where: str = "the solver") -> None:
    """``ValueError`` listing the K values when a learned solver has no table for ``num_steps``."""
    available = list(getattr(solver, "available_num_steps", []) or [])
    if num_steps < 1:
        raise ValueError(f"--steps must be >= 1, got {num_steps}")
    if available and num_steps not in available:
        raise ValueError(f"{where} has no coefficient table for K={num_steps}; it has tables for K in "
                         f"{', '.join(map(str, available))}")


def compare_schedulers(names: Sequence[str], cfg, backend) -> Dict[str, object]:
    """``{row name: scheduler}`` of training-free solvers (``COMPARE_NAMES`` keys) on the backend's
    schedule with ``cfg.solver.timestep_spacing``, as :func:`consolver.sampling.make_scheduler` builds them."""
    out = {}
    for name in names:
        if name not in COMPARE_NAMES:
            raise ValueError(f"unknown --compare solver {name!r}; valid: {', '.join(COMPARE_NAMES)}")
        out[COMPARE_NAMES[name]] = make_scheduler(name, backend.schedule, timestep_spacing=cfg.solver.timestep_spacing)
    return out


def _records(prompts: Sequence[Union[str, PromptRecord]], ref_image: Optional[str] = None) -> List[PromptRecord]:
    return [p if isinstance(p, PromptRecord) else PromptRecord(str(p), ref_image) for p in prompts]


def encode(backend, records: Sequence[PromptRecord]):
    """The backend's conditioning of ``records`` (reference images loaded and resized as make_shards does)."""
    refs = load_ref_images(records, backend.resolution)
    texts = [r.text for r in records]
    if refs is None:
        return backend.encode(texts)
    return backend.encode(texts, torch.from_numpy(refs).permute(0, 3, 1, 2).float().div(255).to(backend.device))


class _Counting:
    """The backend, calling ``advance(1)`` after every ``predict`` (drives a per-step progress bar)."""

    def __init__(self, backend, advance: Callable[[int], None]):
        self._backend, self._advance = backend, advance

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def predict(self, *args, **kwargs):
        out = self._backend.predict(*args, **kwargs)
        self._advance(1)
        return out


def _solve(backend, scheduler, noise, cond, guidance: float, num_steps: int, chunk: int, pad: bool,
           desc: str, progress: Optional[Progress]) -> torch.Tensor:
    """``[B, *latent_shape]`` solves in chunks of ``chunk`` rows (the last one padded to ``chunk``
    rows with copies of its first row when ``pad``)."""
    B = noise.shape[0]
    starts = list(range(0, B, chunk))
    advance = progress(desc, len(starts) * num_steps) if progress is not None else None
    model = backend if advance is None else _Counting(backend, advance)
    out = []
    for start in starts:
        rows = list(range(start, min(start + chunk, B)))
        n = len(rows)
        if pad and n < chunk:
            rows = rows + [rows[0]] * (chunk - n)
        index = torch.tensor(rows, device=noise.device)
        x = sample(model, scheduler, noise[index], cond[index], guidance, num_steps)
        out.append(x[:n])
    return torch.cat(out)


@torch.no_grad()
def _warm_up(backend, scheduler, records: Sequence[PromptRecord], guidance: float, num_steps: int) -> None:
    """One untimed encode and model call, so timings exclude one-off set-up (the toy renders a new
    prompt's components and caches its bank; GPUs load kernels)."""
    cond = encode(backend, records)[:1]  # all of them: the toy adds new prompts to its bank in this order
    from consolver.backends.base import timestep_kwargs

    scheduler.set_timesteps(num_steps, device=backend.device, **timestep_kwargs(backend, num_steps))
    noise = make_noise([0], backend.latent_shape).to(backend.device)
    backend.predict(noise, scheduler.timesteps[0], cond, guidance)


@dataclass
class Previews:
    """K-step previews of ``B`` (prompt, seed) entries, prompt-major.

    Attributes:
        records, seeds: ``[B]`` prompt records (text, reference image) and noise seeds.
        num_steps: K (= NFE per preview).
        latents: ``[B, *latent_shape]`` float32 of the learned solver; ``images`` ``[B, 3, H, W]`` in [0, 1].
        compare: row name -> ``[B, 3, H, W]`` images of a training-free solver at the same K.
        seconds: wall time of the learned solver's previews (encode, solve, decode);
            ``compare_seconds`` the same per compared solver.
    """

    records: List[PromptRecord]
    seeds: List[int]
    num_steps: int
    latents: torch.Tensor
    images: torch.Tensor
    compare: Dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    compare_seconds: Dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.seeds)


@torch.no_grad()
def make_previews(cfg, solver, prompts: Sequence[Union[str, PromptRecord]], seeds: Sequence[int], num_steps: int, *,
                  backend=None, compare: Union[Sequence[str], Mapping[str, object]] = (), ref_image: Optional[str] = None,
                  batch_size: Optional[int] = None, progress: Optional[Progress] = None) -> Previews:
    """One preview per (prompt, seed), prompt-major: ``B = len(prompts) * len(seeds)``.

    Args:
        cfg: the :class:`~consolver.config.Config` (backend, guidance, spacing).
        solver: the learned scheduler (:func:`load_solver`); must have a table for ``num_steps``.
        prompts: texts (or ``PromptRecord`` s with reference images); ``ref_image`` applies to all texts.
        seeds: noise seeds; seed ``s`` is ``make_noise([s], latent_shape)``.
        num_steps: K.
        compare: ``COMPARE_NAMES`` keys, or ``{row name: scheduler}``, solved at the same K.
        batch_size: entries per batched solve (default: all at once).
        progress: progress-bar factory, see ``Progress``.
    """
    check_num_steps(solver, int(num_steps))
    if backend is None:
        from consolver.backends import build_backend

        backend = build_backend(cfg.backend)
    records = [r for r in _records(prompts, ref_image) for _ in seeds]
    all_seeds = [int(s) for _ in prompts for s in seeds]
    if not all_seeds:
        raise ValueError("nothing to preview: no prompts or no seeds")
    others = compare if isinstance(compare, Mapping) else compare_schedulers(compare, cfg, backend)
    chunk = int(batch_size or len(all_seeds))
    guidance = float(cfg.guidance)
    images, times = {}, {}
    latents = None
    _warm_up(backend, solver, records, guidance, int(num_steps))
    for name, scheduler in [(LEARNED, solver), *others.items()]:
        start = time.perf_counter()
        cond = encode(backend, records)
        noise = make_noise(all_seeds, backend.latent_shape).to(backend.device)
        x = _solve(backend, scheduler, noise, cond, guidance, int(num_steps), chunk, False,
                   f"{name} K={num_steps}", progress)
        images[name] = backend.decode(x).float().cpu()
        times[name] = time.perf_counter() - start
        latents = x.float().cpu() if latents is None else latents
        logger.debug("%d previews with %s at K=%d in %.3f s", len(all_seeds), name, num_steps, times[name])
    return Previews(records, all_seeds, int(num_steps), latents, images.pop(LEARNED), images, times.pop(LEARNED), times)


@dataclass
class Finals:
    """Full-step reference solves of ``B`` (prompt, seed) entries.

    Attributes:
        records, seeds: ``[B]``; ``latents [B, *latent_shape]`` float32, ``images [B, 3, H, W]`` in [0, 1].
        solver, num_steps: the reference solver's name and steps.
        seconds: wall time (encode, solve, decode); ``chunk`` rows per solve, ``num_chunks`` solves.
        exact: chunks padded to the writer's batch shape (bit-exact make_shards targets on the CPU).
    """

    records: List[PromptRecord]
    seeds: List[int]
    latents: torch.Tensor
    images: torch.Tensor
    solver: str
    num_steps: int
    seconds: float
    chunk: int
    num_chunks: int
    exact: bool

    def __len__(self) -> int:
        return len(self.seeds)


@torch.no_grad()
def refine(cfg, prompts: Sequence[Union[str, PromptRecord]], seeds: Sequence[int], *, num_steps: Optional[int] = None,
           backend=None, exact: bool = False, batch_size: Optional[int] = None,
           progress: Optional[Progress] = None) -> Finals:
    """Finals of the entries ``(prompts[b], seeds[b])`` (parallel lists): the reference solve of
    make_shards from the same noise and condition.

    Args:
        num_steps: default ``cfg.reference.num_steps`` (other values are no longer the shard targets).
        exact: pad every solve to ``cfg.data.solve_batch_size`` rows (see the module docstring), so
            on the CPU each final is bit for bit the make_shards target. Off by default, on every
            device: a whole writer batch per solve is slower; without it the finals agree with the
            shard targets to float rounding.
        batch_size: rows per solve when not ``exact`` (default: all at once).
    """
    if len(prompts) != len(seeds) or not seeds:
        raise ValueError(f"refine needs one prompt per seed (got {len(prompts)} prompts, {len(seeds)} seeds)")
    if backend is None:
        from consolver.backends import build_backend

        backend = build_backend(cfg.backend)
    steps = int(num_steps or cfg.reference.num_steps)
    exact = bool(exact)
    chunk = int(cfg.data.solve_batch_size) if exact else int(batch_size or len(seeds))
    scheduler = make_scheduler(cfg.reference.solver, backend.schedule, timestep_spacing=cfg.solver.timestep_spacing)
    records = _records(prompts)
    _warm_up(backend, scheduler, records, float(cfg.guidance), steps)
    start = time.perf_counter()
    cond = encode(backend, records)
    noise = make_noise([int(s) for s in seeds], backend.latent_shape).to(backend.device)
    x = _solve(backend, scheduler, noise, cond, float(cfg.guidance), steps, chunk, exact,
               f"finals {cfg.reference.solver} {steps} steps", progress)
    images = backend.decode(x).float().cpu()
    seconds = time.perf_counter() - start
    num_chunks = -(-len(seeds) // chunk)
    logger.debug("%d finals (%d-step %s, %d solve(s) of %d rows) in %.3f s", len(seeds), steps, cfg.reference.solver,
                num_chunks, chunk, seconds)
    return Finals(records, [int(s) for s in seeds], x.float().cpu(), images, cfg.reference.solver, steps, seconds,
                  chunk, num_chunks, bool(exact))


@torch.no_grad()
def consistency(reward, previews: torch.Tensor, finals: torch.Tensor, names: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """The configured reward of each preview against its final: ``{name: [B]}`` (a composite
    reward: each part and ``"reward"``, the weighted total). Images ``[B, 3, H, W]`` in [0, 1]."""
    from consolver.rewards.base import CompositeReward

    device = next(iter(reward.parameters()), torch.empty(0)).device
    previews, finals = previews.to(device), finals.to(device)
    if isinstance(reward, CompositeReward):
        out = {n: r.score(previews, r.features(finals)).float().cpu() for n, r in reward.rewards.items()}
        out["reward"] = sum(reward.weights[n] * out[n] for n in reward.rewards)
        return out
    name = names[0] if len(names) == 1 else getattr(reward, "name", "reward")
    return {name: reward.score(previews, reward.features(finals)).float().cpu()}
