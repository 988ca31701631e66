"""Held-out evaluation: K-step previews against the full-step targets of fresh noises.

An :class:`EvalSet` is P prompts times N noises (sample ``i`` has prompt ``i % P`` and noise seed
``sample_seed(base_seed, i)``, the shard writer's convention), with targets made exactly as
:class:`consolver.data.writer.ReferenceSolver` makes them (``cfg.reference.solver``,
``cfg.reference.num_steps``, ``cfg.guidance``, ``cfg.solver.timestep_spacing``). The noise base
seed is ``cfg.data.seed + EVAL_SEED_OFFSET`` unless given, so no evaluation noise is a training
noise of a dataset made with ``data.seed`` (a dataset made with seed ``data.seed +
EVAL_SEED_OFFSET`` would collide: do not use that one).

Prompts (:func:`eval_prompts`): ``data.heldout_prompts`` when it is set (a prompt file, e.g. the
held-out classes of a class-conditional model: ``conf/toy_unet_depth.yaml``). Else the toy world
(any backend with a distinct ``prompts("heldout")``) uses its held-out split, scenes whose (color,
shape) pairs no training prompt has. Other backends have no held-out split: they use
``data.prompts`` through :func:`consolver.data.prompts.load_prompts`, i.e. the training prompts
with fresh noises (a warning says so; set ``data.heldout_prompts`` to hold prompts out).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from tensordict import TensorDict

from consolver.data.prompts import PromptRecord, load_prompts, load_ref_images
from consolver.data.writer import make_noise, sample_seed
from consolver.rewards.base import CompositeReward
from consolver.rewards.pixel import psnr
from consolver.sampling import make_scheduler, sample

logger = logging.getLogger(__name__)

#: Added to ``cfg.data.seed`` to get the evaluation noises' base seed.
EVAL_SEED_OFFSET = 1_000_003


@dataclass
class EvalSet:
    """A fixed evaluation batch of ``B = P x N`` samples and their full-step targets.

    Attributes:
        prompts: ``[B]`` prompt texts (sample ``i`` has prompt ``i % P``).
        cond: the backend's conditioning TensorDict, ``batch_size=[B]``.
        noise: ``[B, *latent_shape]`` float32 initial noise.
        target_latent: ``[B, *latent_shape]`` full-step reference solves of ``noise``.
        target_image: ``[B, 3, H, W]`` in [0, 1], ``backend.decode(target_latent)``.
        features: reward name -> cached target features ``[B, ...]``.
        prompt_index: ``[B]`` long (toy: index into the backend's component bank) or ``None``.
        guidance: classifier-free guidance of targets and previews alike.
        seeds: ``[B]`` noise seeds; ``base_seed`` the base they were drawn from.
        batch_size: samples per model call, decode and reward call when a function is given no
            batch size (``data.solve_batch_size``): memory stays bounded for any number of samples.
    """

    prompts: List[str]
    cond: TensorDict
    noise: torch.Tensor
    target_latent: torch.Tensor
    target_image: torch.Tensor
    features: Dict[str, torch.Tensor]
    prompt_index: Optional[torch.Tensor]
    guidance: float = 1.0
    seeds: List[int] = field(default_factory=list)
    base_seed: Optional[int] = None
    batch_size: int = 16

    def __len__(self) -> int:
        return int(self.noise.shape[0])


def eval_prompts(cfg, backend) -> List[PromptRecord]:
    """The evaluation prompts: the file ``data.heldout_prompts`` when set; else the backend's
    ``"heldout"`` split when it has one and ``data.prompts`` is unset (the toy world); else
    :func:`load_prompts` of ``cfg.data`` (see the module docstring)."""
    heldout = getattr(cfg.data, "heldout_prompts", None)
    if heldout:
        data = copy.deepcopy(cfg.data)  # a DictConfig or a DataConfig: same keys, the held-out file as prompts
        data.prompts = heldout
        records = load_prompts(data, backend)
        if hasattr(backend, "check_prompts"):
            backend.check_prompts([r.text for r in records])
        logger.info("evaluation prompts: %d from data.heldout_prompts=%s", len(records), heldout)
        return records
    if cfg.data.prompts is None and hasattr(backend, "prompt_records"):  # toy_edit: held-out edits + reference PNGs
        return list(backend.prompt_records("heldout", Path(cfg.output_dir) / "eval_refs"))
    if cfg.data.prompts is None and hasattr(backend, "prompts"):
        try:
            prompts = backend.prompts("heldout")
        except (TypeError, ValueError, KeyError):
            prompts = []
        if prompts:
            return [PromptRecord(str(p)) for p in prompts]
    logger.warning("backend %r has no held-out prompt split: evaluating on the prompts of data.prompts "
                   "(%s) with fresh noises", getattr(backend, "name", None), cfg.data.prompts or "its own list")
    return load_prompts(cfg.data, backend)


def reward_feature_names(reward, reward_names: Optional[Sequence[str]] = None) -> List[str]:
    """Names of the reward's parts: a composite's component names, else ``[reward_names[0]]`` (or
    the reward's registered name)."""
    if isinstance(reward, CompositeReward):
        return list(reward.rewards.keys())
    if reward_names:
        if len(reward_names) != 1:
            raise ValueError(f"one reward module for {len(reward_names)} reward names {list(reward_names)}")
        return [str(reward_names[0])]
    return [reward.name]


def _batches(n: int, batch_size: Optional[int]):
    step = n if not batch_size else int(batch_size)
    for start in range(0, n, max(step, 1)):
        yield slice(start, min(start + step, n))


def _take(value, index):
    if isinstance(value, Mapping):
        return {k: _take(v, index) for k, v in value.items()}
    return value[index]


@torch.no_grad()
def make_eval_set(cfg, backend, reward, num_noises: int, seed: Optional[int] = None,
                  prompts: Optional[Sequence] = None, batch_size: Optional[int] = None) -> EvalSet:
    """Evaluation prompts x ``num_noises`` fresh noises and their full-step targets.

    Args:
        cfg: the :class:`~consolver.config.Config`.
        backend: the :class:`~consolver.backends.base.Backend`.
        reward: ``build_rewards(cfg.rewards)`` (a single reward or a ``CompositeReward``), or
            ``None`` for no cached features.
        num_noises: N noises per prompt; ``B = P x N``.
        seed: noise base seed; default ``cfg.data.seed + EVAL_SEED_OFFSET``.
        prompts: prompt texts (or ``PromptRecord`` s) instead of :func:`eval_prompts`.
        batch_size: samples per reference solve, decode and reward call, and the eval set's default
            for previews and scoring (default ``cfg.data.solve_batch_size``).
    """
    if num_noises < 1:
        raise ValueError(f"num_noises must be >= 1, got {num_noises}")
    records = eval_prompts(cfg, backend) if prompts is None else [
        p if isinstance(p, PromptRecord) else PromptRecord(str(p)) for p in prompts]
    base_seed = int(cfg.data.seed) + EVAL_SEED_OFFSET if seed is None else int(seed)
    B = len(records) * int(num_noises)
    chosen = [records[i % len(records)] for i in range(B)]
    seeds = [sample_seed(base_seed, i) for i in range(B)]
    noise = make_noise(seeds, backend.latent_shape).to(backend.device)
    refs = load_ref_images(chosen, backend.resolution)  # uint8 [B, H, W, 3] or None
    texts = [r.text for r in chosen]
    if refs is None:
        cond = backend.encode(texts)
    else:
        cond = backend.encode(texts, torch.from_numpy(refs).permute(0, 3, 1, 2).float().div(255).to(backend.device))
    scheduler = make_scheduler(cfg.reference.solver, backend.schedule, timestep_spacing=cfg.solver.timestep_spacing)
    guidance = float(cfg.guidance)
    batch_size = batch_size or int(cfg.data.solve_batch_size)
    logger.info("eval set: %d prompts x %d noises (base seed %d), %d-step %s targets", len(records), num_noises,
                base_seed, cfg.reference.num_steps, cfg.reference.solver)
    target = torch.cat([sample(backend, scheduler, noise[s], cond[s], guidance, int(cfg.reference.num_steps))
                        for s in _batches(B, batch_size)])
    images = torch.cat([backend.decode(target[s]) for s in _batches(B, batch_size)])
    features: Dict[str, torch.Tensor] = {}
    if reward is not None:
        names = reward_feature_names(reward, [r.name for r in cfg.rewards])
        parts = [reward.features(images[s]) for s in _batches(B, batch_size)]
        if isinstance(parts[0], Mapping):
            features = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        else:
            features = {names[0]: torch.cat(parts)}
    prompt_index = cond["prompt_index"] if "prompt_index" in cond.keys() else None
    return EvalSet(prompts=texts, cond=cond, noise=noise, target_latent=target, target_image=images,
                   features=features, prompt_index=prompt_index, guidance=guidance, seeds=seeds, base_seed=base_seed,
                   batch_size=batch_size)


@torch.no_grad()
def score_latents(eval_set: EvalSet, latents: torch.Tensor, backend, reward,
                  reward_names: Optional[Sequence[str]] = None, batch_size: Optional[int] = None,
                  on_images: Optional[Callable[[torch.Tensor], None]] = None) -> Dict[str, torch.Tensor]:
    """Per-sample metrics of previews ``latents [B, *latent_shape]`` against ``eval_set``'s targets.
    ``on_images(images [b, 3, H, W] in [0, 1])`` sees every decoded batch (e.g. ``FidKid.update``).

    Returns ``{name: [B] float32}`` (on the CPU), in this order: each reward (a composite: each
    component and ``"reward"``, the weighted total) against the cached target features; on the toy
    ``"mode_agreement"`` (1.0 where the preview lands on the target's mixture component, searched
    among its own prompt's renders, else 0.0); on a model of toy scenes (class names that are toy
    prompts, e.g. ``data/toy_unet``) ``"scene_agreement"`` (1.0 where preview and target are
    nearest to the same class, :mod:`consolver.evaluation.scene_agreement`); ``"pixel_psnr"`` (dB)
    of the decoded images.
    """
    if latents.shape != eval_set.target_latent.shape:
        raise ValueError(f"latents {tuple(latents.shape)} do not match the eval set {tuple(eval_set.target_latent.shape)}")
    names = reward_feature_names(reward, reward_names) if reward is not None else []
    missing = [n for n in names if n not in eval_set.features]
    if missing:
        raise ValueError(f"the eval set has no cached target features for reward(s) {missing} (it has "
                         f"{sorted(eval_set.features)}); make it with make_eval_set(..., reward) of these rewards")
    out: Dict[str, List[torch.Tensor]] = {}
    from consolver.evaluation.scene_agreement import scene_classifier_for

    scenes = scene_classifier_for(backend)

    def put(key, value):
        out.setdefault(key, []).append(value.detach().float().cpu())

    for s in _batches(len(eval_set), batch_size or eval_set.batch_size):
        images = backend.decode(latents[s])
        if on_images is not None:
            on_images(images)
        if isinstance(reward, CompositeReward):
            total = None
            for name in names:
                part = reward.rewards[name].score(images, _take(eval_set.features[name], s))
                put(name, part)
                total = reward.weights[name] * part if total is None else total + reward.weights[name] * part
            put("reward", total)
        elif reward is not None:
            put(names[0], reward.score(images, _take(eval_set.features[names[0]], s)))
        if eval_set.prompt_index is not None and hasattr(backend, "component_index"):
            from consolver.rewards.toy import mode_agreement

            put("mode_agreement", mode_agreement(backend, images, eval_set.target_image[s], eval_set.prompt_index[s]))
        if scenes is not None:
            put("scene_agreement", scenes.agreement(images, eval_set.target_image[s]))
        if "pixel_psnr" not in names:  # a pixel_psnr reward is this same metric: one column, B values
            put("pixel_psnr", psnr(images, eval_set.target_image[s]))
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def solve(eval_set: EvalSet, backend, scheduler, num_steps: int, batch_size: Optional[int] = None) -> torch.Tensor:
    """Previews ``[B, *latent_shape]``: ``scheduler`` in ``num_steps`` model evaluations from
    ``eval_set.noise``. A learned solver without a table for ``num_steps`` raises ``ValueError``."""
    return torch.cat([sample(backend, scheduler, eval_set.noise[s], eval_set.cond[s], eval_set.guidance, int(num_steps))
                      for s in _batches(len(eval_set), batch_size or eval_set.batch_size)])


def evaluate_scheduler(eval_set: EvalSet, backend, scheduler, num_steps: int, reward,
                       reward_names: Optional[Sequence[str]] = None, batch_size: Optional[int] = None) -> Dict[str, float]:
    """Mean of every :func:`score_latents` metric for ``scheduler`` at ``num_steps`` (NFE = K)."""
    metrics = score_latents(eval_set, solve(eval_set, backend, scheduler, num_steps, batch_size), backend, reward,
                            reward_names, batch_size)
    return {k: float(v.double().mean()) for k, v in metrics.items()}


def missing_num_steps(scheduler, num_steps: Sequence[int]) -> List[int]:
    """The K in ``num_steps`` a learned solver has no table for (none for a solver without tables)."""
    available = list(getattr(scheduler, "available_num_steps", []) or [])
    return [int(K) for K in num_steps if available and int(K) not in available]


def evaluate(cfg, solvers: Mapping[str, object], num_steps: Sequence[int], num_noises: int, *, backend=None,
             reward=None, eval_set: Optional[EvalSet] = None, baselines: Optional[Mapping[str, object]] = None,
             batch_size: Optional[int] = None, seed: Optional[int] = None, notes: Optional[List[str]] = None,
             on_progress: Optional[Callable[[str, int], None]] = None, image_metrics=None) -> List[dict]:
    """Our ``solvers`` and the ``baselines`` (default :func:`baseline_schedulers`) at every K.

    Returns one row per (solver, K): ``solver``, ``kind`` (``"ours"`` | ``"baseline"``), ``K``,
    ``nfe`` (= K), ``num_samples``, then each metric of :func:`score_latents` (mean) and
    ``<metric>_se`` (its standard error over samples). A K a learned solver lacks is skipped with
    a warning, appended to ``notes``. ``on_progress(solver, K)`` is called after every pair,
    skipped ones included. ``backend``/``reward``/``eval_set`` are built from ``cfg`` if not given.
    ``image_metrics`` (e.g. :class:`~consolver.evaluation.fid.FidKid`): set-level metrics, ``reset()``
    per (solver, K), ``update(images)`` with every decoded batch of previews, ``compute()`` -> a dict
    of columns added to the row (e.g. ``fid``, ``kid``, ``kid_se``).
    """
    from consolver.evaluation.baselines import baseline_schedulers

    if backend is None:
        from consolver.backends import build_backend

        backend = build_backend(cfg.backend)
    if reward is None and cfg.rewards:
        from consolver.rewards import build_rewards

        reward = build_rewards(cfg.rewards).to(backend.device)
    reward_names = [r.name for r in cfg.rewards]
    if eval_set is None:
        eval_set = make_eval_set(cfg, backend, reward, num_noises, seed=seed)
    baselines = baseline_schedulers(cfg, backend) if baselines is None else baselines
    clash = sorted(set(solvers) & set(baselines))
    if clash:
        raise ValueError(f"solver names {clash} are baseline names; rename them")
    notes = [] if notes is None else notes
    rows = []
    for name, scheduler in list(solvers.items()) + list(baselines.items()):
        kind = "ours" if name in solvers else "baseline"
        check_schedule_match(name, scheduler, backend)
        skipped = missing_num_steps(scheduler, num_steps)
        if skipped:
            note = (f"{name}: no coefficient table for K={', '.join(map(str, skipped))} (it has K in "
                    f"{list(scheduler.available_num_steps)}); skipped")
            notes.append(note)
        for K in num_steps:
            if int(K) not in skipped:
                if image_metrics is not None:
                    image_metrics.reset()
                metrics = score_latents(eval_set, solve(eval_set, backend, scheduler, int(K), batch_size), backend,
                                        reward, reward_names, batch_size,
                                        on_images=None if image_metrics is None else image_metrics.update)
                row = {"solver": name, "kind": kind, "K": int(K), "nfe": int(K), "num_samples": len(eval_set)}
                for key, values in metrics.items():
                    values = values.double()
                    row[key] = float(values.mean())
                    row[f"{key}_se"] = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")
                extra = image_metrics.compute() if image_metrics is not None else {}
                row.update(extra)
                rows.append(row)
                shown = [f"{k}={v:.3f}" for k, v in row.items() if k in metrics]
                logger.debug("%s K=%d: %s", name, K, ", ".join(shown + [f"{k}={v:.4g}" for k, v in extra.items()]))
            if on_progress is not None:
                on_progress(name, int(K))
    return rows


#: Scheduler config keys that fix the noise levels (besides the VP/flow kind).
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "shift", "use_dynamic_shifting",
                 "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")


def check_schedule_match(name: str, scheduler, backend, config: str = "the config") -> None:
    """Raise ``ValueError`` when a solver was trained for another schedule than the backend's
    (e.g. a flow-matching toy_edit solver evaluated with a VP toy_depth config): its tables would
    be applied to other noise levels, or the solve fails far from the cause."""
    sc = getattr(scheduler, "config", None)
    kind = getattr(sc, "schedule", None)
    if sc is None or kind is None:
        return
    ours = backend.schedule.diffusers_config()
    differ = [] if kind == backend.schedule.kind else [f"schedule: {kind!r} vs {backend.schedule.kind!r}"]
    if not differ:
        differ = [f"{k}: {sc[k]!r} vs {ours[k]!r}" for k in SCHEDULE_KEYS
                  if k in ours and k in sc and sc[k] != ours[k] and not (
                      isinstance(ours[k], float) and abs(float(sc[k]) - ours[k]) <= 1e-9 * max(1.0, abs(ours[k])))]
    if differ:
        raise ValueError(f"solver {name!r} and {config} belong to different schedules ({'; '.join(differ)}, solver vs "
                         f"backend {getattr(backend, 'name', '?')!r}): evaluate a solver with the config it was "
                         f"trained with (its run's config.yaml)")


__all__ = ["EVAL_SEED_OFFSET", "EvalSet", "eval_prompts", "evaluate", "evaluate_scheduler", "make_eval_set",
           "check_schedule_match", "missing_num_steps", "reward_feature_names", "score_latents", "solve"]
