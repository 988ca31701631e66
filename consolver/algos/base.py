"""``PreviewAlgorithm``: the LightningModule every training algorithm builds on.

It owns the actor (and a critic where an algorithm has one), builds the frozen runtime
(backend, reward, training scheduler, environments) in ``setup``, and runs one *iteration*
per data batch: draw K (the same on every rank), turn the batch of B (prompt, noise, target)
samples into the environment's reset input, hand it to the algorithm (:meth:`train_on`),
step the LR schedule and log. Optimisation is manual (``self.manual_backward`` for every
backward, so DDP stays in sync over several updates per batch). ``global_step`` counts
*iterations*: every update of an iteration steps the optimizer itself, and Lightning counts
one step per iteration (:meth:`count_iteration`), so ``trainer.max_steps``, checkpoint names,
logging intervals and the progress bar all speak of iterations.

A batch whose reward or loss is not finite, on any rank, is skipped on every rank, counted
(``skipped_batches``) and logged; its update is never applied.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence

import lightning as L
import numpy as np
import torch
from tensordict import TensorDict
from tensordict.nn import InteractionType, set_interaction_type

from consolver.backends.base import timestep_kwargs
from consolver.config import Config, to_container
from consolver.env import PreviewEnv, expand_groups, observation_dim, reset_batch, solve_plan
from consolver.policy.actor import ACTION, make_actor
from consolver.solvers.grid import grid_from_logits, grid_units
from consolver.scheduler import solver_scheduler  # noqa: F401 - used below and re-exported (its former home)
from consolver.solvers.lmm import constrained_coefficients

logger = logging.getLogger(__name__)


def backend_device(cfg: Config) -> str:
    """``backend.device``, with ``auto`` resolved: this process's GPU (``cuda:$LOCAL_RANK``) when
    CUDA is available and ``trainer.accelerator`` allows it, else the CPU."""
    import os

    if cfg.backend.device != "auto":
        return str(cfg.backend.device)
    if cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


class PreviewAlgorithm(L.LightningModule):
    """Base of ``ppo``, ``grpo``, ``rloo`` and ``distill`` (``algo.name``).

    Args:
        cfg: the training :class:`~consolver.config.Config`.
        runtime: optional prebuilt ``{"backend", "reward"}`` (tests, tools); built from ``cfg``
            in ``setup`` otherwise. Never part of the state dict.
    """

    name = "base"

    def __init__(self, cfg: Config, runtime: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.automatic_optimization = False
        self.cfg = cfg
        self.save_hyperparameters({"config": to_container(cfg)})
        self.order = int(cfg.solver.order)
        self.trained_num_steps = sorted(set(int(k) for k in cfg.solver.num_steps))
        self.obs_dim = observation_dim(self.order, cfg.policy.sample_features)
        self.learn_timesteps = bool(cfg.solver.learn_timesteps)
        self.actor = make_actor(cfg.policy, self.order, self.trained_num_steps, self.obs_dim,
                                extra_columns=int(self.learn_timesteps))
        self.__dict__["runtime"] = dict(runtime or {})  # frozen models: not submodules, not checkpointed
        self.skipped_batches = 0
        self.data_position = {"epoch": 0, "batches": 0}

    # ------------------------------------------------------------------ sizes
    @property
    def updates_per_batch(self) -> int:
        """Optimizer updates per iteration (``global_step`` still advances by one per iteration)."""
        return 1

    @property
    def iteration(self) -> int:
        """Iterations done (= ``global_step``)."""
        return self.global_step

    # ------------------------------------------------------------------ runtime
    def setup(self, stage: Optional[str] = None) -> None:
        self.build_runtime()

    def build_runtime(self) -> Dict[str, Any]:
        """Backend (on :func:`backend_device`), reward (on the backend's device), reward names and
        the training scheduler, built once."""
        rt = self.runtime
        if "scheduler" in rt:
            return rt
        from omegaconf import OmegaConf

        from consolver.backends import build_backend
        from consolver.rewards import build_rewards

        cfg = self.cfg
        if "backend" not in rt:
            backend_cfg = OmegaConf.merge(cfg.backend, {"device": backend_device(cfg)})
            rt["backend"] = build_backend(backend_cfg)
        backend = rt["backend"]
        if "reward" not in rt:
            rt["reward"] = build_rewards(cfg.rewards)
        rt["reward"] = rt["reward"].to(backend.device)
        rt["reward_names"] = [r.name for r in cfg.rewards]
        rt["scheduler"] = solver_scheduler(cfg, backend.schedule)
        rt["envs"] = {}
        return rt

    def env(self, num_rollouts: int) -> PreviewEnv:
        """The environment for N rollouts (one per batch size met)."""
        rt = self.runtime
        if num_rollouts not in rt["envs"]:
            rt["envs"][num_rollouts] = PreviewEnv(
                rt["backend"], rt["reward"], rt["reward_names"], rt["scheduler"], self.cfg.guidance, num_rollouts,
                implied=self.cfg.policy.implied, sample_features=self.cfg.policy.sample_features,
                learn_timesteps=self.learn_timesteps, grid_last_max=self.cfg.solver.grid_last_max,
                gradient_checkpointing=bool(self.cfg.algo.gradient_checkpointing))
        return rt["envs"][num_rollouts]

    # ------------------------------------------------------------------ data -> reset input
    def draw_num_steps(self, iteration: int) -> int:
        """K for an iteration: from ``solver.num_steps``, seeded by (seed, iteration): every rank and
        a resumed run draw the same."""
        g = torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + int(iteration))
        return self.trained_num_steps[int(torch.randint(len(self.trained_num_steps), (1,), generator=g))]

    def reset_input(self, batch: Dict[str, Any], num_steps: int, group_size: int = 1) -> TensorDict:
        """The environment's reset input ``[B * group_size]`` from a loader batch."""
        backend, names = self.runtime["backend"], self.runtime["reward_names"]
        dev = backend.device
        missing = [n for n in names if n not in batch["features"]]
        if missing:
            raise KeyError(f"the batch has no cached target features for reward(s) {missing}: remake the shards with "
                           f"these rewards configured (tools/make_shards.py) or point data.shard_dir at shards that have them")
        cond = backend.encode(batch["prompt"]) if "ref_image" not in batch else backend.encode(
            batch["prompt"], batch["ref_image"].to(dev).float() / 255)
        feats = {n: batch["features"][n].to(dev) for n in names}
        data = reset_batch(batch["noise"].to(dev), cond, feats, num_steps, batch["target_latent"].to(dev))
        return expand_groups(data, group_size)

    def rollout(self, data: TensorDict, num_steps: int, deterministic: bool):
        """Run the actor in the environment: ``(rollout [N, K], env)``; latents stay in the env."""
        env = self.env(data.shape[0])
        start = env.reset(data).select(*env.observation_spec.keys(), "done", "terminated")
        mode = InteractionType.DETERMINISTIC if deterministic else InteractionType.RANDOM
        with set_interaction_type(mode):
            roll = env.rollout(num_steps, self.actor, tensordict=start, auto_reset=False, return_contiguous=True,
                               break_when_any_done=False)
        return roll, env

    # ------------------------------------------------------------------ one iteration
    def training_step(self, batch: Dict[str, Any], batch_idx: int):
        it = self.iteration
        # sampling seeded by (seed, iteration, rank): ranks explore differently, a resumed run
        # samples exactly what an uninterrupted one does
        torch.manual_seed((int(self.cfg.seed) * 1_000_003 + it) * 4099 + self.global_rank)
        K = self.draw_num_steps(it)
        stats = self.train_on(batch, K)
        self.count_iteration(self.optimizers())
        self.data_position["batches"] += 1
        for scheduler in self._lr_schedulers():
            scheduler.step()
        if stats is None:
            return None
        stats["lr"] = self.optimizers().param_groups[0]["lr"]
        self.log_dict({f"train/{k}": float(v) for k, v in stats.items()}, on_step=True, prog_bar=False,
                      batch_size=batch["noise"].shape[0], rank_zero_only=True)
        self.log("reward", float(stats["reward_mean"]), prog_bar=True, on_step=True, rank_zero_only=True,
                 batch_size=batch["noise"].shape[0])
        self.log("K", float(K), prog_bar=True, logger=False, on_step=True, rank_zero_only=True,
                 batch_size=batch["noise"].shape[0])
        return None

    def train_on(self, batch: Dict[str, Any], num_steps: int) -> Optional[Dict[str, float]]:
        """One algorithm iteration on a loader batch at K = ``num_steps``; returns scalars to log
        (``reward_mean`` at least), or None when the batch was skipped."""
        raise NotImplementedError

    def gather_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over every rank (for logging rewards)."""
        return self.trainer.strategy.reduce(value.detach().float().mean(), reduce_op="mean") if self._trainer else value.mean()

    def skip_if_not_finite(self, what: str, *values: torch.Tensor) -> bool:
        """True (and counted, logged) when any value on any rank is not finite."""
        bad = any(not bool(torch.isfinite(v).all()) for v in values)
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            self.skipped_batches += 1
            logger.warning("iteration %d: non-finite %s, batch skipped (%d skipped so far)", self.iteration, what,
                           self.skipped_batches)
            self.log("train/skipped_batches", float(self.skipped_batches), on_step=True, rank_zero_only=True)
        return bad

    def count_iteration(self, optimizer) -> None:
        """One Lightning-counted optimizer step that changes nothing (every gradient ``None``, so
        the optimizer skips every parameter and its moments): ``global_step`` advances by exactly
        one per iteration, whatever number of updates the algorithm made or skipped."""
        optimizer.zero_grad(set_to_none=True)
        optimizer.step()

    @staticmethod
    def raw_optimizer(optimizer):
        """The torch optimizer inside Lightning's wrapper: its steps are not counted by Lightning."""
        return getattr(optimizer, "optimizer", optimizer)

    def apply_gradients(self, loss: torch.Tensor, optimizer) -> Optional[float]:
        """Backward, clip, step; the update is dropped if the loss or the gradient is not finite.
        Returns the gradient norm, or None when dropped."""
        if self.skip_if_not_finite("loss", loss):
            return None
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        clip = float(self.cfg.algo.grad_clip) or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros(())
        if not bool(torch.isfinite(norm)):  # gradients are synced: every rank sees the same norm
            self.skipped_batches += 1
            logger.warning("iteration %d: non-finite gradient, update skipped", self.iteration)
            return None
        self.raw_optimizer(optimizer).step()
        return float(norm)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        algo, trainer = self.cfg.algo, self.cfg.trainer
        opt = torch.optim.Adam(self.parameters(), lr=algo.lr, weight_decay=algo.weight_decay)
        total, warm, floor = max(1, trainer.max_steps), max(0, algo.warmup_steps), algo.lr_min_ratio

        def factor(iteration: int) -> float:  # stepped once per iteration
            if iteration < warm:
                return (iteration + 1) / warm
            if algo.lr_schedule == "constant":
                return 1.0
            progress = min(1.0, (iteration - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                   "interval": "step"}}

    def _lr_schedulers(self) -> List:
        s = self.lr_schedulers()
        return [] if s is None else (s if isinstance(s, list) else [s])

    # ------------------------------------------------------------------ the learned solver
    @torch.no_grad()
    def mode_actions(self, num_steps: int) -> torch.Tensor:
        """The actor's mode at every step of a K-step solve, ``[K, d]`` float32 on the CPU."""
        if num_steps not in self.trained_num_steps:
            raise ValueError(f"K={num_steps} was not trained; trained K: {self.trained_num_steps}")
        if self.cfg.policy.sample_features:
            raise ValueError("a policy with sample features depends on the latents and has no coefficient table")
        rt = self.build_runtime()
        obs, base, mask = solve_plan(rt["scheduler"], num_steps, self.cfg.policy.implied,
                                     learn_timesteps=self.learn_timesteps, grid_last_max=self.cfg.solver.grid_last_max,
                                     **timestep_kwargs(rt["backend"], num_steps))
        K = num_steps
        td = TensorDict({"observation": obs, "step_index": torch.arange(K), "num_steps": torch.full((K,), K),
                         "base_action": base, "action_mask": mask}, batch_size=[K]).to(self.device)
        with set_interaction_type(InteractionType.DETERMINISTIC):
            return self.actor(td)[ACTION].float().cpu()

    def coefficient_table(self, num_steps: int) -> np.ndarray:
        """The actor's mode as a coefficient table ``[K, order]`` (float64), what export ships."""
        free = self.mode_actions(num_steps)[:, : self.order - 1]
        rows = [constrained_coefficients(free[i], min(i + 1, self.order), self.cfg.policy.implied)
                for i in range(num_steps)]
        return torch.stack(rows).double().numpy()

    def step_grid(self, num_steps: int) -> np.ndarray:
        """The learned grid's K times at the actor's mode, float64 (VP integer timesteps, flow
        unshifted sigmas), as a scheduler's ``step_grids`` holds them; the configured spacing's
        without ``solver.learn_timesteps``."""
        rt = self.build_runtime()
        scheduler = rt["scheduler"]
        positions = scheduler.step_positions(num_steps, timestep_kwargs(rt["backend"], num_steps).get("sigmas"))
        if self.learn_timesteps:
            end, min_gap, integer = grid_units(scheduler.config.schedule, scheduler.config.num_train_timesteps)
            logits = self.mode_actions(num_steps)[:-1, self.order - 1]
            positions = grid_from_logits(logits, float(positions[0]), end, min_gap, integer,
                                         self.cfg.solver.grid_last_max).numpy()
        return positions[:-1]

    def step_grids(self, num_steps: Optional[Sequence[int]] = None) -> Dict[int, np.ndarray]:
        return {int(K): self.step_grid(int(K)) for K in (num_steps or self.trained_num_steps)}

    def sample_policy(self):
        """The ``mlp`` actor with sample features as a :class:`~consolver.policy.actor.SampleMLPPolicy`
        that a scheduler carries (same weights, acts by its mode)."""
        from consolver.policy.actor import SampleMLPPolicy

        head = self.actor.module[0].module
        rt = self.build_runtime()
        _, base, _ = solve_plan(rt["scheduler"], 2, self.cfg.policy.implied, **timestep_kwargs(rt["backend"], 2))
        policy = SampleMLPPolicy(self.order, self.cfg.policy.distribution, head.offsets.tolist(), self.cfg.policy.init_std,
                                 self.cfg.policy.hidden, self.cfg.policy.implied, base[-1].tolist())
        policy.head.load_state_dict(head.state_dict())
        return policy.eval()

    def coefficient_tables(self, num_steps: Optional[Sequence[int]] = None) -> Dict[int, np.ndarray]:
        return {int(K): self.coefficient_table(int(K)) for K in (num_steps or self.trained_num_steps)}

    # ------------------------------------------------------------------ checkpoint extras
    def on_train_epoch_start(self) -> None:
        if self.data_position.get("resume_epoch") != self.current_epoch:
            self.data_position = {"epoch": self.current_epoch, "batches": 0}
        else:
            self.data_position.pop("resume_epoch")

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["consolver"] = {"skipped_batches": self.skipped_batches, "data_position": dict(self.data_position)}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        extra = checkpoint.get("consolver", {})
        self.skipped_batches = int(extra.get("skipped_batches", 0))
        pos = extra.get("data_position", {"epoch": 0, "batches": 0})
        self.data_position = {"epoch": pos["epoch"], "batches": pos["batches"], "resume_epoch": pos["epoch"]}
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "resume_at"):
            datamodule.resume_at(pos["epoch"], pos["batches"])
