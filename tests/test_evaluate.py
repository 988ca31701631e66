"""Held-out evaluation: eval sets, exact scoring of a DDIM-table solver, baselines, steps saved,
the report writers and tools/evaluate.py end to end."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from consolver.backends import build_backend
from consolver.config import load_config
from consolver.data.writer import make_noise, sample_seed
from consolver.evaluation import (EVAL_SEED_OFFSET, baseline_schedulers, evaluate, evaluate_scheduler, make_eval_set,
                                  score_latents, solve, steps_saved, steps_saved_line, write_report)
from consolver.rewards import build_rewards
from consolver.sampling import make_scheduler, sample
from consolver.scheduler import ConsistencySolverScheduler
from consolver.solvers.tables import ddim_table

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "conf" / "toy_depth.yaml"
NOISES = 4


@pytest.fixture(scope="module")
def world():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is as fast, and far faster on a busy machine
    cfg = load_config(CONFIG)
    backend = build_backend(cfg.backend)
    reward = build_rewards(cfg.rewards)
    eval_set = make_eval_set(cfg, backend, reward, NOISES)
    yield cfg, backend, reward, eval_set
    torch.set_num_threads(threads)


def save_ddim_tables(path: Path, num_steps, order: int = 4) -> Path:
    """A saved learned solver whose tables are DDIM's (1, 0, 0, 0) rows."""
    solver = ConsistencySolverScheduler(solver_order=order, timestep_spacing="trailing")
    solver.set_coefficient_tables({K: ddim_table(K, order) for K in num_steps})
    solver.save_pretrained(str(path))
    return path


def test_eval_set_is_heldout_prompts_times_fresh_noises_with_reference_targets(world):
    cfg, backend, reward, eval_set = world
    heldout = backend.prompts("heldout")
    P = len(heldout)
    assert len(eval_set) == P * NOISES and eval_set.prompts == [heldout[i % P] for i in range(P * NOISES)]
    assert eval_set.base_seed == cfg.data.seed + EVAL_SEED_OFFSET != cfg.data.seed
    assert torch.equal(eval_set.noise, make_noise([sample_seed(eval_set.base_seed, i) for i in range(P * NOISES)],
                                                  backend.latent_shape))
    # targets exactly as the shard writer's ReferenceSolver makes them
    reference = make_scheduler(cfg.reference.solver, backend.schedule, timestep_spacing=cfg.solver.timestep_spacing)
    expected = sample(backend, reference, eval_set.noise[:3], eval_set.cond[:3], cfg.guidance, cfg.reference.num_steps)
    torch.testing.assert_close(eval_set.target_latent[:3], expected, rtol=0, atol=1e-6)
    assert eval_set.target_image.shape == (P * NOISES, 3, 32, 32) and 0 <= eval_set.target_image.min()
    assert set(eval_set.features) == {"toy_depth"} and eval_set.prompt_index.shape == (P * NOISES,)
    # the targets score perfectly against themselves
    metrics = score_latents(eval_set, eval_set.target_latent, backend, reward, ["toy_depth"])
    assert list(metrics) == ["toy_depth", "mode_agreement", "pixel_psnr"]
    assert bool((metrics["mode_agreement"] == 1).all()) and float(metrics["pixel_psnr"].min()) == 100.0


def test_ddim_table_solver_scores_exactly_like_the_ddim_baseline(world, tmp_path):
    cfg, backend, reward, eval_set = world
    ours = ConsistencySolverScheduler.from_pretrained(str(save_ddim_tables(tmp_path / "scheduler", [3, 4])))
    ddim = baseline_schedulers(cfg, backend, names=["DDIM"])["DDIM"]
    for K in (3, 4):
        assert torch.equal(solve(eval_set, backend, ours, K), solve(eval_set, backend, ddim, K))
        assert evaluate_scheduler(eval_set, backend, ours, K, reward, ["toy_depth"]) == \
            evaluate_scheduler(eval_set, backend, ddim, K, reward, ["toy_depth"])


def test_adams_bashforth_at_8_beats_ddim_at_3_and_every_baseline_builds(world):
    cfg, backend, reward, eval_set = world
    baselines = baseline_schedulers(cfg, backend)
    assert list(baselines) == ["DDIM", "DPM-Solver++ 2M", "UniPC", "DEIS", "Adams-Bashforth 2 (rho)", "iPNDM 4"]
    ab8 = evaluate_scheduler(eval_set, backend, baselines["Adams-Bashforth 2 (rho)"], 8, reward, ["toy_depth"])
    ddim3 = evaluate_scheduler(eval_set, backend, baselines["DDIM"], 3, reward, ["toy_depth"])
    assert ab8["pixel_psnr"] > ddim3["pixel_psnr"] + 5
    # DEIS lands on x0 like the others: at K=12 it is far above the ~37 dB cap of stopping at abar[0]
    deis = evaluate_scheduler(eval_set, backend, baselines["DEIS"], 12, reward, ["toy_depth"])
    assert math.isfinite(deis["pixel_psnr"]) and deis["pixel_psnr"] > 40
    with pytest.raises(ValueError, match="valid baselines"):
        baseline_schedulers(cfg, backend, names=["heun"])


