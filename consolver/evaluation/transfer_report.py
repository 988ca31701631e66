"""Transfer tables and the targets' checks (markdown and CSV), from
:func:`consolver.evaluation.transfer.evaluate_world`'s per-sample metrics.

Checks, per world and solver of ours (differences are paired: the same noises and targets):
- **behind**: a K where ours is below the best training-free solver at that K by more than one
  standard error of the paired difference, on the agreement metric or pixel PSNR;
- **not rising**: a K where ours at K+1 is below ours at K by more than one standard error;
- **ours@4 vs DPM-Solver++@8**: the paired difference, where both were evaluated.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from consolver.evaluation.report import FRACTION_METRICS as FRACTIONS
from consolver.evaluation.transfer import agreement_metric, mean_se, paired_gap

REFERENCE_BASELINE = "DPM-Solver++ 2M"

Samples = Mapping[Tuple[str, int], Mapping[str, torch.Tensor]]


def _fmt(metric: str, value: float) -> str:
    return f"{value:.3f}" if metric in FRACTIONS else f"{value:.2f}"


def _gap_cell(gap, metric: str) -> str:
    """``+0.012 ± 0.004``; bold where ours is behind by more than one standard error."""
    if gap is None:
        return "-"
    d = 3 if metric in FRACTIONS else 2
    text = f"{gap[1]:+.{d}f} ± {gap[2]:.{d}f}"
    return f"**{text}**" if gap[1] < -gap[2] else text


def table_metrics(samples: Samples) -> List[str]:
    """Metric names in first-seen order."""
    names: Dict[str, None] = {}
    for metrics in samples.values():
        names.update(dict.fromkeys(metrics))
    return list(names)


def check_metrics(samples: Samples) -> List[str]:
    """The metrics the targets are checked on: the world's agreement metric and pixel PSNR."""
    metrics = table_metrics(samples)
    agreement = agreement_metric(dict.fromkeys(metrics))
    return [m for m in (agreement, "pixel_psnr") if m is not None and m in metrics]


def world_checks(samples: Samples, ours: str, steps: Sequence[int], baselines: Sequence[str]) -> dict:
    """``{"behind": [(K, metric, best, gap, se)], "not_rising": [(K, metric, drop, se)],
    "preview_vs_8": {metric: (gap, se)} or {}}`` for ``ours`` (see the module docstring)."""
    behind, not_rising, preview = [], [], {}
    for metric in check_metrics(samples):
        for K in steps:
            gap = paired_gap(samples, ours, K, metric, baselines)
            if gap is not None and gap[1] < -gap[2]:
                behind.append((K, metric, gap[0], gap[1], gap[2]))
        ks = [K for K in sorted(steps) if (ours, K) in samples]
        for lo, hi in zip(ks, ks[1:]):
            diff = samples[(ours, hi)][metric].double() - samples[(ours, lo)][metric].double()
            mean, se = float(diff.mean()), mean_se(diff)[1]
            if mean < -se:
                not_rising.append((hi, metric, -mean, se))
        if (ours, 4) in samples and (REFERENCE_BASELINE, 8) in samples:
            diff = samples[(ours, 4)][metric].double() - samples[(REFERENCE_BASELINE, 8)][metric].double()
            preview[metric] = mean_se(diff)
    return {"behind": behind, "not_rising": not_rising, "preview_vs_8": preview}


def world_markdown(world, samples: Samples, ours: Sequence[str], steps: Sequence[int], baselines: Sequence[str],
                   num_samples: int) -> str:
    """One world's section: a table (rows K; columns the baselines and ours; cells every metric
    separated by " / "), the gap to the best baseline, and the checks in words."""
    metrics = table_metrics(samples)
    solvers = [b for b in baselines if any((b, K) in samples for K in steps)] + list(ours)
    checked = check_metrics(samples)
    lines = [f"### {world.name}: {world.description}", "",
             f"{num_samples} samples; cells: {' / '.join(metrics)} (mean); gap: ours minus the best training-free "
             f"solver at that K, ± the paired standard error", "",
             "| K | " + " | ".join(solvers) + "".join(f" | gap {m} ({o})" for o in ours for m in checked) + " |",
             "|---" * (1 + len(solvers) + len(ours) * len(checked)) + "|"]
    for K in steps:
        cells = []
        for name in solvers:
            got = samples.get((name, K))
            cells.append(" / ".join(_fmt(m, mean_se(got[m])[0]) for m in metrics) if got else "-")
        for o in ours:
            for m in checked:
                cells.append(_gap_cell(paired_gap(samples, o, K, m, baselines), m))
        lines.append(f"| {K} | " + " | ".join(cells) + " |")
    lines.append("")
    for o in ours:
        checks = world_checks(samples, o, steps, baselines)
        lines.append(f"- {o}: " + "; ".join(check_lines(checks)))
    return "\n".join(lines) + "\n"


def check_lines(checks: dict) -> List[str]:
    """The checks of :func:`world_checks` in words."""
    out = []
    if checks["behind"]:
        out.append("behind the best training-free solver at " + ", ".join(
            f"K={K} on {m} ({gap:+.3f} ± {se:.3f} vs {best})" for K, m, best, gap, se in checks["behind"]))
    else:
        out.append("never behind the best training-free solver beyond one standard error")
    if checks["not_rising"]:
        out.append("quality falls at " + ", ".join(f"K={K} on {m} (-{d:.3f} ± {se:.3f})"
                                                   for K, m, d, se in checks["not_rising"]))
    else:
        out.append("rises (or holds) with every K")
    for m, (gap, se) in checks["preview_vs_8"].items():
        out.append(f"@4 vs {REFERENCE_BASELINE}@8 on {m}: {gap:+.3f} ± {se:.3f}")
    return out


def csv_rows(world_name: str, samples: Samples, ours: Sequence[str], baselines: Sequence[str]) -> List[dict]:
    """One row per (solver, K): world, solver, kind, K, each metric's mean and ``_se``, and for
    ours on the checked metrics ``gap_<metric>``/``gap_<metric>_se``/``best_<metric>`` (to the best
    baseline) and ``rise_<metric>``/``rise_<metric>_se`` (from K-1; paired)."""
    rows = []
    checked = check_metrics(samples)
    for (name, K), metrics in samples.items():
        row = {"world": world_name, "solver": name, "kind": "ours" if name in ours else "baseline", "K": K,
               "num_samples": len(next(iter(metrics.values())))}
        for m, values in metrics.items():
            row[m], row[f"{m}_se"] = mean_se(values)
        if name in ours:
            for m in checked:
                gap = paired_gap(samples, name, K, m, baselines)
                if gap is not None:
                    row[f"best_{m}"], row[f"gap_{m}"], row[f"gap_{m}_se"] = gap
                if (name, K - 1) in samples:  # paired change from K-1 (quality rises with K)
                    row[f"rise_{m}"], row[f"rise_{m}_se"] = mean_se(
                        samples[(name, K)][m].double() - samples[(name, K - 1)][m].double())
        rows.append(row)
    return rows


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    """Rows with the union of their keys as columns (first-seen order)."""
    columns: Dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


__all__ = ["check_lines", "check_metrics", "csv_rows", "table_metrics", "world_checks", "world_markdown", "write_csv"]
