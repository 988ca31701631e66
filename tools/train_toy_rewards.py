"""Train the toy segmentation and depth reward networks on procedural renders.

    python tools/train_toy_rewards.py                 # writes data/toy_seg.safetensors, data/toy_depth.safetensors
    python tools/train_toy_rewards.py --steps 200 --out /tmp/toy_rewards   # a quick smoke run

What the nets see (train-split scenes, augmentations) and how they are evaluated on held-out
scenes: consolver/rewards/toy_training.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--eval-scenes", type=int, default=512, help="held-out scenes for the final evaluation")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data"))
    args = parser.parse_args(argv)
    from consolver.rewards.toy_training import train

    metrics = train(args)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
