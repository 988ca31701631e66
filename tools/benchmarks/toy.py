"""Toy backend: one closed-form denoiser call (``ToyBackend.predict``), B=64 latents, 64 renders
per prompt, VP schedule, float32, this machine's CPU threads. ``P`` prompts give ``N = 64 P``
mixture components of ``D = 3 H W`` values. Target: < 20 ms at 3x32x32 with CFG.

Memory is ``O(B N + N D)``: the component bank ``[N, D]`` (``bank MB``) plus a few ``[B, N]``
logit / weight matrices (the doubled CFG batch is ``[2B, N]``) and ``[B, D]`` outputs;
``peak op MB`` is the largest single allocation the profiler saw during the call, against
``BxNxD MB``, what an explicit ``B x N x D`` distance temporary would have needed.
"""

from __future__ import annotations

import contextlib
import os

import torch

from benchmarks._timing import time_call
from consolver.backends.toy import ToyBackend

BATCH = 64
RENDERS = 64


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler backend's start/stop lines (written straight to fd 2)."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _largest_allocation_mb(fn) -> float:
    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True) as prof:
        fn()
    return max((event.cpu_memory_usage for event in prof.events()), default=0) / 2**20


def _row(resolution: int, train: int, heldout: int, guidance: float, quick: bool) -> dict:
    backend = ToyBackend(resolution=resolution, renders_per_prompt=RENDERS, num_train_prompts=train,
                         num_heldout_prompts=heldout)
    prompts = backend.prompts()
    cond = backend.encode([prompts[i % len(prompts)] for i in range(BATCH)])
    x = torch.randn(BATCH, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((BATCH,), 500)

    def call():
        return backend.predict(x, t, cond, guidance)

    seconds = time_call(call, repeats=10 if quick else 50, warmup=2 if quick else 5)
    N, D = backend.num_components, x[0].numel()
    return {
        "latent": "x".join(map(str, backend.latent_shape)),
        "prompts P": len(prompts),
        "components N": N,
        "guidance": guidance,
        "ms / call": seconds * 1e3,
        "samples / s": BATCH / seconds,
        "bank MB": N * D * 4 / 2**20,
        "peak op MB": _largest_allocation_mb(call),
        "BxNxD MB": BATCH * N * D * 4 / 2**20,
    }


def run(quick: bool = False) -> list[dict]:
    """Rows: the default prompt set (12 train + 4 held-out) with and without CFG, then 8 and 32
    prompts, and 64x64 latents."""
    cases = [(32, 12, 4, 3.0), (32, 12, 4, 1.0), (32, 8, 0, 3.0), (32, 24, 8, 3.0), (64, 12, 4, 3.0)]
    if quick:
        cases = cases[:2]
    return [_row(*case, quick=quick) for case in cases]
