"""Train a ConsistencySolver and export it as a diffusers scheduler.

    python tools/fit.py                                   # the toy default, conf/toy_depth.yaml
    python tools/fit.py --config conf/toy_seg.yaml algo.name=ppo trainer.max_steps=300
    python tools/fit.py --config conf/toy_depth.yaml --resume     # continue from <output_dir>/checkpoints/last.ckpt
    python tools/fit.py output_dir=outputs/run2           # a new run; an output_dir that holds one is refused
    python tools/fit.py --print-config                    # the resolved config, then exit
    torchrun --nproc-per-node 2 tools/fit.py --config ... trainer.strategy=ddp trainer.devices=2

Writes ``<output_dir>/scheduler/`` (load it with ``ConsistencySolverScheduler.from_pretrained``),
``checkpoints/`` and TensorBoard logs in ``tb/``. If the config's shards are missing (toy
configs), they are made first. Every count (``trainer.max_steps``, checkpoint names, the
progress bar) is in iterations. Ctrl-C or SIGTERM (SLURM preemption) saves
``checkpoints/last.ckpt`` after the current iteration, exports the solver trained so far and
prints the command that resumes; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "toy_depth.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: conf/toy_depth.yaml, the toy world)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. algo.name=ppo")
    parser.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoints/last.ckpt")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in output_dir (its checkpoints, solver, logs; shards are kept)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in batch logs)")
    parser.add_argument("--verbose", action="store_true", help="show every library's log lines and warnings")
    return parser.parse_args(argv)


def ensure_shards(cfg, progress: bool, log) -> None:
    """Make the config's shards if ``data.shard_dir`` holds none (and no explicit shards are set)."""
    from consolver.config import ConfigError

    shard_dir = Path(cfg.data.shard_dir)
    if cfg.data.train_shards or (any(shard_dir.glob("*.tar")) and not any(shard_dir.glob("*.partial"))):
        return
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError(f"no shards in {cfg.data.shard_dir!r}: make them first, e.g. "
                          f"torchrun --nproc-per-node N tools/make_shards.py --config ... (same config)")
    from tqdm import tqdm

    from consolver.data.writer import make_shards

    log.info("no complete shards in %s: making %d samples first (tools/make_shards.py does the same)", shard_dir,
             cfg.data.num_samples)
    bar = tqdm(unit="sample", desc="make shards", disable=not progress, dynamic_ncols=True)
    try:
        make_shards(cfg, 0, 1, on_start=lambda n: bar.reset(total=n), on_progress=bar.update)
    finally:
        bar.close()


def resume_command(args) -> str:
    """The command line that continues this run."""
    parts = ["python tools/fit.py"] + (["--config", args.config] if args.config else [])
    return " ".join(parts + list(args.overrides) + ["--resume"])


def main(argv=None):
    args = parse_args(argv)
    from consolver.console import setup_console

    log = setup_console("fit", args.verbose)
    from consolver.config import load_config

    cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return None
    from consolver.console import quiet_libraries
    from consolver.runs import prepare_run
    from consolver.train import launched_as_rank_zero

    if not args.verbose:
        quiet_libraries()

    if launched_as_rank_zero():  # before the shards are made: a refused run writes nothing
        prepare_run(cfg, resume=args.resume, overwrite=args.overwrite)
    ensure_shards(cfg, not args.no_progress, log)
    from consolver.train import fit

    result = fit(cfg, resume=args.resume, progress_bar=False if args.no_progress else None, overwrite=args.overwrite)
    if result.scheduler_dir is not None:
        path = result.scheduler_dir
        config = args.config or "conf/toy_depth.yaml"
        if result.interrupted:
            print(f"\n{result.interrupted}: stopped after iteration {result.iteration} of {cfg.trainer.max_steps}; "
                  f"saved {Path(cfg.output_dir) / 'checkpoints' / 'last.ckpt'} and the solver trained so far to {path}\n"
                  f"resume with: {resume_command(args)}")
        else:
            print(f"\nsolver exported to {path}\nload it into a diffusers pipeline:\n"
                  f"    from consolver import ConsistencySolverScheduler\n"
                  f"    pipe.scheduler = ConsistencySolverScheduler.from_pretrained({str(path)!r})\n"
                  f"evaluate it: python tools/evaluate.py {path} --config {config}")
    return result


if __name__ == "__main__":
    import signal

    try:
        outcome = main()
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        sys.exit("fit: interrupted")
    except Exception as err:  # noqa: BLE001 - user errors as one line; anything else as a traceback
        from consolver.backends.model_source import BackendModelNotFoundError
        from consolver.config import ConfigError

        if isinstance(err, (ConfigError, ValueError, KeyError, FileNotFoundError, BackendModelNotFoundError)):
            sys.exit(f"fit: error: {err}")
        raise
    if outcome is not None and outcome.interrupted:
        sys.exit(128 + int(getattr(signal, outcome.interrupted, signal.SIGINT)))
