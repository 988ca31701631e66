"""Run ``consolver.train.fit`` in its own process, for the DDP and kill/resume tests.

    python tests/fit_script.py OUTPUT_DIR [--kill-after N] [--resume] [key=value ...]

Uses tests/training.tiny_config. ``--kill-after N`` SIGKILLs the process at the end of iteration
N + 1, i.e. after the checkpoint of iteration N was written. At the end every rank saves its
actor weights to ``OUTPUT_DIR/actor-rank{R}.pt``.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consolver.train import fit  # noqa: E402
from tests.training import tiny_config  # noqa: E402


class KillAfter(Callback):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.iteration > self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--kill-after", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    torch.set_num_threads(1)
    cfg = tiny_config(args.output_dir, *args.overrides)
    callbacks = [KillAfter(args.kill_after)] if args.kill_after is not None else []
    result = fit(cfg, resume=args.resume, callbacks=callbacks, progress_bar=False)
    rank = result.trainer.global_rank
    torch.save({k: v.cpu() for k, v in result.module.actor.state_dict().items()},
               Path(args.output_dir) / f"actor-rank{rank}.pt")


if __name__ == "__main__":
    main()
