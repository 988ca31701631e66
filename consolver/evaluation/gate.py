"""The validation gate at export: no exported K may be worse than the training-free solvers.

Every K of a trained solver is scored on held-out samples (``validation.world``, a transfer world
of :mod:`consolver.evaluation.transfer`; noises from ``data.seed + VALIDATION_SEED_OFFSET``, so
neither a training noise nor one of ``tools/evaluate.py``'s) against the best training-free solver
at that K (DDIM, DPM-Solver++ 2M, UniPC, and the base solver). A K *loses* when, on the agreement
metric or pixel PSNR, ours is below the best by more than ``validation.tolerance_se`` standard
errors of the paired difference. By ``validation.gate``:

- ``report``: every K is kept; the losses are recorded and warned about;
- ``fallback``: a losing K is exported with the base solver's table on the configured spacing
  (its learned grid removed): the scheduler then is the base solver at that K. Only where the
  base solver is not itself behind ours (on any checked metric, by the same tolerance): a K
  that trails UniPC a little but leads the base solver by far is kept, and said so;
- ``drop``: a losing K gets no table (asking the scheduler for it is an error naming the K it has).

The scores (and the verdict per K) go into the scheduler config as ``validation``, so a solver
directory says how well it was validated, and on what. ``falls`` lists each K whose quality is
below K-1's (paired, beyond one standard error): no table swap fixes that, so it is reported and
warned about.
"""

from __future__ import annotations

import logging
import warnings
from typing import Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)

#: Added to ``cfg.data.seed`` for the gate's noises (evaluation uses ``EVAL_SEED_OFFSET``).
VALIDATION_SEED_OFFSET = 2_000_029
BASE = "base solver"


def base_scheduler(scheduler):
    """A scheduler with ``scheduler``'s config and neither tables, grids nor policy: the base solver."""
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    config.update(coefficient_tables=None, step_grids=None, policy=None, validation=None)
    return type(scheduler).from_config(config)


def gate_scores(samples, ours: str, num_steps: Sequence[int], metrics: Sequence[str], rivals: Sequence[str],
                tolerance_se: float, base: str = "DDIM") -> Dict[int, dict]:
    """Per K: ``{"loses": bool, "base_not_behind": bool, metric: {"ours", "best", "best_value",
    "gap", "gap_se", "base_value"}}`` (see the module docstring) from
    :func:`~consolver.evaluation.transfer.evaluate_world`'s samples; ``base`` names the base
    solver's samples."""
    from consolver.evaluation.transfer import mean_se, paired_gap

    out: Dict[int, dict] = {}
    for K in num_steps:
        entry: dict = {"loses": False, "base_not_behind": True}
        for metric in metrics:
            best, gap, se = paired_gap(samples, ours, K, metric, rivals)
            _, base_gap, base_se = paired_gap(samples, base, K, metric, [ours])
            entry[metric] = {"ours": mean_se(samples[(ours, K)][metric])[0], "best": best,
                             "best_value": mean_se(samples[(best, K)][metric])[0], "gap": gap, "gap_se": se,
                             "base_value": mean_se(samples[(base, K)][metric])[0]}
            entry["loses"] |= gap < -tolerance_se * se
            entry["base_not_behind"] &= not base_gap < -tolerance_se * base_se
        out[int(K)] = entry
    return out


def gate_verdicts(scores: Dict[int, dict], mode: str) -> Dict[int, str]:
    """What the gate does with each K of :func:`gate_scores`: ``"kept"``; ``"base solver"``
    (``fallback``, where the base solver is not behind); ``"kept: base behind"`` (``fallback``, the
    base solver behind ours too); ``"dropped"`` (``drop``). ``report`` keeps every K."""
    out = {}
    for K, s in scores.items():
        if not s["loses"] or mode == "report":
            out[K] = "kept"
        elif mode == "drop":
            out[K] = "dropped"
        else:
            out[K] = "base solver" if s["base_not_behind"] else "kept: base behind"
    return out


def apply_gate(scheduler, losing: Sequence[int], mode: str) -> None:
    """``fallback``: each losing K gets the base solver's table on the configured spacing (its
    learned grid removed); ``drop``: each losing K loses its table and grid. In place."""
    if mode not in ("fallback", "drop") or not losing:
        return
    tables = scheduler.learned_tables
    grids = {K: g for K, g in scheduler.step_grids.items() if K not in losing}
    scheduler.set_step_grids(grids)
    for K in losing:
        if mode == "fallback":
            tables[K] = scheduler.base_table(K)
        else:
            tables.pop(K, None)
    scheduler.set_coefficient_tables(tables)


