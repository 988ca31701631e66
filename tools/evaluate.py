"""Evaluate trained solvers against the baselines at NFE 3..12 on held-out prompts x fresh noises.

    python tools/evaluate.py outputs/toy_depth/scheduler --config conf/toy_depth.yaml
    python tools/evaluate.py outputs/a/scheduler b=outputs/b/scheduler --steps 3-8 --num-noises 64 guidance=3

Positional arguments are scheduler directories (``ConsistencySolverScheduler.from_pretrained``;
the first plain path is named "ConsistencySolver", later plain paths after their run folder, or
``NAME=DIR``) and ``key=value`` config overrides (a key with a dot, or a top-level config key such
as ``guidance``). A K a solver has no table for is skipped with a note; with no directory the
baselines alone are evaluated. Baselines: DDIM, DPM-Solver++ 2M, UniPC, DEIS (landing on x0 like
the others), Adams-Bashforth 2 in rho and iPNDM of order min(solver.order, 4).

With ``--fid`` (and ``--inception-weights PATH``), FID and KID of every solver's previews against
the full-step targets join the tables (``fid``, ``kid``), and against the images of ``--fid-reference
DIR`` (``fid_ref``, ``kid_ref``): see docs/fid.md.

Writes ``eval.md`` (tables, "steps saved"), ``eval.csv`` (one row per solver and K, means and
standard errors) and ``eval.png`` (quality against NFE) into ``--out`` (default: ``eval/`` beside
the first solver directory, i.e. ``<run>/eval`` for ``<run>/scheduler``; with no solver
``<output_dir>/eval``). Solves, decodes and reward calls run ``--batch-size`` samples at a time
(default ``data.solve_batch_size``), so memory stays bounded for any number of samples. Targets: ``reference.num_steps`` of ``reference.solver``; noise seeds
from ``data.seed + EVAL_SEED_OFFSET`` (never a training noise).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "toy_depth.yaml"
OURS = "ConsistencySolver"
log = logging.getLogger("evaluate")


def parse_steps(text: str) -> list[int]:
    """``"3-12"``, ``"3,4,8"`` or ``"3-6,8,12"`` -> sorted unique K values."""
    steps: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"--steps {text!r}: use e.g. 3-12 or 3,4,8")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if lo < 1 or hi < lo:
            raise ValueError(f"--steps {text!r}: ranges must be increasing and >= 1")
        steps.update(range(lo, hi + 1))
    if not steps:
        raise ValueError("--steps is empty")
    return sorted(steps)


def split_positionals(items: list[str]) -> tuple[dict[str, Path], list[str]]:
    """``(solvers {name: dir}, overrides)`` from the positional arguments."""
    from consolver.config import Config

    top_level = {f.name for f in dataclasses.fields(Config)}
    solvers: dict[str, Path] = {}
    overrides: list[str] = []
    for item in items:
        key, eq, value = item.partition("=")
        if eq and ("." in key or key in top_level):
            overrides.append(item)
            continue
        name, path = (key, value) if eq else (None, item)
        if name is None:
            name = OURS if not solvers else _name_from_path(Path(path))
        if not name or name in solvers:
            raise ValueError(f"solver name {name!r} is empty or given twice; use NAME=DIR")
        solvers[name] = Path(path)
    return solvers, overrides


def _name_from_path(path: Path) -> str:
    path = path.resolve()
    return path.parent.name if path.name == "scheduler" else path.name


def check_solver_dir(name: str, path: Path) -> None:
    """A one-line ``FileNotFoundError`` unless ``path`` is a saved scheduler directory."""
    if not path.is_dir():
        raise FileNotFoundError(f"scheduler directory {str(path)!r} ({name}) not found; pass the folder that "
                                f"training wrote, e.g. <output_dir>/scheduler")
    if not (path / "scheduler_config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} ({name}) has no scheduler_config.json: not a saved scheduler directory")


def load_solver(name: str, path: Path):
    """``ConsistencySolverScheduler.from_pretrained(path)``."""
    from consolver.scheduler import ConsistencySolverScheduler

    check_solver_dir(name, path)
    return ConsistencySolverScheduler.from_pretrained(str(path))


def default_out(solver_dirs: dict[str, Path], cfg) -> Path:
    """``eval/`` beside the first solver directory (``<run>/scheduler`` -> ``<run>/eval``); with no
    solver, ``<output_dir>/eval``."""
    if solver_dirs:
        return next(iter(solver_dirs.values())).resolve().parent / "eval"
    return Path(cfg.output_dir) / "eval"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", metavar="SCHEDULER_DIR|NAME=DIR|key=value",
                        help="scheduler directories (none: the baselines alone) and config overrides")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: conf/toy_depth.yaml)")
    parser.add_argument("--num-noises", type=int, default=128, help="fresh noises per held-out prompt (default 128)")
    parser.add_argument("--steps", default=None,
                        help="K values = NFE, e.g. 3-12 or 3,4,8 (default 3-12; with --transfer 3-8)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: eval/ beside the first solver directory, else <output_dir>/eval)")
    parser.add_argument("--baselines", default=None,
                        help="comma-separated baseline names or prefixes (e.g. ddim,dpm,unipc), or 'none'; default all")
    parser.add_argument("--metric", default=None, help="quality metric of the plot and 'steps saved' (default: first reward)")
    parser.add_argument("--seed", type=int, default=None, help="noise base seed (default: data.seed + EVAL_SEED_OFFSET)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="samples per model call, decode and reward call (default: data.solve_batch_size)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="show every library's log lines and warnings")
    parser.add_argument("--transfer", metavar="WORLDS", default=None,
                        help="evaluate on transfer worlds instead (consolver.evaluation.transfer): 'all' or names, "
                             "e.g. other_prompts,toy_unet; writes transfer.md and transfer.csv")
    fid = parser.add_argument_group("FID/KID (docs/fid.md): columns fid, kid[, fid_ref, kid_ref]; on with any of these")
    fid.add_argument("--fid", action="store_true", help="FID/KID of the previews against the full-step targets")
    fid.add_argument("--inception-weights", metavar="PATH", default=None,
                     help="local FID Inception state dict (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
    fid.add_argument("--fid-reference", metavar="DIR", default=None,
                     help="also FID/KID against the images in DIR (columns fid_ref, kid_ref)")
    fid.add_argument("--fid-batch-size", type=int, default=64, help="images per Inception batch (default 64)")
    fid.add_argument("--kid-subset-size", type=int, default=1000,
                     help="KID subset size, capped at the number of images (default 1000)")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from consolver.console import setup_console

    setup_console("evaluate", args.verbose)
    from consolver.config import load_config

    start = time.perf_counter()
    solver_dirs, overrides = split_positionals(args.items)
    steps = parse_steps(args.steps or ("3-8" if args.transfer else "3-12"))
    if args.num_noises < 1:
        raise ValueError(f"--num-noises must be >= 1, got {args.num_noises}")
    for name, path in solver_dirs.items():  # before the config: a wrong path fails fast
        check_solver_dir(name, path)
    if args.metric and args.metric.startswith(("fid", "kid")):
        raise ValueError(f"--metric {args.metric}: FID/KID are lower-is-better; 'steps saved' needs a quality metric")
    use_fid = args.fid or args.fid_reference is not None or args.inception_weights is not None
    if use_fid:
        from consolver.evaluation.fid import check_weights_path, list_images

        check_weights_path(args.inception_weights)
        if args.fid_reference is not None:
            list_images(args.fid_reference)
    cfg = load_config(args.config, overrides)
    solvers = {name: load_solver(name, path) for name, path in solver_dirs.items()}
    if args.transfer:
        if use_fid:
            raise ValueError("--transfer reports agreement, PSNR and the reward; run FID/KID without it")
        return transfer_main(args, argv, cfg, solvers, solver_dirs, steps, start)

    import torch
    from tqdm import tqdm

    from consolver.backends import build_backend
    from consolver.evaluation import (STEPS_SAVED_BASELINE, baseline_schedulers, check_schedule_match, evaluate,
                                      learned_solver_markdown, make_eval_set, steps_saved_line, write_report)
    from consolver.rewards import build_rewards

    if args.threads:
        torch.set_num_threads(args.threads)
    backend = build_backend(cfg.backend)
    for name, scheduler in solvers.items():  # before the reference solves: a mismatch fails fast
        check_schedule_match(name, scheduler, backend, f"--config {args.config}")
    reward = build_rewards(cfg.rewards).to(backend.device) if cfg.rewards else None
    names = None if args.baselines is None else [n for n in args.baselines.split(",") if n.strip() and n != "none"]
    baselines = baseline_schedulers(cfg, backend, names=names)
    log.info("reference solves: %s x %d steps for %d noises per prompt", cfg.reference.solver, cfg.reference.num_steps,
             args.num_noises)
    eval_set = make_eval_set(cfg, backend, reward, args.num_noises, seed=args.seed, batch_size=args.batch_size)
    fid_kid = None
    if use_fid:
        from consolver.evaluation.fid import build_fid_kid

        fid_kid = build_fid_kid(eval_set.target_image, args.inception_weights, args.fid_reference,
                                batch_size=args.fid_batch_size, kid_subset_size=args.kid_subset_size,
                                device=backend.device)
    ref_seconds = time.perf_counter() - start
    notes: list[str] = []
    bar = tqdm(total=(len(solvers) + len(baselines)) * len(steps), unit="solve", disable=args.no_progress,
               dynamic_ncols=True)

    def progress(name: str, K: int) -> None:
        bar.set_postfix_str(f"{name} K={K}")
        bar.update(1)

    try:
        rows = evaluate(cfg, solvers, steps, args.num_noises, backend=backend, reward=reward, eval_set=eval_set,
                        baselines=baselines, batch_size=args.batch_size, notes=notes, on_progress=progress,
                        image_metrics=fid_kid)
    finally:
        bar.close()
    if not rows:
        raise ValueError("nothing was evaluated: " + "; ".join(notes))
    seconds = time.perf_counter() - start
    out = Path(args.out) if args.out else default_out(solver_dirs, cfg)
    header = "\n".join([
        "# Evaluation: previews against full-step targets", "",
        f"`{shlex.join(['python', 'tools/evaluate.py', *(argv if argv is not None else sys.argv[1:])])}`", "",
        f"- {len(eval_set)} samples: {len(set(eval_set.prompts))} prompts x {args.num_noises} noises "
        f"(base seed {eval_set.base_seed}); targets: {cfg.reference.num_steps}-step {cfg.reference.solver}, "
        f"guidance {cfg.guidance}, {cfg.solver.timestep_spacing} spacing; NFE = K for every solver",
        "- ours: " + ", ".join(f"{n} = `{p}`" for n, p in solver_dirs.items()),
        f"- {seconds:.0f} s in all ({ref_seconds:.0f} s to load the models and solve the targets)",
    ] + ([fid_kid.describe()] if fid_kid is not None else []))
    metric = args.metric or (cfg.rewards[0].name if cfg.rewards else "pixel_psnr")
    sections = [learned_solver_markdown(name, scheduler, steps) for name, scheduler in solvers.items()]
    paths = write_report(rows, out, metric=metric, ours=list(solvers), notes=notes, header=header, sections=sections)
    for name in solvers:
        print(steps_saved_line(rows, name, metric, list(solvers)))
        if any(r["solver"] == STEPS_SAVED_BASELINE for r in rows):
            print(steps_saved_line(rows, name, metric, list(solvers), STEPS_SAVED_BASELINE))
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {paths['md']}, {paths['csv']}, {paths['png']} ({seconds:.1f} s)")
    return {"rows": rows, "paths": paths, "notes": notes, "seconds": seconds}


def transfer_main(args, argv, cfg, solvers: dict, solver_dirs: dict, steps: list[int], start: float) -> dict:
    """``--transfer``: every solver and the transfer baselines on each world; transfer.md/.csv."""
    import torch
    from tqdm import tqdm

    from consolver.evaluation.transfer import TRANSFER_BASELINES, evaluate_world, select_worlds, world_config
    from consolver.evaluation.transfer_report import check_lines, csv_rows, world_checks, world_markdown, write_csv

    if args.threads:
        torch.set_num_threads(args.threads)
    worlds = select_worlds(args.transfer, cfg.backend.name)
    configs = {w.name: world_config(w, cfg) for w in worlds}  # every config error before any solve
    out = Path(args.out) if args.out else default_out(solver_dirs, cfg)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(worlds) * (len(solvers) + len(TRANSFER_BASELINES)) * len(steps), unit="solve",
               disable=args.no_progress, dynamic_ncols=True)
    sections, rows = [], []
    try:
        for world in worlds:
            noises = min(args.num_noises, world.max_noises or args.num_noises)

            def progress(name: str, K: int, world=world) -> None:
                bar.set_postfix_str(f"{world.name}: {name} K={K}")
                bar.update(1)

            samples = evaluate_world(configs[world.name], solvers, steps, noises, on_progress=progress)
            num_samples = len(next(iter(next(iter(samples.values())).values())))
            sections.append(world_markdown(world, samples, list(solvers), steps, TRANSFER_BASELINES, num_samples))
            rows += csv_rows(world.name, samples, list(solvers), TRANSFER_BASELINES)
            for name in solvers:
                bar.write(f"{world.name} ({name}): " + "; ".join(
                    check_lines(world_checks(samples, name, steps, TRANSFER_BASELINES))))
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    header = "\n".join([
        "# Transfer: solvers on worlds they were not trained on", "",
        f"`{shlex.join(['python', 'tools/evaluate.py', *(argv if argv is not None else sys.argv[1:])])}`", "",
        "- ours: " + ", ".join(f"{n} = `{p}`" for n, p in solver_dirs.items()),
        f"- targets: each world's reference solver ({cfg.reference.num_steps}-step {cfg.reference.solver} unless "
        f"the world's config says otherwise); NFE = K for every solver; {seconds:.0f} s in all", ""])
    md = out / "transfer.md"
    md.write_text(header + "\n".join(sections), encoding="utf-8")
    path = write_csv(rows, out / "transfer.csv")
    print(f"wrote {md}, {path} ({seconds:.1f} s)")
    return {"rows": rows, "paths": {"md": md, "csv": path}, "seconds": seconds}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # bad paths, config (ConfigError is a ValueError) or K: one line
        sys.exit(f"evaluate: error: {err}")
