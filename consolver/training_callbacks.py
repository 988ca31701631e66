"""Lightning callbacks that keep a run safe and readable, all counted in *iterations* (one data
batch, one K, every update of the algorithm on it; ``trainer.global_step`` counts them):

- :class:`RunCheckpoint`: ``checkpoints/step={N}.ckpt`` every ``trainer.checkpoint_every``
  iterations and ``checkpoints/last.ckpt`` after each of them, written atomically (a run killed
  while saving keeps its previous checkpoint). On a stop request (Ctrl-C, SIGTERM from SLURM
  preemption or ``kill``: see :func:`stop_on_signals`) it saves ``last.ckpt`` at the end of the
  current iteration, on every rank at the same iteration, and ends training there.
- :class:`IterationProgressBar`: iterations out of ``trainer.max_steps``, the K and reward of the
  last iteration, elapsed and remaining time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Iterator, Optional

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

logger = logging.getLogger(__name__)

LAST = "last.ckpt"


class RunCheckpoint(Callback):
    """Periodic and final checkpoints of a run, and the stop point of an interrupted one.

    Args:
        dirpath: ``<output_dir>/checkpoints``.
        every: iterations between ``step={N}.ckpt`` checkpoints (0: only ``last.ckpt`` on a stop).
    """

    def __init__(self, dirpath: str | os.PathLike, every: int):
        self.dirpath, self.every = Path(dirpath), int(every)
        self.stop_reason: Optional[str] = None  # set by request_stop (a signal handler)
        self.stopped_at: Optional[int] = None  # the iteration an interrupted run stopped after
        self.signal_handlers: dict = {}  # installed by stop_on_signals; re-installed when training starts

    def request_stop(self, reason: str) -> None:
        """Ask the run to save ``last.ckpt`` and stop after the current iteration (signal-safe)."""
        self.stop_reason = reason

    def save(self, trainer, name: str) -> Path:
        """``trainer.save_checkpoint`` to ``dirpath/name`` through a temporary file (collective)."""
        path = self.dirpath / name
        tmp = path.with_name(path.name + ".tmp")
        trainer.save_checkpoint(str(tmp))
        if trainer.is_global_zero:
            os.replace(tmp, path)
        trainer.strategy.barrier("consolver_checkpoint")
        return path

    def on_train_start(self, trainer, module) -> None:
        # Lightning's own SIGTERM handler (installed by trainer.fit) ends the run with an exception
        # after the current batch, so nothing is exported: ours takes over while training runs
        for sig, handler in self.signal_handlers.items():
            signal.signal(sig, handler)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        it = trainer.global_step
        stop = self.stop_reason is not None
        if trainer.world_size > 1:  # every rank stops after the same iteration
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if self.every > 0 and it % self.every == 0:
            self.save(trainer, f"step={it}.ckpt")
            self.save(trainer, LAST)
        if stop:
            if self.every <= 0 or it % self.every:
                self.save(trainer, LAST)
            self.stopped_at = it
            self.stop_reason = self.stop_reason or "a stop on another rank"
            trainer.should_stop = True

    def on_train_end(self, trainer, module) -> None:
        if self.stopped_at is None:  # a finished run resumes as finished
            self.save(trainer, LAST)


@contextlib.contextmanager
def stop_on_signals(checkpoint: RunCheckpoint, signals=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """While active, the first SIGINT or SIGTERM asks ``checkpoint`` to save and stop after the
    current iteration; a second SIGINT stops at once (``KeyboardInterrupt``, nothing saved beyond
    the last checkpoint). Outside the main thread (where Python cannot install handlers) it does
    nothing. The previous handlers come back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if checkpoint.stop_reason is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        checkpoint.request_stop(name)
        logger.warning("%s: saving checkpoints/last.ckpt and stopping after this iteration "
                       "(Ctrl-C again to stop at once, without saving)", name)

    for sig in signals:
        signal.signal(sig, handler)
    checkpoint.signal_handlers = {sig: handler for sig in signals}
    try:
        yield
    finally:
        checkpoint.signal_handlers = {}
        for sig, old in previous.items():
            signal.signal(sig, old)


class IterationProgressBar(ProgressBar):
    """``fit  32%|███▏      | 476/1500 [01:10<02:30, 6.80it/s, K=5, reward=45.1]`` on rank 0."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self.bar = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer, module) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="fit", unit="it",
                        dynamic_ncols=True, smoothing=0.05)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.bar is None:
            return
        metrics = trainer.progress_bar_metrics
        postfix = {}
        if "K" in metrics:
            postfix["K"] = int(metrics["K"])
        if "reward" in metrics:
            postfix["reward"] = f"{float(metrics['reward']):.4g}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(trainer.global_step - self.bar.n)

    def on_train_end(self, trainer, module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def teardown(self, trainer, module, stage: str) -> None:
        self.on_train_end(trainer, module)


__all__ = ["IterationProgressBar", "LAST", "RunCheckpoint", "stop_on_signals"]
