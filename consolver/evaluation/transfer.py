"""Transfer worlds: a solver trained on one world, measured on worlds it never saw.

A user trains a solver once, on one prompt set and one checkpoint, then previews other prompts,
often with a fine-tuned checkpoint of the same base model. :data:`TRANSFER_WORLDS` names worlds
that stand in for that, each defined by config overrides of the training config (toy variants)
or by a config of its own (the embedded trained network), with its evaluation noises fixed by
the config's ``data.seed`` (so every table is reproducible):

- ``heldout``: the training world's own held-out prompts (in distribution);
- ``other_prompts``: a disjoint prompt family (no prompt of the training set, another
  unconditional mixture);
- ``other_renders``: other renders of the same prompts (render seed) and half as many per prompt;
- ``wide_modes`` / ``narrow_modes``: mixture components twice / half as wide;
- ``inverted``: other colours and backgrounds (``1 - image``), same geometry;
- ``res64``: 64x64 images;
- ``guidance_1.5`` / ``guidance_5``: other guidance scales;
- ``toy_unet``: the embedded trained class-conditional UNet (``data/toy_unet``, same SD1.5
  schedule, its own guidance 2), for "a fine-tuned checkpoint of the same base".

:func:`evaluate_world` scores solvers and baselines on one world sample by sample;
:func:`paired_gap` gives ours minus the best baseline at each K with the standard error of the
paired difference; :mod:`consolver.evaluation.transfer_report` writes the tables.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from consolver.evaluation.report import FRACTION_METRICS

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The baselines of the transfer tables (the training-free solvers users pick from).
TRANSFER_BASELINES = ("DDIM", "DPM-Solver++ 2M", "UniPC")
#: Per-sample agreement metrics, one per kind of world (toy mixtures; models of toy scenes).
AGREEMENT_METRICS = FRACTION_METRICS


@dataclass(frozen=True)
class TransferWorld:
    """A world to evaluate on: ``overrides`` of the training config, or of ``config`` (a path
    relative to the repository) when set. ``max_noises`` caps the noises per prompt (slow worlds)."""

    name: str
    description: str
    overrides: Tuple[str, ...] = ()
    config: Optional[str] = None
    max_noises: Optional[int] = None
    backends: Optional[Tuple[str, ...]] = ("toy",)  # training backends it is a variant of (None: any)

    def applies_to(self, backend_name: str) -> bool:
        return self.backends is None or backend_name in self.backends

    @property
    def is_training_world(self) -> bool:
        """No overrides and no config of its own: the training config's world itself."""
        return not self.overrides and self.config is None


TRANSFER_WORLDS: Dict[str, TransferWorld] = {w.name: w for w in (
    TransferWorld("heldout", "in distribution: the training world's held-out prompts", backends=None),
    TransferWorld("other_prompts", "a disjoint prompt family: 12 other train and 4 other held-out prompts",
                  ("backend.toy.prompt_offset=12",)),
    TransferWorld("other_renders", "other renders of the same prompts: render seed 7, 32 per prompt",
                  ("backend.toy.seed=7", "backend.toy.renders_per_prompt=32")),
    TransferWorld("wide_modes", "mixture components twice as wide (std 0.1)", ("backend.toy.component_std=0.1",)),
    TransferWorld("narrow_modes", "mixture components half as wide (std 0.025), 128 renders per prompt",
                  ("backend.toy.component_std=0.025", "backend.toy.renders_per_prompt=128")),
    TransferWorld("inverted", "other colours and backgrounds: 1 - image", ("backend.toy.palette=inverted",)),
    TransferWorld("res64", "64x64 images", ("backend.resolution=64",)),
    TransferWorld("guidance_1.5", "guidance 1.5", ("guidance=1.5",)),
    TransferWorld("guidance_5", "guidance 5", ("guidance=5.0",)),
    TransferWorld("toy_unet", "the embedded trained UNet (data/toy_unet), its 4 held-out classes, guidance 2",
                  config="conf/toy_unet_depth.yaml", max_noises=64),
)}


