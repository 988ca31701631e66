"""Make the offline dataset: WebDataset shards of (prompt, noise, full-step target).

    python tools/make_shards.py --config conf/toy_depth.yaml data.num_samples=4096
    torchrun --nproc-per-node 8 tools/make_shards.py --config conf/sd15_depth.yaml
    python tools/make_shards.py --config conf/X.yaml --rank 3 --world-size 16   # e.g. a SLURM array

Each rank makes the shards ``s`` with ``s % world_size == rank`` (rank and world size from the
flags, else torchrun's RANK / WORLD_SIZE). Rerunning resumes: finished shards are skipped and
half-written ones are rewritten. The same config always gives the same shard contents.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (conf/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.num_samples=512")
    parser.add_argument("--rank", type=int, default=None, help="this process's rank (default: $RANK or 0)")
    parser.add_argument("--world-size", type=int, default=None, help="number of processes (default: $WORLD_SIZE or 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in batch logs)")
    parser.add_argument("--verbose", action="store_true", help="show every library's log lines and warnings")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from consolver.console import rate_text, setup_console

    log = setup_console("make_shards", args.verbose)
    from consolver.config import load_config

    cfg = load_config(args.config, args.overrides)
    from tqdm import tqdm

    from consolver.data.writer import make_shards, resolve_rank

    rank, world_size = resolve_rank(args.rank, args.world_size)
    bar = tqdm(unit="sample", desc=f"rank {rank}/{world_size}", position=rank if world_size <= 8 else 0,
               disable=args.no_progress, dynamic_ncols=True, smoothing=0.1)
    start, made = time.perf_counter(), []

    def progress(n: int) -> None:
        made.append(n)
        bar.update(n)

    try:
        summary = make_shards(cfg, rank, world_size, on_start=lambda n: bar.reset(total=n), on_progress=progress)
    finally:
        bar.close()
    made = sum(made)
    elapsed = time.perf_counter() - start
    log.info("rank %d/%d: made %d shards (%d samples, %s), skipped %d complete; shards: %s", rank, world_size,
             len(summary["made"]), made, rate_text(made, elapsed), summary["skipped"], summary["shards"])
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # bad config, prompts or paths: a clear message, not a traceback
        sys.exit(f"make_shards: error: {err}")
