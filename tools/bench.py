"""Benchmarks (not tests): throughput and ratios, printed as markdown tables.

    python tools/bench.py                 # every benchmark
    python tools/bench.py scheduler toy   # some of them

Each benchmark is a module ``tools/benchmarks/<name>.py`` with ``run(quick: bool) -> list[dict]``
(one dict per table row). Figures go into docs/benchmarks.md with the machine and the date.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCHMARKS = sorted(p.stem for p in (Path(__file__).parent / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


def to_markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    keys = list(dict.fromkeys(k for row in rows for k in row))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; valid: {', '.join(BENCHMARKS)}")
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"# consolver benchmarks — {time.strftime('%Y-%m-%d')} — {device} — torch {torch.__version__}\n")
    for name in args.names or BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"## {name}\n\n{(module.__doc__ or '').strip()}\n")
        print(to_markdown(module.run(quick=args.quick)) + "\n", flush=True)


if __name__ == "__main__":
    main()
