"""Scheduler step overhead: ConsistencySolverScheduler.step vs diffusers DDIMScheduler.step.

Time of one ``step`` (median over a full K=8 loop's steps, model excluded), SD1.5 schedule,
fp32 latents. ``ours ddim`` uses the DDIM table (w = 1); ``ours order 4`` blends four model
outputs with a learned-style table. Target: ratio <= 1.2 for the DDIM table.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from diffusers import DDIMScheduler

from consolver.scheduler import ConsistencySolverScheduler
from consolver.solvers import fixed_table

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing")
K = 8


def _time_loop(scheduler, x, outputs) -> float:
    """Seconds per step of one K-step loop."""
    scheduler.set_timesteps(K, device=x.device)
    sample = x
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for t, d in zip(scheduler.timesteps, outputs):
        sample = scheduler.step(d, t, sample, return_dict=False)[0]
    sync()
    return (time.perf_counter() - start) / K


def _interleaved_medians(schedulers: dict, x, outputs, repeats: int) -> dict:
    """Median per-step seconds of each scheduler, loops interleaved so drift hits all alike."""
    times = {name: [] for name in schedulers}
    for _ in range(repeats):
        for name, scheduler in schedulers.items():
            times[name].append(_time_loop(scheduler, x, outputs))
    return {name: float(np.median(t)) for name, t in times.items()}


def run(quick: bool = False) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    repeats = 20 if quick else 200
    ours4 = ConsistencySolverScheduler(solver_order=4, **SD15)
    ours4.set_coefficient_tables({K: fixed_table("adams_bashforth", np.linspace(14.6, 0, K + 1), 4, 4)})
    schedulers = {
        "diffusers DDIM": DDIMScheduler(**SD15, clip_sample=False),
        "ours ddim": ConsistencySolverScheduler(**SD15),
        "ours order 4": ours4,
    }
    rows = []
    for shape in ((1, 4, 64, 64), (8, 4, 64, 64)):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(shape, generator=g, device=device)
        outputs = [torch.randn(shape, generator=g, device=device) for _ in range(K)]
        _interleaved_medians(schedulers, x, outputs, 3)  # warm-up
        times = _interleaved_medians(schedulers, x, outputs, repeats)
        base = times["diffusers DDIM"]
        for name, seconds in times.items():
            rows.append({"shape": "x".join(map(str, shape)), "device": device, "scheduler": name,
                         "us/step": seconds * 1e6, "ratio vs DDIM": seconds / base})
    return rows
