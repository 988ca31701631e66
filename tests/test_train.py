"""Training end to end on the toy world: learning, export, resume after SIGKILL, DDP."""

import os
import subprocess
from pathlib import Path
import sys

import pytest
import torch

from consolver.algos.base import solver_scheduler
from consolver.evaluation import evaluate_scheduler, make_eval_set
from consolver.sampling import make_scheduler, sample
from consolver.scheduler import ConsistencySolverScheduler
from consolver.train import export_scheduler, fit
from tests.training import ROOT, mode_preview, runtime, sample_batch, tiny_config

pytestmark = pytest.mark.slow  # training runs and subprocesses: the full tier only

SCRIPT = ROOT / "tests" / "fit_script.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short GRPO run at K=4 (the shipped tiny shards, 8 samples x 8 rollouts per batch)."""
    out = tmp_path_factory.mktemp("grpo")
    torch.manual_seed(0)
    cfg = tiny_config(out, "algo.name=grpo", "algo.epochs=1", "algo.minibatches=1", "solver.num_steps=[4]",
                      "data.batch_size=8", "algo.group_size=8", "trainer.max_steps=120", "trainer.checkpoint_every=60")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = fit(cfg, runtime=runtime())
    finally:
        torch.set_num_threads(threads)
    return cfg, result


def test_short_grpo_run_beats_ddim_on_heldout_seeds(trained):
    """Held-out prompts x fresh noises: the exported K=4 solver gains >= 1.5 dB of toy depth over
    DDIM (an untrained policy *is* DDIM) and does not lose mode agreement."""
    cfg, result = trained
    rt = runtime()
    eval_set = make_eval_set(cfg, rt["backend"], rt["reward"], num_noises=16)
    ours = ConsistencySolverScheduler.from_pretrained(result.scheduler_dir)
    ddim = make_scheduler("ddim", rt["backend"].schedule)
    got = evaluate_scheduler(eval_set, rt["backend"], ours, 4, rt["reward"], ["toy_depth"])
    base = evaluate_scheduler(eval_set, rt["backend"], ddim, 4, rt["reward"], ["toy_depth"])
    assert got["toy_depth"] >= base["toy_depth"] + 1.5, (got, base)
    assert got["mode_agreement"] >= base["mode_agreement"] - 0.02, (got, base)


def test_exported_scheduler_reproduces_the_training_time_mode_preview(trained):
    cfg, result = trained
    module, rt = result.module, runtime()
    batch, env = mode_preview(module, cfg, 4)
    loaded = ConsistencySolverScheduler.from_pretrained(result.scheduler_dir)
    assert loaded.available_num_steps == [4]
    preview = sample(rt["backend"], loaded, batch["noise"], rt["backend"].encode(batch["prompt"]), cfg.guidance, 4)
    torch.testing.assert_close(preview, env.final_latents, rtol=0, atol=2e-5)
    ddim = sample(rt["backend"], make_scheduler("ddim", rt["backend"].schedule), batch["noise"],
                  rt["backend"].encode(batch["prompt"]), cfg.guidance, 4)
    assert (preview - ddim).abs().max() > 1e-3  # the learned table is not DDIM
    assert (result.scheduler_dir / "consolver_policy.safetensors").is_file()


def test_export_refuses_an_untrained_k(trained, tmp_path):
    _, result = trained
    with pytest.raises(ValueError, match=r"not trained; trained K: \[4\]"):
        export_scheduler(result.module, tmp_path / "s", [4, 6])


def test_export_passes_the_validation_gate_and_records_its_scores(trained, tmp_path):
    cfg, result = trained
    module = result.module
    gated = cfg.copy()
    gated.validation.gate, gated.validation.num_samples = "report", 16
    module.cfg = gated
    try:
        path = export_scheduler(module, tmp_path / "s")
    finally:
        module.cfg = cfg
    record = ConsistencySolverScheduler.from_pretrained(path).config.validation
    assert record["world"] == "heldout" and record["gate"] == "report" and record["num_samples"] == 16
    entry = record["num_steps"]["4"]
    assert entry["verdict"] == "kept" and set(entry) >= {"mode_agreement", "pixel_psnr", "loses"}
    assert entry["pixel_psnr"]["best"] in record["rivals"] and entry["pixel_psnr"]["ours"] > 0
    assert ConsistencySolverScheduler.from_pretrained(result.scheduler_dir).config.validation is None  # gate off


