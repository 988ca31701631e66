"""ConsistencySolver on the embedded trained network (``data/toy_unet``) through the generic
``diffusers`` backend, with ``conf/toy_unet_depth.yaml``: the config loads and the backend builds
from the shipped pipeline directory; a short learning run beats DDIM at K=4 on held-out classes x
fresh noises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from consolver.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "conf" / "toy_unet_depth.yaml"
MODEL = ROOT / "data" / "toy_unet"

#: Pixel PSNR (dB) by which the short run's K=4 previews must beat DDIM@4 on held-out classes.
#: Measured over training seeds 0, 1, 2 (docs/toy_unet.md); the threshold sits safely below the worst.
MIN_MARGIN_DB = 3.0

pytestmark = pytest.mark.usefixtures("one_thread")


def test_config_loads_and_the_backend_builds_from_the_shipped_model():
    from consolver.backends import build_backend
    from consolver.backends.toy_scenes import prompt_split
    from consolver.data.prompts import load_prompts
    from consolver.evaluation.core import eval_prompts
    from consolver.evaluation.scene_agreement import scene_classifier_for

    cfg = load_config(CONFIG)
    assert cfg.backend.name == "diffusers" and Path(cfg.backend.model) == Path("data/toy_unet")
    assert cfg.solver.learn_timesteps and list(cfg.solver.num_steps) == [3, 4, 5, 6, 7, 8]
    assert cfg.reference.solver == "dpmsolver++" and cfg.reference.num_steps >= 40
    backend = build_backend(cfg.backend)
    assert backend.latent_shape == (3, 32, 32) and backend.conditional and backend.model_prediction_type == "epsilon"
    id2label = json.loads((MODEL / "model_index.json").read_text())["id2label"]
    assert backend.null_class == len(id2label) == 16
    # shards: train classes only; evaluation: the held-out classes
    train = [r.text for r in load_prompts(cfg.data, backend)]
    held = [r.text for r in eval_prompts(cfg, backend)]
    assert len(train) == 12 and {prompt_split(p) for p in train} == {"train"}
    assert len(held) == 4 and {prompt_split(p) for p in held} == {"heldout"}
    assert backend.class_ids(train).tolist() == list(range(12)) and backend.class_ids(held).tolist() == [12, 13, 14, 15]
    assert scene_classifier_for(backend) is not None
    with torch.no_grad():
        eps = backend.predict(torch.randn(2, 3, 32, 32), 500, backend.encode([held[0], "none"]), cfg.guidance)
    assert eps.shape == (2, 3, 32, 32) and bool(torch.isfinite(eps).all())


def short_run(tmp_path: Path, seed: int = 0, shard_dir: Path | None = None) -> dict:
    """A short K=4 learning run on the embedded model and its held-out score.

    Returns ``{"ours": dB, "ddim": dB, "margin": dB, "steps": n}``: mean pixel PSNR of K=4 previews
    against the targets on the 4 held-out classes x 4 fresh noises (16 samples)."""
    from consolver.backends import build_backend
    from consolver.data.writer import make_shards
    from consolver.evaluation.baselines import baseline_schedulers
    from consolver.evaluation.core import evaluate_scheduler, make_eval_set
    from consolver.rewards import build_rewards
    from consolver.scheduler import ConsistencySolverScheduler
    from consolver.train import fit

    cfg = load_config(CONFIG, [
        f"output_dir={tmp_path / 'run'}", f"data.shard_dir={shard_dir or tmp_path / 'shards'}", "solver.num_steps=[4]",
        "reference.num_steps=20", "data.num_samples=24", "data.samples_per_shard=24", "data.shuffle_buffer=24",
        "data.batch_size=4", "algo.group_size=4", "trainer.max_steps=30", "trainer.checkpoint_every=1000",
        "trainer.image_every=0", "trainer.progress_bar=false", "trainer.num_threads=0", "validation.gate=off",
        f"seed={seed}"])
    backend = build_backend(cfg.backend)
    runtime = {"backend": backend, "reward": build_rewards(cfg.rewards).to(backend.device)}
    make_shards(cfg, backend=backend, reward=runtime["reward"])
    result = fit(cfg, runtime=runtime, progress_bar=False)
    ours = ConsistencySolverScheduler.from_pretrained(str(result.scheduler_dir))
    ddim = baseline_schedulers(cfg, backend, names=["ddim"])
    eval_set = make_eval_set(cfg, backend, None, num_noises=4)
    assert sorted(set(eval_set.prompts)) == sorted(set(Path(ROOT / cfg.data.heldout_prompts).read_text().splitlines()))
    score = {"ours": evaluate_scheduler(eval_set, backend, ours, 4, None)["pixel_psnr"],
             "ddim": evaluate_scheduler(eval_set, backend, next(iter(ddim.values())), 4, None)["pixel_psnr"]}
    return dict(score, margin=score["ours"] - score["ddim"], steps=result.iteration)


@pytest.mark.slow
def test_a_short_run_on_the_embedded_network_beats_ddim_at_k4_on_heldout_classes(tmp_path):
    score = short_run(tmp_path)
    assert score["steps"] == 30
    assert score["margin"] >= MIN_MARGIN_DB, score
