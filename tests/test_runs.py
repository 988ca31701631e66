"""One output directory, one run: interrupted runs keep their work and resume, a used output_dir
is refused (or replaced with --overwrite), a checkpoint of another config is refused before
anything is written (consolver.runs, consolver.training_callbacks, tools/fit.py)."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from consolver.runs import ResumeMismatchError, RunExistsError, config_differences, prepare_run
from consolver.train import fit
from tests.training import ROOT, runtime, tiny_config

SCRIPT = ROOT / "tests" / "fit_script.py"
ARGS = ["trainer.max_steps=8", "trainer.checkpoint_every=3", "solver.num_steps=[3,4]"]


def snapshot(root: Path) -> dict:
    """Every file under ``root``: its bytes' hash and mtime."""
    return {str(p.relative_to(root)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_script(out, *args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), *args], env=env, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"fit script failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    run_script(out, *ARGS)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_signal_mid_fit_saves_exports_and_resumes_to_the_uninterrupted_result(whole_run, tmp_path, signal_name):
    """Ctrl-C (SIGINT) or SLURM preemption (SIGTERM) during iteration 5: the run finishes that
    iteration, saves last.ckpt, exports the solver trained so far; --resume then ends exactly
    where an uninterrupted run ends."""
    cut = run_script(tmp_path, "--signal-after", "4", "--signal", signal_name, *ARGS)
    assert f"RESULT iteration=5 interrupted={signal_name}" in cut.stdout, cut.stdout + cut.stderr[-2000:]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 5
    assert (tmp_path / "scheduler" / "consolver_policy.safetensors").is_file()
    resumed = run_script(tmp_path, "--resume", *ARGS)
    assert "RESULT iteration=8 interrupted=None" in resumed.stdout
    whole = torch.load(whole_run / "actor-rank0.pt")
    again = torch.load(tmp_path / "actor-rank0.pt")
    for key in whole:
        torch.testing.assert_close(again[key], whole[key], rtol=0, atol=1e-6)
    assert (whole["module.0.module.mean"] != 0).any()  # it trained


@pytest.fixture(scope="module")
def used_dir(tmp_path_factory):
    """A finished 2-iteration run (its own shards elsewhere)."""
    out = tmp_path_factory.mktemp("used")
    fit(tiny_config(out, "trainer.max_steps=2", "solver.num_steps=[4]"), runtime=runtime())
    return out


@pytest.mark.slow
def test_checkpoints_are_named_by_iteration_and_the_exported_policy_is_readable(used_dir, tmp_path):
    out = tmp_path / "run"
    result = fit(tiny_config(out, "algo.name=ppo", "algo.epochs=2", "algo.minibatches=2", "trainer.max_steps=4",
                             "trainer.checkpoint_every=2", "trainer.log_every_n_steps=2", "solver.num_steps=[4]"),
                 runtime=runtime())
    assert result.module.updates_per_batch == 4 and result.iteration == 4
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=2.ckpt", "step=4.ckpt"]  # iterations, not optimizer steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb")).Reload()
    steps = [e.step for e in events.Scalars("train/reward_mean")]
    assert len(steps) == 2 and max(steps) <= 4  # every 2 iterations (not every 2 x 4 optimizer steps)
    mode = stat.S_IMODE((out / "scheduler" / "consolver_policy.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((out / "scheduler" / "scheduler_config.json").stat().st_mode)


def test_a_second_fit_into_a_used_output_dir_is_refused_and_changes_nothing(used_dir):
    before = snapshot(used_dir)
    with pytest.raises(RunExistsError, match=r"--resume.*output_dir=.*--overwrite"):
        fit(tiny_config(used_dir, "trainer.max_steps=2", "solver.num_steps=[4]"), runtime=runtime())
    assert snapshot(used_dir) == before


@pytest.mark.slow
def test_the_fit_tool_refuses_before_making_shards(used_dir, tmp_path):
    """tools/fit.py checks output_dir before it makes any shard."""
    shards = tmp_path / "shards"
    before = snapshot(used_dir)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "fit.py"), f"output_dir={used_dir}",
                           f"data.shard_dir={shards}"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1 and "already holds a run" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not shards.exists() and snapshot(used_dir) == before


def test_resume_with_a_checkpoint_of_another_config_names_the_keys_and_writes_nothing(used_dir):
    before = snapshot(used_dir)
    other = tiny_config(used_dir, "trainer.max_steps=4", "solver.num_steps=[3,5]", "guidance=2.0")
    with pytest.raises(ResumeMismatchError) as err:
        fit(other, resume=True, runtime=runtime())
    message = str(err.value)
    assert "solver.num_steps" in message and "guidance" in message and "config.yaml" in message
    assert "trainer.max_steps" not in message  # a longer run is a resume, not another config
    assert snapshot(used_dir) == before


@pytest.mark.slow
def test_resume_may_extend_the_run(used_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(used_dir, run)
    result = fit(tiny_config(run, "trainer.max_steps=3", "solver.num_steps=[4]"), resume=True, runtime=runtime())
    assert result.iteration == 3


def test_overwrite_replaces_the_run_and_keeps_shards(tmp_path):
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "shard-000000.tar").write_bytes(b"kept")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step=500.ckpt").write_bytes(b"old")
    (out / "config.yaml").write_text("old: run\n")
    cfg = tiny_config(out, "trainer.max_steps=1", "solver.num_steps=[4]")
    with pytest.raises(RunExistsError):
        prepare_run(cfg)
    assert prepare_run(cfg, overwrite=True) is None
    assert not (out / "checkpoints").exists() and not (out / "config.yaml").exists()
    assert (out / "shards" / "shard-000000.tar").read_bytes() == b"kept"


def test_config_differences_ignore_what_may_change_on_resume():
    a = {"trainer": {"max_steps": 10, "eval_every": 5}, "algo": {"lr": 0.01}, "output_dir": "x"}
    b = {"trainer": {"max_steps": 20, "eval_every": 0}, "algo": {"lr": 0.02}, "output_dir": "y"}
    assert config_differences(a, b) == [("algo.lr", 0.01, 0.02)]


def test_load_module_restores_the_exported_solver_from_last_ckpt(used_dir):
    import numpy as np

    from consolver.scheduler import ConsistencySolverScheduler
    from consolver.train import load_module

    module = load_module(used_dir / "checkpoints" / "last.ckpt", runtime=runtime())
    exported = ConsistencySolverScheduler.from_pretrained(used_dir / "scheduler")
    np.testing.assert_allclose(module.coefficient_table(4), np.asarray(exported.config.coefficient_tables["4"]),
                               rtol=0, atol=1e-12)
