"""Evaluation reports: "steps saved", a markdown table, a CSV and a quality-vs-NFE plot.

Rows are the dicts :func:`consolver.evaluation.evaluate` returns: ``solver``, ``kind``
(``"ours"`` | ``"baseline"``), ``K``, ``nfe``, metrics and their ``<metric>_se``.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)

#: Metrics shown with three decimals (fractions); the rest (dB, x100 scales) with two.
FRACTION_METRICS = ("mode_agreement", "scene_agreement")
#: Metrics shown with four decimals (KID: ~1e-3..1e-1; :mod:`consolver.evaluation.fid`).
SMALL_METRICS = ("kid", "kid_ref")
BOOKKEEPING = ("solver", "kind", "K", "nfe", "num_samples")


def metric_names(rows: Sequence[dict]) -> List[str]:
    """Metric columns of ``rows`` in first-seen order (without ``_se`` columns)."""
    names: Dict[str, None] = {}
    for row in rows:
        for key in row:
            if key not in BOOKKEEPING and not key.endswith("_se"):
                names.setdefault(key)
    return list(names)


def _is_baseline(row: dict, ours: Sequence[str]) -> bool:
    return row.get("kind", "baseline") == "baseline" and row["solver"] not in ours


def steps_saved(rows: Sequence[dict], ours_name: str, metric: str,
                ours: Optional[Sequence[str]] = None, baseline: Optional[str] = None) -> Dict[int, Optional[int]]:
    """For each K of ``ours_name``: the smallest NFE at which the best baseline (the maximum of
    ``metric`` over baseline rows at that NFE) reaches ``ours_name``'s ``metric`` at K, or
    ``None`` if no evaluated NFE does. Baselines are rows of kind ``"baseline"`` (rows without
    ``kind`` count as baselines) whose solver is not ``ours_name`` nor in ``ours``; only the
    solver named ``baseline`` when given (e.g. ``"DPM-Solver++ 2M"``)."""
    exclude = [ours_name, *(ours or ())]
    best: Dict[int, float] = {}
    for row in rows:
        if baseline is not None and row["solver"] != baseline:
            continue
        if _is_baseline(row, exclude) and metric in row and not math.isnan(row[metric]):
            nfe = int(row.get("nfe", row["K"]))
            best[nfe] = max(best.get(nfe, -math.inf), float(row[metric]))
    result: Dict[int, Optional[int]] = {}
    for row in sorted((r for r in rows if r["solver"] == ours_name), key=lambda r: r["K"]):
        reached = [nfe for nfe, value in best.items() if value >= float(row[metric])]
        result[int(row["K"])] = min(reached) if reached else None
    return result


def steps_saved_line(rows: Sequence[dict], ours_name: str, metric: str, ours: Optional[Sequence[str]] = None,
                     baseline: Optional[str] = None) -> str:
    """``"steps saved by NAME (metric; ...): K=3 -> NFE 5 (2 saved); K=4 -> > 12; K=6 -> NFE 5 (none saved)"``,
    from :func:`steps_saved` (``> max NFE`` where no evaluated baseline NFE reaches it); against
    the one solver ``baseline`` when given."""
    saved = steps_saved(rows, ours_name, metric, ours, baseline)
    exclude = [ours_name, *(ours or ())]
    max_nfe = max((int(r.get("nfe", r["K"])) for r in rows if _is_baseline(r, exclude)
                   and (baseline is None or r["solver"] == baseline)), default=None)
    parts = []
    for K, nfe in saved.items():
        if nfe is None:
            parts.append(f"K={K} -> > {max_nfe}" if max_nfe is not None else f"K={K} -> no baseline")
        else:
            parts.append(f"K={K} -> NFE {nfe} ({nfe - K} saved)" if nfe > K else f"K={K} -> NFE {nfe} (none saved)")
    against = "the best baseline" if baseline is None else baseline
    return (f"steps saved by {ours_name} ({metric}; the smallest NFE at which {against} reaches its "
            f"quality): " + ("; ".join(parts) if parts else "no rows"))


#: The baseline the paper counts steps saved against.
STEPS_SAVED_BASELINE = "DPM-Solver++ 2M"


def learned_solver_markdown(name: str, scheduler, num_steps: Sequence[int]) -> str:
    """Per K, the grid a scheduler solves on (learned or configured) beside its coefficient table."""
    lines = [f"### {name}: grids and coefficient tables", ""]
    learned = scheduler.step_grids
    for K in num_steps:
        if scheduler.available_num_steps and K not in scheduler.available_num_steps:
            continue
        times = scheduler.step_positions(K)[:-1]
        kind = "learned" if K in learned else scheduler.config.timestep_spacing
        unit = "timesteps" if scheduler.config.schedule == "vp" else "unshifted sigmas"
        grid = ", ".join(f"{t:g}" if scheduler.config.schedule == "vp" else f"{t:.4f}" for t in times)
        lines += [f"- K={K}, {kind} grid ({unit}): {grid}"]
        table = (scheduler.config.coefficient_tables or {}).get(str(K))
        if table is not None:
            rows = "; ".join("[" + ", ".join(f"{w:+.3f}" for w in row) + "]" for row in table)
            lines += [f"  - coefficients (newest first): {rows}"]
    return "\n".join(lines)


def _fmt(metric: str, value, se=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    digits = 3 if metric in FRACTION_METRICS else 4 if metric in SMALL_METRICS else 2
    text = f"{value:.{digits}f}"
    if se is not None and not math.isnan(se):
        text += f" ± {se:.{digits}f}"
    return text


def solver_order(rows: Sequence[dict]) -> List[str]:
    """Solvers in first-seen order, ours first."""
    names = list(dict.fromkeys(r["solver"] for r in rows))
    return [n for n in names if any(r["solver"] == n and r.get("kind") == "ours" for r in rows)] + \
        [n for n in names if not any(r["solver"] == n and r.get("kind") == "ours" for r in rows)]


def markdown_tables(rows: Sequence[dict], metrics: Optional[Sequence[str]] = None) -> str:
    """A compact table (solver x K, cells ``m1 / m2 / ...``) and the long table (one row per solver
    and K, ``mean ± se`` per metric)."""
    metrics = list(metrics or metric_names(rows))
    Ks = sorted({int(r["K"]) for r in rows})
    by = {(r["solver"], int(r["K"])): r for r in rows}
    lines = [f"Cells: {' / '.join(metrics)} (means over samples).", "",
             "| solver | " + " | ".join(f"K={K}" for K in Ks) + " |", "|---|" + "---|" * len(Ks)]
    for name in solver_order(rows):
        cells = [" / ".join(_fmt(m, by[(name, K)].get(m)) for m in metrics) if (name, K) in by else "-" for K in Ks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| solver | K | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name in solver_order(rows):
        for K in Ks:
            if (name, K) in by:
                row = by[(name, K)]
                lines.append(f"| {name} | {K} | " + " | ".join(_fmt(m, row.get(m), row.get(f"{m}_se")) for m in metrics) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: Path) -> None:
    """One line per (solver, K): bookkeeping columns, then each metric and its ``_se``."""
    metrics = metric_names(rows)
    columns = [c for c in BOOKKEEPING if any(c in r for r in rows)] + [c for m in metrics for c in (m, f"{m}_se")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})


def plot_quality(rows: Sequence[dict], path: Path, metrics: Sequence[str], title: str = "") -> None:
    """PNG: one panel per metric against NFE, a line per solver; ours thick with large markers."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name in solver_order(rows):
            points = sorted((int(r.get("nfe", r["K"])), r[metric], r.get(f"{metric}_se", float("nan")))
                            for r in rows if r["solver"] == name and metric in r)
            if not points:
                continue
            x, y, se = zip(*points)
            ours = any(r.get("kind") == "ours" for r in rows if r["solver"] == name)
            style = dict(lw=2.8, marker="*", ms=13, zorder=3) if ours else dict(lw=1.3, marker="o", ms=4, alpha=0.85)
            line, = ax.plot(x, y, label=name, **style)
            if not all(math.isnan(v) for v in se):
                ax.fill_between(x, [a - b for a, b in zip(y, se)], [a + b for a, b in zip(y, se)],
                                color=line.get_color(), alpha=0.12, lw=0)
        ax.set_xlabel("NFE (model evaluations)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.set_xticks(sorted({int(r.get("nfe", r["K"])) for r in rows}))
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: Sequence[dict], out_dir, metric: Optional[str] = None, ours: Optional[Sequence[str]] = None,
                 notes: Sequence[str] = (), header: str = "", name: str = "eval",
                 sections: Sequence[str] = ()) -> Dict[str, Path]:
    """Write ``<name>.md``, ``<name>.csv`` and ``<name>.png`` into ``out_dir``.

    ``metric``: the quality metric of the plot's first panel and of "steps saved" (default: the
    first metric of the rows, i.e. the first configured reward). ``ours``: our solvers' names
    (default: rows of kind ``"ours"``). ``notes`` (e.g. skipped K) and ``header`` go into the
    markdown, ``sections`` (e.g. :func:`learned_solver_markdown`) after the tables. Returns
    ``{"md": path, "csv": path, "png": path}``.
    """
    if not rows:
        raise ValueError("no evaluation rows to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = metric_names(rows)
    metric = metric or metrics[0]
    if metric not in metrics:
        raise ValueError(f"metric {metric!r} is not in the rows; metrics: {', '.join(metrics)}")
    ours = list(ours) if ours is not None else list(dict.fromkeys(r["solver"] for r in rows if r.get("kind") == "ours"))
    paths = {"md": out_dir / f"{name}.md", "csv": out_dir / f"{name}.csv", "png": out_dir / f"{name}.png"}
    write_csv(rows, paths["csv"])
    plotted = [metric] + [m for m in ("pixel_psnr", "mode_agreement", "scene_agreement") if m in metrics and m != metric]
    plot_quality(rows, paths["png"], plotted)
    saved = [steps_saved_line(rows, n, metric, ours) for n in ours]
    if any(r["solver"] == STEPS_SAVED_BASELINE for r in rows):
        saved += [steps_saved_line(rows, n, metric, ours, STEPS_SAVED_BASELINE) for n in ours]
    text = [header.strip(), ""] if header.strip() else []
    text += [markdown_tables(rows, [metric] + [m for m in metrics if m != metric]), ""]
    text += [f"- {line}" for line in saved]
    text += [f"- note: {n}" for n in notes]
    text += [part for section in sections for part in ("", section)]
    text += ["", f"![quality against NFE]({paths['png'].name})", ""]
    paths["md"].write_text("\n".join(text), encoding="utf-8")
    logger.debug("wrote %s, %s, %s", *paths.values())
    return paths


__all__ = ["STEPS_SAVED_BASELINE", "learned_solver_markdown", "markdown_tables", "metric_names", "plot_quality", "steps_saved", "steps_saved_line", "write_csv",
           "write_report"]
