"""Run ``consolver.train.fit`` in its own process, for the DDP and kill/resume tests.

    python tests/fit_script.py OUTPUT_DIR [--kill-after N | --signal-after N --signal SIGINT] [--resume] [key=value ...]

Uses tests/training.tiny_config. ``--kill-after N`` SIGKILLs the process at the end of iteration
N + 1, i.e. after the checkpoint of iteration N was written. ``--signal-after N`` sends the
process ``--signal`` (SIGINT as Ctrl-C does, or SIGTERM as SLURM preemption does) at the end
of iteration N, through the real signal handlers of ``fit``. At the end every rank saves its
actor weights to ``OUTPUT_DIR/actor-rank{R}.pt`` and prints ``RESULT iteration=<N> interrupted=<signal>``.
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


class SignalAfter(Callback):
    def __init__(self, iteration: int, signum: int):
        self.iteration, self.signum, self.sent = iteration, signum, False

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if module.iteration >= self.iteration and not self.sent:  # during iteration N + 1
            self.sent = True
            os.kill(os.getpid(), self.signum)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--kill-after", type=int, default=None)
    parser.add_argument("--signal-after", type=int, default=None)
    parser.add_argument("--signal", default="SIGINT")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    torch.set_num_threads(1)
    cfg = tiny_config(args.output_dir, *args.overrides)
    callbacks = [KillAfter(args.kill_after)] if args.kill_after is not None else []
    if args.signal_after is not None:
        callbacks.append(SignalAfter(args.signal_after, getattr(signal, args.signal)))
    result = fit(cfg, resume=args.resume, callbacks=callbacks, progress_bar=False)
    rank = result.trainer.global_rank
    torch.save({k: v.cpu() for k, v in result.module.actor.state_dict().items()},
               Path(args.output_dir) / f"actor-rank{rank}.pt")
    print(f"RESULT iteration={result.iteration} interrupted={result.interrupted}")


if __name__ == "__main__":
    main()
