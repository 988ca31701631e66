"""Command-line start-up: wall time of ``--help`` of every tool, and of ``tools/fit.py`` with a
misspelt config key (a one-line error), each a fresh Python process, median of ``repeats``
runs, interleaved across tools. Target: under 1 s (heavy libraries are imported only after the
arguments are parsed and the config is checked). ``python -c pass`` is the interpreter's floor.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("fit", "evaluate", "preview", "app", "make_shards", "bench", "train_toy_rewards", "train_toy_diffusion")


def _commands():
    yield "python -c pass", [sys.executable, "-c", "pass"]
    for tool in TOOLS:
        path = ROOT / "tools" / f"{tool}.py"
        if path.is_file():
            yield f"{tool}.py --help", [sys.executable, str(path), "--help"]
    yield "fit.py typo=1 (config error)", [sys.executable, str(ROOT / "tools" / "fit.py"), "typo=1"]


def run(quick: bool = False) -> list[dict]:
    repeats = 2 if quick else 5
    commands = list(_commands())
    times: dict[str, list[float]] = {name: [] for name, _ in commands}
    for _ in range(repeats):
        for name, cmd in commands:
            start = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, capture_output=True, check=False)
            times[name].append(time.perf_counter() - start)
    return [{"command": name, "median s": statistics.median(t), "max s": max(t)} for name, t in times.items()]