def select_worlds(names: str | Sequence[str], backend_name: str) -> List[TransferWorld]:
    """Worlds by name (``"all"``, or a comma-separated list / sequence); ``"all"`` keeps the worlds
    that apply to a solver trained on ``backend_name``. ``ValueError`` names the valid worlds."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if list(names) == ["all"]:
        chosen = [w for w in TRANSFER_WORLDS.values() if w.applies_to(backend_name)]
        if not chosen:
            raise ValueError(f"no transfer world is defined for a solver trained on backend {backend_name!r}; "
                             f"they are variants of: {sorted({b for w in TRANSFER_WORLDS.values() for b in w.backends or ()})}")
        return chosen
    unknown = [n for n in names if n not in TRANSFER_WORLDS]
    if unknown or not names:
        raise ValueError(f"unknown transfer world(s) {unknown or names}; valid: all, {', '.join(TRANSFER_WORLDS)}")
    wrong = [n for n in names if not TRANSFER_WORLDS[n].applies_to(backend_name)]
    if wrong:
        raise ValueError(f"transfer world(s) {wrong} are variants of a {TRANSFER_WORLDS[wrong[0]].backends} training "
                         f"world, not of backend {backend_name!r}")
    return [TRANSFER_WORLDS[n] for n in names]


def world_config(world: TransferWorld, cfg):
    """The world's config: a copy of ``cfg`` with the world's overrides, or the world's own config
    file with them (``data.solve_batch_size`` taken from ``cfg``)."""
    from consolver.config import apply_overrides, load_config

    if world.config is None:
        return apply_overrides(copy.deepcopy(cfg), world.overrides)
    return load_config(REPO_ROOT / world.config,
                       [*world.overrides, f"data.solve_batch_size={int(cfg.data.solve_batch_size)}"])


def agreement_metric(metrics: Mapping[str, object]) -> Optional[str]:
    """The world's agreement metric among ``metrics``' keys (mode or scene agreement), if any."""
    return next((m for m in AGREEMENT_METRICS if m in metrics), None)


@torch.no_grad()
def evaluate_world(world_cfg, solvers: Mapping[str, object], num_steps: Sequence[int], num_noises: Optional[int], *,
                   baselines: Sequence[str] = TRANSFER_BASELINES, backend=None, reward=None,
                   seed: Optional[int] = None, max_samples: Optional[int] = None, on_progress: Optional[Callable[[str, int], None]] = None) -> Dict[Tuple[str, int], Dict[str, torch.Tensor]]:
    """Per-sample metrics ``{(solver, K): {metric: [B] float32}}`` of ``solvers`` (ours, K they lack
    skipped) and the named baselines (those the schedule has) on ``world_cfg``'s evaluation set (``num_noises`` per prompt).
    The sample order is the same for every solver, so differences are paired. ``backend`` and
    ``reward``: built from ``world_cfg`` unless given; ``seed``: the noise base seed (default the
    evaluation seed of :func:`~consolver.evaluation.core.make_eval_set`). ``max_samples``: at most
    this many samples in all (the first ``max_samples`` prompts when there are more), with
    ``num_noises`` (``None``: as many as fit) lowered to fit."""
    from consolver.backends import build_backend
    from consolver.evaluation.baselines import baseline_schedulers
    from consolver.evaluation.core import check_schedule_match, make_eval_set, missing_num_steps, score_latents, solve
    from consolver.rewards import build_rewards

    backend = backend or build_backend(world_cfg.backend)
    if reward is None and world_cfg.rewards:
        reward = build_rewards(world_cfg.rewards).to(backend.device)
    names = [r.name for r in world_cfg.rewards]
    for name, scheduler in solvers.items():
        check_schedule_match(name, scheduler, backend, "this transfer world")
    prompts = None
    if max_samples is not None:
        from consolver.evaluation.core import eval_prompts

        prompts = eval_prompts(world_cfg, backend)[: int(max_samples)]
        num_noises = max(1, min(num_noises or max_samples, int(max_samples) // len(prompts)))
    elif num_noises is None:
        raise ValueError("evaluate_world needs num_noises or max_samples")
    eval_set = make_eval_set(world_cfg, backend, reward, num_noises, seed=seed, prompts=prompts)
    available = baseline_schedulers(world_cfg, backend)  # FLUX's dynamic shift has no diffusers multistep solvers
    everyone = {**solvers, **{n: available[n] for n in baselines if n in available}}
    out: Dict[Tuple[str, int], Dict[str, torch.Tensor]] = {}
    for name, scheduler in everyone.items():
        skipped = missing_num_steps(scheduler, num_steps)
        for K in num_steps:
            if int(K) not in skipped:
                latents = solve(eval_set, backend, scheduler, int(K))
                out[(name, int(K))] = score_latents(eval_set, latents, backend, reward, names)
            if on_progress is not None:
                on_progress(name, int(K))
    return out


def paired_gap(samples: Mapping[Tuple[str, int], Mapping[str, torch.Tensor]], ours: str, K: int, metric: str,
               baselines: Sequence[str]) -> Optional[Tuple[str, float, float]]:
    """``(best baseline, mean(ours - best), se)`` at ``K`` for ``metric``: the best baseline by mean,
    the standard error of the paired per-sample difference. ``None`` where ours or every baseline
    lacks that K."""
    if (ours, K) not in samples:
        return None
    present = [b for b in baselines if (b, K) in samples and metric in samples[(b, K)]]
    if not present:
        return None
    best = max(present, key=lambda b: float(samples[(b, K)][metric].double().mean()))
    diff = samples[(ours, K)][metric].double() - samples[(best, K)][metric].double()
    se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return best, float(diff.mean()), se


def mean_se(values: torch.Tensor) -> Tuple[float, float]:
    """``(mean, standard error)`` of per-sample values ``[B]``."""
    values = values.double()
    return float(values.mean()), float(values.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")


__all__ = ["AGREEMENT_METRICS", "TRANSFER_BASELINES", "TRANSFER_WORLDS", "TransferWorld", "agreement_metric",
           "evaluate_world", "mean_se", "paired_gap", "select_worlds", "world_config"]
