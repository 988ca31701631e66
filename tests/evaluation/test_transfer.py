"""Transfer worlds: definitions, determinism, the paired gaps and the targets' checks."""

import pytest
import torch

from consolver.backends import build_backend
from consolver.backends.toy import ToyBackend
from consolver.config import load_config
from consolver.evaluation.core import make_eval_set
from consolver.evaluation.transfer import (TRANSFER_WORLDS, evaluate_world, paired_gap, select_worlds,
                                           world_config)
from consolver.evaluation.transfer_report import check_metrics, world_checks, world_markdown


@pytest.fixture(scope="module")
def cfg():
    return load_config("conf/toy_depth.yaml", ["reference.num_steps=8", "data.solve_batch_size=16",
                                               "backend.toy.num_train_prompts=4", "backend.toy.num_heldout_prompts=2",
                                               "backend.toy.renders_per_prompt=16"])


def test_select_worlds_names_the_valid_ones():
    assert [w.name for w in select_worlds("all", "toy")] == list(TRANSFER_WORLDS)
    assert [w.name for w in select_worlds("all", "sd15")] == ["heldout"]  # variants of the toy only
    assert [w.name for w in select_worlds("inverted, heldout", "toy")] == ["inverted", "heldout"]
    with pytest.raises(ValueError, match="valid: all, heldout, other_prompts"):
        select_worlds("other_prompt", "toy")
    with pytest.raises(ValueError, match="not of backend 'sd15'"):
        select_worlds("inverted", "sd15")


def test_every_world_config_loads_and_differs_from_the_training_world(cfg):
    for world in TRANSFER_WORLDS.values():
        wcfg = world_config(world, cfg)
        changed = wcfg != cfg
        assert changed == (world.name != "heldout"), world.name
    assert cfg.backend.toy.palette == "default" and cfg.guidance == 3.0  # the training config is not changed


def test_other_prompts_world_is_disjoint_and_inverted_world_inverts(cfg):
    train = ToyBackend.config_meta(cfg.backend)["toy"]["prompts"]
    other = ToyBackend.config_meta(world_config(TRANSFER_WORLDS["other_prompts"], cfg).backend)["toy"]["prompts"]
    assert len(other) == len(train) == 6 and not set(train) & set(other)
    prompt = "a red circle on the left"
    plain = ToyBackend(num_train_prompts=1, num_heldout_prompts=0, renders_per_prompt=4)
    inverted = ToyBackend(num_train_prompts=1, num_heldout_prompts=0, renders_per_prompt=4, palette="inverted")
    assert torch.allclose(inverted.renders(prompt), 1 - plain.renders(prompt), atol=1e-6)
    assert inverted.meta()["toy"]["palette"] == "inverted" and "palette" not in plain.meta()["toy"]


@pytest.mark.slow
def test_a_transfer_world_is_deterministic(cfg):
    wcfg = world_config(TRANSFER_WORLDS["other_renders"], cfg)
    sets = [make_eval_set(wcfg, build_backend(wcfg.backend), None, 2) for _ in range(2)]
    assert sets[0].prompts == sets[1].prompts
    assert torch.equal(sets[0].noise, sets[1].noise) and torch.equal(sets[0].target_latent, sets[1].target_latent)
    default = make_eval_set(cfg, build_backend(cfg.backend), None, 2)
    assert torch.equal(default.noise, sets[0].noise)  # same noises (data.seed) ...
    assert not torch.allclose(default.target_latent, sets[0].target_latent, atol=1e-2)  # ... other world


def _samples(values):
    return {key: {"pixel_psnr": torch.tensor(v, dtype=torch.float32)} for key, v in values.items()}


def test_paired_gap_uses_the_best_baseline_and_the_paired_error():
    samples = _samples({("ours", 4): [10.0, 12.0, 14.0], ("A", 4): [9.0, 10.0, 11.0], ("B", 4): [11.0, 11.0, 11.0]})
    best, gap, se = paired_gap(samples, "ours", 4, "pixel_psnr", ["A", "B"])
    assert best == "B" and gap == pytest.approx(1.0)
    assert se == pytest.approx(torch.tensor([-1.0, 1.0, 3.0]).std().item() / 3**0.5)
    assert paired_gap(samples, "ours", 5, "pixel_psnr", ["A"]) is None


def test_world_checks_flag_behind_falling_and_the_preview_target():
    samples = _samples({
        ("ours", 4): [20.0, 21.0, 22.0, 23.0], ("ours", 5): [18.0, 19.0, 20.0, 21.0],  # falls by 2
        ("DPM-Solver++ 2M", 4): [15.0, 15.0, 15.0, 15.0], ("DPM-Solver++ 2M", 5): [25.0, 25.5, 24.5, 25.0],
        ("DPM-Solver++ 2M", 8): [21.0, 21.0, 21.0, 21.0]})
    checks = world_checks(samples, "ours", [4, 5, 8], ["DPM-Solver++ 2M"])
    assert [(K, m) for K, m, *_ in checks["behind"]] == [(5, "pixel_psnr")]
    assert [(K, m) for K, m, *_ in checks["not_rising"]] == [(5, "pixel_psnr")]
    assert checks["preview_vs_8"]["pixel_psnr"][0] == pytest.approx(0.5)


@pytest.mark.slow
def test_evaluate_world_scores_ours_and_baselines_on_the_same_samples(cfg):
    from consolver.scheduler import ConsistencySolverScheduler

    ours = ConsistencySolverScheduler()  # the base solver, DDIM: equal to the DDIM baseline sample by sample
    wcfg = world_config(TRANSFER_WORLDS["wide_modes"], cfg)
    samples = evaluate_world(wcfg, {"ours": ours}, [3, 4], 2)
    assert {k for k in samples} == {(n, K) for n in ("ours", "DDIM", "DPM-Solver++ 2M", "UniPC") for K in (3, 4)}
    assert check_metrics(samples) == ["mode_agreement", "pixel_psnr"]
    for K in (3, 4):
        for metric, values in samples[("ours", K)].items():
            assert values.shape == (4,)  # 2 held-out prompts x 2 noises
            assert torch.allclose(values, samples[("DDIM", K)][metric], atol=1e-4), metric
    text = world_markdown(TRANSFER_WORLDS["wide_modes"], samples, ["ours"], [3, 4], ["DDIM", "DPM-Solver++ 2M", "UniPC"], 4)
    assert "| K | DDIM | DPM-Solver++ 2M | UniPC | ours |" in text and "### wide_modes" in text
