"""Learned step grids in training: distill learns them by gradient, the RL algorithms as an
action column, and the exported scheduler solves on them exactly as training did."""

import pytest
import torch
from tensordict import TensorDict

from consolver.env import solve_plan
from consolver.evaluation import evaluate_scheduler, make_eval_set
from consolver.sampling import make_scheduler, sample
from consolver.scheduler import ConsistencySolverScheduler
from consolver.train import fit
from tests.training import mode_preview, predict_counter, runtime, tiny_config


def _fit(cfg):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        return fit(cfg, runtime=runtime())
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """distill with learned grids at K=3, 4 on the shipped tiny shards."""
    cfg = tiny_config(tmp_path_factory.mktemp("distill_grid"), "algo.name=distill", "solver.learn_timesteps=true",
                      "solver.num_steps=[3,4]", "data.batch_size=8", "trainer.max_steps=80", "algo.lr=0.03")
    return cfg, _fit(cfg)


@pytest.mark.slow
def test_distill_learns_a_grid_that_beats_its_ddim_start_on_heldout_seeds(distilled):
    cfg, result = distilled
    rt = runtime()
    ours = ConsistencySolverScheduler.from_pretrained(result.scheduler_dir)
    eval_set = make_eval_set(cfg, rt["backend"], rt["reward"], num_noises=16)
    ddim = make_scheduler("ddim", rt["backend"].schedule)
    got = evaluate_scheduler(eval_set, rt["backend"], ours, 4, rt["reward"], ["toy_depth"])
    base = evaluate_scheduler(eval_set, rt["backend"], ddim, 4, rt["reward"], ["toy_depth"])
    assert got["toy_depth"] >= base["toy_depth"] + 3.0, (got, base)
    assert got["pixel_psnr"] >= base["pixel_psnr"] + 3.0, (got, base)
    assert got["mode_agreement"] >= base["mode_agreement"], (got, base)
    assert ours.step_grids[4][-1] < 249 - 30, ours.step_grids  # the last evaluation moved towards the data


@pytest.mark.slow  # its fixture trains (6.5 s)
def test_exported_learned_grid_reproduces_the_training_time_mode_preview(distilled):
    cfg, result = distilled
    module, rt = result.module, runtime()
    batch, env = mode_preview(module, cfg, 4)
    loaded = ConsistencySolverScheduler.from_pretrained(result.scheduler_dir)
    grid = loaded.step_grids[4]
    assert grid.tolist() != [999, 749, 499, 249]
    assert env.grid_positions[0, :-1].tolist() == grid.tolist()
    calls, restore = predict_counter(rt["backend"])
    try:
        preview = sample(rt["backend"], loaded, batch["noise"], rt["backend"].encode(batch["prompt"]), cfg.guidance, 4)
    finally:
        restore()
    assert calls == grid.tolist()  # only num_inference_steps given: the model is evaluated on the learned grid
    torch.testing.assert_close(preview, env.final_latents, rtol=0, atol=2e-5)


def test_rl_learns_the_grid_as_an_action_column_in_the_log_prob(tmp_path):
    """GRPO (with the distill loss added, algo.distill_coef) moves every interior grid point,
    the first included (step 0 acts only through its position)."""
    cfg = tiny_config(tmp_path, "solver.learn_timesteps=true", "solver.num_steps=[4]", "trainer.max_steps=6",
                      "algo.distill_coef=0.5")
    module = _fit(cfg).module
    obs, base, mask = solve_plan(module.build_runtime()["scheduler"], 4, "newest", learn_timesteps=True)
    moved = module.mode_actions(4)[:, 3] - base[:, 3]
    assert (moved[:3].abs() > 1e-3).all() and moved[3] == 0, moved  # every interior point's logit moved
    assert module.step_grid(4).tolist() != [999, 749, 499, 249]
    assert base.shape == (4, 4) and mask[:, 3].tolist() == [True, True, True, False]  # no position after the last step
    td = TensorDict({"observation": obs, "step_index": torch.arange(4), "num_steps": torch.full((4,), 4),
                     "base_action": base, "action_mask": mask}, batch_size=[4])
    dist = module.actor.get_dist(td)
    action = dist.sample()
    moved = action.clone()
    moved[:, 3] += 0.5
    changed = dist.log_prob(moved) != dist.log_prob(action)
    assert changed.tolist() == [True, True, True, False]


@pytest.mark.slow
def test_held_out_eval_during_training_solves_on_the_learned_grid(distilled):
    """The monitor's held-out eval is the exported solver's: tables and learned grids."""
    from types import SimpleNamespace

    from consolver.monitor import TrainingMonitor

    cfg, result = distilled
    rt = runtime()
    monitor = TrainingMonitor(cfg)
    monitor.eval_set = make_eval_set(cfg, rt["backend"], rt["reward"], num_noises=4)
    got = monitor.evaluate(SimpleNamespace(logger=None), result.module)
    exported = ConsistencySolverScheduler.from_pretrained(result.scheduler_dir)
    want = evaluate_scheduler(monitor.eval_set, rt["backend"], exported, 4, rt["reward"], ["toy_depth"])
    assert got["eval/K4/toy_depth"] == pytest.approx(want["toy_depth"], abs=1e-3)