def test_evaluate_rows_skip_missing_k_with_a_note(world, tmp_path):
    cfg, backend, reward, eval_set = world
    ours = ConsistencySolverScheduler.from_pretrained(str(save_ddim_tables(tmp_path / "scheduler", [3])))
    notes, seen = [], []
    rows = evaluate(cfg, {"ours": ours}, [3, 4], NOISES, backend=backend, reward=reward, eval_set=eval_set,
                    baselines=baseline_schedulers(cfg, backend, names=["ddim"]), notes=notes,
                    on_progress=lambda name, K: seen.append((name, K)))
    assert [(r["solver"], r["kind"], r["K"]) for r in rows] == [("ours", "ours", 3), ("DDIM", "baseline", 3),
                                                                 ("DDIM", "baseline", 4)]
    assert seen == [("ours", 3), ("ours", 4), ("DDIM", 3), ("DDIM", 4)]
    assert len(notes) == 1 and "K=4" in notes[0] and "[3]" in notes[0]
    assert rows[0]["toy_depth"] == rows[1]["toy_depth"] and rows[0]["toy_depth_se"] > 0
    paths = write_report(rows, tmp_path / "eval", notes=notes)
    text = paths["md"].read_text()
    assert "| ours | 3 |" in text and "note: ours: no coefficient table for K=4" in text
    assert paths["png"].stat().st_size > 1000


def test_steps_saved_on_hand_made_rows():
    def row(solver, K, q, kind="baseline"):
        return {"solver": solver, "kind": kind, "K": K, "nfe": K, "q": q}

    rows = [row("ours", 3, 40.0, "ours"), row("ours", 4, 45.0, "ours"), row("ours", 5, 60.0, "ours"),
            row("ours", 6, 33.0, "ours"),
            row("A", 3, 30.0), row("A", 4, 38.0), row("A", 5, 41.0), row("A", 6, 44.0), row("A", 7, 46.0),
            row("B", 3, 34.0), row("B", 4, 37.0), row("B", 5, 40.5), row("B", 6, 45.0), row("B", 7, 45.5)]
    # K=3 (40): B never, A reaches 41 at 5 -> 5; K=4 (45): B reaches 45.0 at 6 (ties count) -> 6;
    # K=5 (60): nobody -> None; K=6 (33): B already at 3 -> 3
    assert steps_saved(rows, "ours", "q") == {3: 5, 4: 6, 5: None, 6: 3}
    line = steps_saved_line(rows, "ours", "q")
    assert "K=3 -> NFE 5 (2 saved)" in line and "K=5 -> > 7" in line and "K=6 -> NFE 3 (none saved)" in line
    # another of our solvers is never a baseline
    other = [dict(r, solver="ours2", kind="ours", q=99.0) for r in rows if r["solver"] == "ours"]
    assert steps_saved(rows + other, "ours", "q") == {3: 5, 4: 6, 5: None, 6: 3}


