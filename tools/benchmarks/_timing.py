"""Shared timing helper for benchmarks."""

from __future__ import annotations

import time
from typing import Callable

import torch


def time_call(fn: Callable[[], object], repeats: int = 50, warmup: int = 5) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (CUDA synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]