def validate_scheduler(cfg, scheduler, num_steps: Optional[Sequence[int]] = None, backend=None, reward=None) -> dict:
    """Score ``scheduler`` at every K (default: every K it has a table for), apply
    ``cfg.validation.gate``, record the scores as the scheduler config's ``validation`` and return
    them. ``backend``/``reward``: the training ones, reused when the world is the training world."""
    from consolver.evaluation.transfer import TRANSFER_BASELINES, TRANSFER_WORLDS, evaluate_world, world_config
    from consolver.evaluation.transfer_report import check_metrics, world_checks

    v = cfg.validation
    num_steps = [int(K) for K in (num_steps or scheduler.available_num_steps)]
    world = TRANSFER_WORLDS[v.world]
    wcfg = world_config(world, cfg)
    same_world = world.is_training_world
    rivals = list(TRANSFER_BASELINES)
    solvers = {"ours": scheduler}
    if scheduler.config.base_solver != "ddim":  # DDIM is a baseline already
        solvers[BASE] = base_scheduler(scheduler)
        rivals.append(BASE)
    seed = int(cfg.data.seed) + VALIDATION_SEED_OFFSET
    samples = evaluate_world(wcfg, solvers, num_steps, None, backend=backend if same_world else None,
                             reward=reward if same_world else None, seed=seed, max_samples=int(v.num_samples))
    metrics = check_metrics(samples)
    scores = gate_scores(samples, "ours", num_steps, metrics, rivals, float(v.tolerance_se),
                         base=BASE if BASE in solvers else "DDIM")
    verdicts = gate_verdicts(scores, v.gate)
    losing = [K for K, verdict in verdicts.items() if verdict in ("base solver", "dropped")]
    per_k = {str(K): {"verdict": verdicts[K], "loses": s["loses"], **{m: s[m] for m in metrics}}
             for K, s in scores.items()}
    num_samples = len(samples[("ours", num_steps[0])][metrics[0]]) if metrics else 0
    falls = [{"K": K, "metric": m, "drop": drop, "se": se}  # before the gate acted: ours at K below ours at K-1
             for K, m, drop, se in world_checks(samples, "ours", num_steps, rivals)["not_rising"]]
    record = {"world": world.name, "description": world.description, "num_samples": num_samples, "seed": seed,
              "gate": v.gate, "tolerance_se": float(v.tolerance_se), "metrics": metrics, "rivals": rivals,
              "num_steps": per_k, "falls": falls}
    apply_gate(scheduler, losing, v.gate)
    scheduler.register_to_config(validation=record)
    for line in gate_lines(record):
        logger.info("%s", line)
    warn_about(record, scheduler.config.base_solver)
    return record


#: What the warning says was done with the losing K of each verdict.
VERDICT_ACTIONS = {"kept": "kept anyway (validation.gate=report)", "base solver": "exported with the base solver's table",
                   "dropped": "not exported"}


def warn_about(record: dict, base_solver: str) -> None:
    """One ``warnings.warn`` per kind of news in a gate ``record``: K that fell from K-1, and the
    losing K grouped by what the gate did with them."""
    world = record["world"]
    if record["falls"]:
        warnings.warn(f"validation gate: quality falls with K on {world} (" + "; ".join(
            f"K={f['K']} below K={f['K'] - 1} on {f['metric']} by {f['drop']:.3g} ± {f['se']:.2g}"
            for f in record["falls"]) + "): the larger K is not the better preview there", stacklevel=3)
    lost: Dict[str, List[int]] = {}
    for K, entry in record["num_steps"].items():
        if entry["loses"]:
            lost.setdefault(entry["verdict"], []).append(int(K))
    for verdict, ks in lost.items():
        details = "; ".join(loss_text(record, K) for K in ks)
        if verdict == "kept: base behind":
            warnings.warn(f"validation gate: K={ks} trail a training-free solver on {world} ({details}) but the "
                          f"base solver ({base_solver}) is behind them too: kept", stacklevel=3)
        else:
            warnings.warn(f"validation gate: K={ks} lost to a training-free solver on {world} ({details}): "
                          f"{VERDICT_ACTIONS[verdict]}", stacklevel=3)


def loss_text(record: dict, K: int) -> str:
    """``K=8: mode_agreement -0.031 ± 0.012 vs UniPC`` for each metric it lost on."""
    entry = record["num_steps"][str(K)]
    parts = [f"{m} {entry[m]['gap']:+.3g} ± {entry[m]['gap_se']:.2g} vs {entry[m]['best']}" for m in record["metrics"]
             if entry[m]["gap"] < -record["tolerance_se"] * entry[m]["gap_se"]]
    return f"K={K}: " + ", ".join(parts)


def gate_lines(record: dict) -> List[str]:
    """The gate's result in words, one line per K."""
    lines = [f"validation gate ({record['gate']}) on {record['world']}, {record['num_samples']} samples, ours vs the "
             f"best of {', '.join(record['rivals'])}:"]
    for K, entry in record["num_steps"].items():
        cells = [f"{m} {entry[m]['ours']:.3f} vs {entry[m]['best_value']:.3f} ({entry[m]['best']}), base "
                 f"{entry[m]['base_value']:.3f}" for m in record["metrics"]]
        lines.append(f"  K={K}: {entry['verdict']:<17} " + "; ".join(cells))
    return lines


__all__ = ["BASE", "VALIDATION_SEED_OFFSET", "apply_gate", "base_scheduler", "gate_lines", "gate_scores", "gate_verdicts",
           "loss_text", "warn_about",
           "validate_scheduler"]