def run_tool(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_tool_end_to_end(tmp_path):
    solver = save_ddim_tables(tmp_path / "run" / "scheduler", [3])
    out = tmp_path / "run" / "eval"  # the default: beside the solver, never the config's output_dir
    proc = run_tool(solver, "--config", CONFIG, "--num-noises", 2, "--steps", "3,4",
                    "--baselines", "ddim,dpm", "--no-progress", "--threads", 1, "reference.num_steps=10",
                    "backend.toy.renders_per_prompt=8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps saved by ConsistencySolver (toy_depth" in proc.stdout and "note: ConsistencySolver" in proc.stdout
    assert (proc.stdout + proc.stderr).count("no coefficient table for K=4") == 1  # said once
    assert not (tmp_path / "outputs").exists()
    with open(out / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["solver"], r["K"]) for r in rows] == [("ConsistencySolver", "3"), ("DDIM", "3"), ("DDIM", "4"),
                                                     ("DPM-Solver++ 2M", "3"), ("DPM-Solver++ 2M", "4")]
    assert {"toy_depth", "toy_depth_se", "pixel_psnr", "mode_agreement"} <= set(rows[0])
    assert rows[0]["toy_depth"] == rows[1]["toy_depth"]
    md = (out / "eval.md").read_text()
    assert "| ConsistencySolver |" in md and "8 samples: 4 prompts x 2 noises" in md
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_tool_missing_scheduler_dir_is_a_one_line_error(tmp_path):
    proc = run_tool(tmp_path / "nowhere", "--config", CONFIG)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "scheduler directory" in proc.stderr and "not found" in proc.stderr


def test_tool_argument_parsing():
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_tool", ROOT / "tools" / "evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.parse_steps("3-6,8, 12") == [3, 4, 5, 6, 8, 12]
    with pytest.raises(ValueError, match="--steps"):
        tool.parse_steps("6-3")
    solvers, overrides = tool.split_positionals(["runs/a/scheduler", "b=runs/b/scheduler", "guidance=2",
                                                 "solver.order=3", "runs/c/scheduler"])
    assert solvers == {"ConsistencySolver": Path("runs/a/scheduler"), "b": Path("runs/b/scheduler"),
                       "c": Path("runs/c/scheduler")}
    assert overrides == ["guidance=2", "solver.order=3"]


def test_no_model_decode_or_reward_call_sees_more_rows_than_configured(world):
    """Solves, decodes and reward calls of an eval set run data.solve_batch_size samples at a time,
    whatever the number of samples (evaluate, evaluate_scheduler and the training monitor alike)."""
    cfg, backend, reward, _ = world
    small = load_config(CONFIG, ["data.solve_batch_size=3", "reference.num_steps=6"])
    rows = {"predict": [], "decode": [], "reward": []}
    originals = (backend.predict, backend.decode, reward.score)

    def predict(x, t, cond, guidance):
        rows["predict"].append(x.shape[0])
        return originals[0](x, t, cond, guidance)

    def decode(latents):
        rows["decode"].append(latents.shape[0])
        return originals[1](latents)

    def score(images, features):
        rows["reward"].append(images.shape[0])
        return originals[2](images, features)

    backend.predict, backend.decode, reward.score = predict, decode, score
    try:
        eval_set = make_eval_set(small, backend, reward, 4)  # 16 samples
        evaluate(small, {}, [3], 4, backend=backend, reward=reward, eval_set=eval_set,
                 baselines=baseline_schedulers(small, backend, names=["ddim"]))
        evaluate_scheduler(eval_set, backend, baseline_schedulers(small, backend, names=["ddim"])["DDIM"], 4, reward,
                           ["toy_depth"])
    finally:
        del backend.predict, backend.decode, reward.score
    assert len(eval_set) == 16
    for name, seen in rows.items():
        assert seen and max(seen) == 3, (name, seen)


def test_a_solver_of_another_schedule_is_a_clear_error(world, tmp_path):
    from consolver.evaluation import check_schedule_match

    cfg, backend, reward, eval_set = world
    flow = ConsistencySolverScheduler(schedule="flow", use_dynamic_shifting=True, solver_order=2)
    with pytest.raises(ValueError, match="different schedules.*flow.*vp.*config.yaml"):
        check_schedule_match("ConsistencySolver", flow, backend, "--config conf/toy_depth.yaml")
    check_schedule_match("ours", ConsistencySolverScheduler.from_pretrained(str(save_ddim_tables(tmp_path / "s", [3]))),
                         backend)  # the same schedule passes
    other_betas = ConsistencySolverScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    with pytest.raises(ValueError, match="beta_schedule"):
        check_schedule_match("ours", other_betas, backend)


@pytest.mark.slow
def test_tool_transfer_writes_one_table_per_world_with_gaps(tmp_path):
    solver = save_ddim_tables(tmp_path / "run" / "scheduler", [3, 4])
    proc = run_tool(solver, "--config", CONFIG, "--transfer", "other_prompts,inverted", "--num-noises", 2,
                    "--steps", "3,4", "--no-progress", "--threads", 1, "reference.num_steps=8",
                    "backend.toy.renders_per_prompt=8", "backend.toy.num_train_prompts=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "other_prompts (ConsistencySolver): " in proc.stdout and "inverted (ConsistencySolver): " in proc.stdout
    md = (tmp_path / "run" / "eval" / "transfer.md").read_text()
    assert "### other_prompts: a disjoint prompt family" in md and "### inverted: other colours" in md
    assert "| K | DDIM | DPM-Solver++ 2M | UniPC | ConsistencySolver | gap mode_agreement (ConsistencySolver) |" in md
    with open(tmp_path / "run" / "eval" / "transfer.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ours = [r for r in rows if r["solver"] == "ConsistencySolver"]
    assert [(r["world"], r["K"]) for r in ours] == [("other_prompts", "3"), ("other_prompts", "4"),
                                                    ("inverted", "3"), ("inverted", "4")]
    # a DDIM table is the DDIM baseline: no gap to DDIM, so a gap to the best is <= 0
    assert all(float(r["gap_pixel_psnr"]) <= 1e-6 and r["best_pixel_psnr"] in ("DDIM", "DPM-Solver++ 2M", "UniPC")
               for r in ours)
    assert len(rows) == 2 * 2 * 4 and {r["num_samples"] for r in rows} == {"8"}  # 4 held-out prompts x 2 noises


@pytest.mark.slow
def test_tool_transfer_names_the_valid_worlds(tmp_path):
    proc = run_tool("--config", CONFIG, "--transfer", "mars", cwd=tmp_path)
    assert proc.returncode != 0 and "unknown transfer world(s) ['mars']; valid: all, heldout" in proc.stderr
