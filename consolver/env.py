"""``PreviewEnv``: a K-step preview solve as a batched TorchRL environment.

One episode = one K-step solve of N rollouts (``batch_size=[N]``) from their noise, spending
exactly K model evaluations (the first at reset). The solver state (``x_t``, the history of
model outputs, the step index and the grid) lives in the environment, inside a
:class:`~consolver.scheduler.ConsistencySolverScheduler`, whose ``step`` does the multistep
transfer with per-rollout coefficients: a rollout with the base solver's actions is exactly a
sampling loop with that scheduler. The rollout record holds only the small per-step entries.

Reset input (a TensorDict ``[N]``)::

    noise            [N, *latent_shape]  float32   initial noise x_{t_0}
    cond             TensorDict [N]                 the backend's conditioning (``encode``)
    target_features  TensorDict [N]                 per reward name, cached target features
    num_steps        [N] int64                      K, the same for every row
    target_latent    [N, *latent_shape]  optional   the full-step target (``distill``)

Step inputs the policy reads (observation spec)::

    observation      [N, F] float32   (t_i/T, t_{i+1}/T, i/K, 1/K) [+ cosine similarities of
                                      the newest model output with the m - 1 older ones]
    step_index       [N] int64        i in [0, K)
    num_steps        [N] int64        K
    base_action      [N, m-1] float32 the base solver's free coefficients at this step
    action_mask      [N, m-1] bool    the free coefficients in use: the first min(i, m-1)

Action: ``action [N, m-1]`` float32, the free coefficients; the constrained one
(``implied``) completes them to sum 1 over the history that exists. Reward ``[N, 1]``: 0 until
the last step, then the configured reward of ``decode(x_K)`` against the cached features.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional, Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Binary, Composite, Unbounded
from torchrl.envs import EnvBase

from consolver.backends.base import timestep_kwargs
from consolver.policy.actor import ACTION, ACTION_MASK, BASE_ACTION, NUM_STEPS, OBSERVATION, STEP_INDEX
from consolver.policy.base import OBSERVATION_DIM, history_similarity, step_observation
from consolver.rewards.base import CompositeReward
from consolver.solvers.batched import GridSolve
from consolver.solvers.grid import grid_units, logits_from_grid
from consolver.solvers.lmm import constrained_coefficients, free_coefficients

logger = logging.getLogger(__name__)


def observation_dim(order: int, sample_features: bool) -> int:
    """Width F of the ``observation`` entry."""
    return OBSERVATION_DIM + (order - 1 if sample_features else 0)


def solve_plan(scheduler, num_steps: int, implied: str, mu: Optional[float] = None, sigmas=None,
               learn_timesteps: bool = False, grid_last_max: Optional[float] = None):
    """The step inputs of a K-step solve that do not depend on the sample: step observations
    ``[K, 4]`` float32, the base actions ``[K, d]`` float32 and the masks of the action columns
    in use ``[K, d]`` bool. Columns: the base solver's ``m - 1`` free coefficients (step i uses
    the first ``min(i, m-1)``), and with ``learn_timesteps`` one more, the logit of the next grid
    position on the configured grid (:mod:`consolver.solvers.grid`; unused at the last step).
    ``mu`` and ``sigmas`` as ``set_timesteps`` takes them (see :meth:`Backend.timestep_kwargs`)."""
    K, m = int(num_steps), int(scheduler.config.solver_order)
    grid_t, _ = scheduler.grid(K, mu, sigmas)
    T = scheduler.config.num_train_timesteps
    obs = torch.cat([step_observation(grid_t[i], grid_t[i + 1], i, K, T) for i in range(K)])
    base = torch.from_numpy(scheduler.base_table(K, mu, sigmas))
    free = torch.stack([free_coefficients(base[i], min(i + 1, m), implied) for i in range(K)]).float()
    mask = torch.arange(m - 1)[None, :] < torch.arange(K)[:, None].clamp(max=m - 1)
    if learn_timesteps:
        _, min_gap, _ = grid_units(scheduler.config.schedule, T)
        positions = scheduler.step_positions(K, sigmas)
        logits = torch.cat([logits_from_grid(positions, min_gap, grid_last_max), torch.zeros(1, dtype=torch.float64)])
        free = torch.cat([free, logits.float()[:, None]], 1)
        mask = torch.cat([mask, (torch.arange(K) < K - 1)[:, None]], 1)
    return obs, free, mask


class PreviewEnv(EnvBase):
    """Batched preview environment (see the module docstring).

    Args:
        backend: a :class:`~consolver.backends.base.Backend`.
        reward: a frozen :class:`~consolver.rewards.base.Reward` (single or composite).
        reward_names: names of the configured rewards, the keys of ``target_features``.
        scheduler: a :class:`~consolver.scheduler.ConsistencySolverScheduler` of the backend's
            schedule, of order m; its ``base_solver`` defines ``base_action``.
        guidance: classifier-free guidance scale.
        num_rollouts: N.
        implied: ``"newest"`` | ``"oldest"``, the coefficient sum-to-one implies.
        sample_features: add history cosine similarities to the observation.
        batch: a default reset input, used by ``reset()`` without data (e.g. ``check_env_specs``).
        mu: FLUX's dynamic shift, for flow-matching schedules that use one.
        learn_timesteps: the action's last column is the logit of the next grid position, and each
            rollout solves on its own grid (:class:`~consolver.solvers.batched.GridSolve`);
            ``grid_positions [N, K+1]`` holds the grids after a solve.
        gradient_checkpointing: when the latents require grad (``distill``), run each backend
            ``predict`` under ``torch.utils.checkpoint``: its activations are recomputed in the
            backward pass instead of being kept for all K steps (config ``algo.gradient_checkpointing``).
    """

    batch_locked = True

    def __init__(self, backend, reward, reward_names: Sequence[str], scheduler, guidance: float, num_rollouts: int,
                 implied: str = "newest", sample_features: bool = False, batch: Optional[TensorDictBase] = None,
                 mu: Optional[float] = None, learn_timesteps: bool = False, gradient_checkpointing: bool = False,
                 grid_last_max: Optional[float] = None):
        super().__init__(device=backend.device, batch_size=[num_rollouts])
        self.gradient_checkpointing = bool(gradient_checkpointing)
        # plain attributes, not submodules: the env must not add the frozen backend/reward to a state dict
        self.__dict__["backend"], self.__dict__["reward"] = backend, reward
        self.__dict__["scheduler"] = scheduler
        self.reward_names = list(reward_names)
        self.guidance = float(guidance)
        self.order = int(scheduler.config.solver_order)
        self.implied, self.sample_features, self.mu = implied, bool(sample_features), mu
        self.learn_timesteps = bool(learn_timesteps)
        if self.learn_timesteps and self.sample_features:
            raise ValueError("learned step grids work with sample-independent policies only (policy.sample_features=false)")
        self.grid_last_max = grid_last_max
        self.grid_solve = GridSolve(scheduler, grid_last_max) if self.learn_timesteps else None
        self.grid_positions: Optional[torch.Tensor] = None
        self.default_batch = batch
        self.final_latents: Optional[torch.Tensor] = None
        self._make_specs(num_rollouts)

    # ------------------------------------------------------------------ specs
    def _make_specs(self, N: int) -> None:
        d, dev = self.order - 1 + int(self.learn_timesteps), self.device
        self.observation_spec = Composite(
            {OBSERVATION: Unbounded((N, observation_dim(self.order, self.sample_features)), device=dev),
             STEP_INDEX: Unbounded((N,), dtype=torch.int64, device=dev),
             NUM_STEPS: Unbounded((N,), dtype=torch.int64, device=dev),
             BASE_ACTION: Unbounded((N, d), device=dev),
             ACTION_MASK: Binary(n=d, shape=(N, d), dtype=torch.bool, device=dev)},
            shape=(N,), device=dev)
        self.action_spec = Unbounded((N, d), device=dev)
        self.reward_spec = Unbounded((N, 1), device=dev)

    def _set_seed(self, seed: Optional[int]):  # deterministic: the randomness is the policy's
        return seed

    # ------------------------------------------------------------------ plan of one solve
    def timestep_kwargs(self, K: int) -> dict:
        """``set_timesteps`` arguments of a K-step solve: the backend's (dynamic shift ``mu`` and
        the pipeline's sigmas, see :meth:`Backend.timestep_kwargs`), ``mu`` overridden if given."""
        kwargs = dict(timestep_kwargs(self.backend, K))
        if self.mu is not None:
            kwargs["mu"] = self.mu
        return kwargs

    def _plan(self, K: int, timestep_kwargs: dict) -> None:
        obs, base, mask = solve_plan(self.scheduler, K, self.implied, learn_timesteps=self.learn_timesteps,
                                     grid_last_max=self.grid_last_max, **timestep_kwargs)
        self._step_obs, self._base, self._mask = obs.to(self.device), base.to(self.device), mask.to(self.device)

    def _inputs(self, i: int) -> TensorDict:
        """Step inputs of step ``i`` (after the last step: the last step's, never acted on)."""
        N = self.batch_size[0]
        obs = self._step_obs[i].expand(N, -1)
        if self.sample_features:
            obs = torch.cat([obs, history_similarity([self._pending, *self.scheduler._history], self.order)], -1)
        full = lambda value, dtype: torch.full((N,), value, dtype=dtype, device=self.device)  # noqa: E731
        return TensorDict({OBSERVATION: obs, STEP_INDEX: full(i, torch.int64), NUM_STEPS: full(self._K, torch.int64),
                           BASE_ACTION: self._base[i].expand(N, -1), ACTION_MASK: self._mask[i].expand(N, -1)},
                          batch_size=self.batch_size, device=self.device)

    # ------------------------------------------------------------------ EnvBase
    def _reset(self, tensordict: Optional[TensorDictBase], **kwargs) -> TensorDict:
        data = tensordict if tensordict is not None and "noise" in tensordict.keys() else self.default_batch
        if data is None:
            raise ValueError("PreviewEnv.reset needs a data batch (noise, cond, target_features, num_steps)")
        K = data[NUM_STEPS].reshape(-1)
        if bool((K != K[0]).any()):
            raise ValueError(f"one K per batch: got num_steps {sorted(set(K.tolist()))}")
        self._K, self._i = int(K[0]), 0
        self._cond = data["cond"]
        self._features = data["target_features"]
        self._x = data["noise"].to(self.device)
        timing = self.timestep_kwargs(self._K)
        self._plan(self._K, timing)
        if self.learn_timesteps:
            start = float(self.scheduler.step_positions(self._K, timing.get("sigmas"))[0])
            self._t = self.grid_solve.start(self._K, start, self.batch_size[0], self.device, timing.get("mu"))
            self.grid_positions = None
        else:
            self.scheduler.set_timesteps(self._K, device=self.device, **timing)
            self._t = self.scheduler.timesteps[0]
        self._pending = self._predict(self._x, 0)
        self.final_latents = None
        out = self._inputs(0)
        out.set("done", torch.zeros(*self.batch_size, 1, dtype=torch.bool, device=self.device))
        out.set("terminated", torch.zeros(*self.batch_size, 1, dtype=torch.bool, device=self.device))
        return out

    def _predict(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled() and x.requires_grad:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.backend.predict, x, self._t, self._cond, self.guidance, use_reentrant=False)
        return self.backend.predict(x, self._t, self._cond, self.guidance)

    def _step(self, tensordict: TensorDictBase) -> TensorDict:
        i, K, m = self._i, self._K, self.order
        action = tensordict[ACTION].float()
        w = constrained_coefficients(action[:, : m - 1], min(i + 1, m), self.implied)
        if self.learn_timesteps:
            self._x, self._t = self.grid_solve.step(self._x, self._pending, w, action[:, m - 1])
        else:
            self._x = self.scheduler.step(self._pending, self.scheduler.timesteps[i], self._x, return_dict=False,
                                          coefficients=w)[0]
            self._t = self.scheduler.timesteps[min(i + 1, K - 1)]
        self._i = i = i + 1
        N = self.batch_size[0]
        if i < K:
            self._pending = self._predict(self._x, i)
            out = self._inputs(i)
            reward = torch.zeros(N, 1, device=self.device)
            done = torch.zeros(N, 1, dtype=torch.bool, device=self.device)
        else:
            self.final_latents = self._x
            if self.learn_timesteps:
                self.grid_positions = torch.stack(self.grid_solve.positions, -1).detach()
            out = self._inputs(K - 1)
            reward = self.score(self._x).reshape(N, 1)
            done = torch.ones(N, 1, dtype=torch.bool, device=self.device)
        out.update({"reward": reward, "done": done, "terminated": done.clone()})
        return out

    def score(self, latents: torch.Tensor) -> torch.Tensor:
        """Reward ``[N]`` of latents ``[N, *latent_shape]`` against the batch's cached target features."""
        images = self.backend.decode(latents)
        feats = self._features
        if isinstance(self.reward, CompositeReward):
            return self.reward.score(images, {name: feats[name] for name in self.reward_names})
        return self.reward.score(images, feats[self.reward_names[0]])


def expand_groups(batch: TensorDictBase, group_size: int) -> TensorDictBase:
    """``[B]`` samples -> ``[B * G]`` rollouts, each sample repeated G times in a row (group g of
    rollout n is ``n // G``)."""
    return batch.repeat_interleave(group_size, dim=0) if group_size > 1 else batch


def reset_batch(noise: torch.Tensor, cond: TensorDictBase, features: Mapping[str, torch.Tensor], num_steps: int,
                target_latent: Optional[torch.Tensor] = None) -> TensorDict:
    """The reset input ``[B]`` of :class:`PreviewEnv` from a data batch's pieces."""
    B = noise.shape[0]
    data = {"noise": noise, "cond": cond, "target_features": TensorDict(dict(features), batch_size=[B]),
            NUM_STEPS: torch.full((B,), int(num_steps), dtype=torch.int64)}
    if target_latent is not None:
        data["target_latent"] = target_latent
    return TensorDict(data, batch_size=[B], device=noise.device)
