"""RL training step on the toy default (``conf/toy_depth.yaml``, GRPO, 8 samples x 8 rollouts
= 64 rollouts per iteration): rollouts per second per K, and where an iteration's time goes.

Parts: ``backend`` (denoiser calls), ``decode`` + ``reward`` (the final images and the toy
depth network), ``policy+loss`` (actor forwards in the rollout, the clipped loss, backward and
the optimizer step), ``env`` (everything else inside the rollout: TorchRL step bookkeeping,
the multistep transfer, spec handling) and ``data`` (the next loader batch and encoding its
prompts). Target: everything but backend, reward and decode <= 20% of an iteration. Timed on the
library's own code path (``PreviewAlgorithm.rollout`` and ``PolicyGradient._with_advantage`` /
``loss_module``), without the Lightning trainer loop.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch

from consolver.algos import build_algorithm
from consolver.config import load_config
from consolver.data import ShardDataModule

ROOT = Path(__file__).resolve().parents[2]


class Timers:
    def __init__(self):
        self.total = defaultdict(float)

    def wrap(self, obj, name: str, part: str):
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.total[part] += time.perf_counter() - start

        setattr(obj, name, timed)


def run(quick: bool = False) -> list[dict]:
    cfg = load_config(ROOT / "conf" / "toy_depth.yaml", [f"data.shard_dir={ROOT / 'data' / 'toy_shards'}",
                                                          "data.shuffle_buffer=16"])
    module = build_algorithm(cfg)
    rt = module.build_runtime()
    datamodule = ShardDataModule(cfg, backend=rt["backend"])
    datamodule.setup()
    opt = torch.optim.Adam(module.parameters(), lr=cfg.algo.lr)
    timers = Timers()
    timers.wrap(rt["backend"], "predict", "backend")
    timers.wrap(rt["backend"], "decode", "decode")
    timers.wrap(rt["reward"], "score", "reward")
    actor_forward = module.actor.forward

    def iteration(batch, K):
        data = module.reset_input(batch, K, cfg.algo.group_size)
        start = time.perf_counter()
        with torch.no_grad():
            roll, _ = module.rollout(data, K, deterministic=False)
        rollout = time.perf_counter() - start
        start = time.perf_counter()
        reward = roll["next", "reward"][:, -1, 0]
        steps = module._with_advantage(roll, reward.view(-1, cfg.algo.group_size))
        for _ in range(module.epochs):  # the configured updates: epochs x minibatches (ppo 2x2 by default)
            for chunk in torch.randperm(steps.shape[0]).chunk(int(cfg.algo.minibatches)):
                loss = module.loss_module(steps[chunk])["loss_objective"]
                opt.zero_grad()
                loss.backward()
                opt.step()
        return rollout, time.perf_counter() - start

    def timed_actor(*args, **kwargs):
        start = time.perf_counter()
        try:
            return actor_forward(*args, **kwargs)
        finally:
            timers.total["actor"] += time.perf_counter() - start

    module.actor.forward = timed_actor
    loader = datamodule.train_dataloader()
    batches = iter(loader)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    rows, repeats = [], 3 if quick else 12
    for K in (3, 4, 6, 8):
        iteration(next_batch(), K)  # warm-up
        timers.total.clear()
        wall = rollout_s = update_s = data_s = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            batch = next_batch()
            rt["backend"].encode(batch["prompt"])
            data_s += time.perf_counter() - start
            r, u = iteration(batch, K)
            rollout_s, update_s = rollout_s + r, update_s + u
            wall += time.perf_counter() - start
        t = timers.total
        model = t["backend"] + t["decode"] + t["reward"]
        env = rollout_s - model - t["actor"]
        policy = t["actor"] + update_s
        n = 64 * repeats
        rows.append({"K": K, "ms/iteration": 1e3 * wall / repeats, "rollouts/s": n / wall,
                     "backend %": 100 * t["backend"] / wall, "decode+reward %": 100 * (t["decode"] + t["reward"]) / wall,
                     "policy+loss %": 100 * policy / wall, "env %": 100 * env / wall, "data %": 100 * data_s / wall,
                     "overhead % (target <= 20)": 100 * (policy + env + data_s) / wall})
    return rows