def test_checkpoints_every_n_iterations_and_last(trained):
    cfg, _ = trained
    names = sorted(p.name for p in (Path(cfg.output_dir) / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step=120.ckpt", "step=60.ckpt"]


def run_script(out, *args, env_extra=None, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), *args], env=env, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"fit script failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_run_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path):
    """SIGKILL after the checkpoint of iteration 6, resume: the final weights equal an
    uninterrupted run's (data position, optimizer, LR schedule and sampling seeds restored)."""
    args = ["trainer.max_steps=10", "trainer.checkpoint_every=3", "solver.num_steps=[3,4]"]
    run_script(tmp_path / "whole", *args)
    killed = run_script(tmp_path / "cut", "--kill-after", "6", *args, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "cut" / "actor-rank0.pt").exists()
    run_script(tmp_path / "cut", "--resume", *args)
    whole = torch.load(tmp_path / "whole" / "actor-rank0.pt")
    resumed = torch.load(tmp_path / "cut" / "actor-rank0.pt")
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-6)
    assert (whole["module.0.module.mean"] != 0).any()  # it trained


def test_ddp_two_processes_end_with_identical_weights(tmp_path):
    run_script(tmp_path, "trainer.max_steps=4", "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
               "data.resampled=true", "data.epoch_length=16")
    rank0 = torch.load(tmp_path / "actor-rank0.pt")
    rank1 = torch.load(tmp_path / "actor-rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert (tmp_path / "scheduler" / "scheduler_config.json").is_file()


@pytest.mark.parametrize("distribution", ["bins", "gaussian"])
def test_sample_feature_policy_ships_inside_the_scheduler(tmp_path, distribution):
    """An mlp actor that looks at the latents (history cosine similarities) is carried by the
    exported scheduler as a policy; a diffusers-style loop reproduces the mode preview."""
    cfg = tiny_config(tmp_path, "solver.learn_timesteps=false", "policy.name=mlp", "policy.sample_features=true", f"policy.distribution={distribution}",
                      "trainer.max_steps=3", "algo.lr=0.05", "solver.num_steps=[5]", "policy.hidden=32")
    result = fit(cfg, runtime=runtime())
    module, rt = result.module, runtime()
    for p in module.actor.parameters():  # move the mode away from DDIM, as training would
        torch.nn.init.normal_(p, std=0.3)
    export_scheduler(module, tmp_path / "exported")
    loaded = ConsistencySolverScheduler.from_pretrained(tmp_path / "exported")
    assert loaded.policy_module is not None and loaded.policy_module.depends_on_sample
    batch = sample_batch(cfg, 4, seed=7)
    _, env = module.rollout(module.reset_input(batch, 5), 5, deterministic=True)
    preview = sample(rt["backend"], loaded, batch["noise"], rt["backend"].encode(batch["prompt"]), cfg.guidance, 5)
    torch.testing.assert_close(preview, env.final_latents, rtol=0, atol=1e-4)
    ddim = sample(rt["backend"], make_scheduler("ddim", rt["backend"].schedule), batch["noise"],
                  rt["backend"].encode(batch["prompt"]), cfg.guidance, 5)
    assert (preview - ddim).abs().max() > 1e-3


def test_batches_with_non_finite_rewards_are_skipped_counted_and_never_applied(tmp_path):
    cfg = tiny_config(tmp_path, "trainer.max_steps=3", "solver.num_steps=[4]")
    rt = runtime()
    reward = rt["reward"]

    class NaNReward(type(reward)):
        def score(self, preview, target_features):
            out = super().score(preview, target_features)
            return torch.where(torch.arange(len(out)) == 1, torch.full_like(out, float("nan")), out)

    broken = NaNReward.__new__(NaNReward)
    broken.__dict__.update(reward.__dict__)
    rt["reward"] = broken
    result = fit(cfg, runtime=rt)
    assert result.module.skipped_batches == 3
    head = result.module.actor.module[0].module
    assert torch.all(head.mean == 0)  # the initial policy: no update was applied
    torch.testing.assert_close(head.log_std.exp(), torch.full_like(head.log_std, cfg.policy.init_std))
    loaded = ConsistencySolverScheduler.from_pretrained(result.scheduler_dir)
    assert torch.isfinite(torch.tensor(loaded.config.coefficient_tables["4"])).all()


def test_reward_without_cached_features_names_the_reward(tmp_path):
    cfg = tiny_config(tmp_path, "rewards=[{name: pixel_ssim}]", "trainer.max_steps=1")
    with pytest.raises(Exception, match=r"pixel_ssim"):
        fit(cfg, runtime=runtime())
