"""Scene agreement (consolver.evaluation.scene_agreement) and held-out evaluation prompts
(``data.heldout_prompts``) for the generic diffusers backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from consolver.backends.diffusers_model import DiffusersModelBackend
from consolver.backends.toy_scenes import parse_prompt, prompt_list, render_scenes
from consolver.config import ConfigError, load_config
from consolver.evaluation.core import eval_prompts, make_eval_set, score_latents
from consolver.evaluation.scene_agreement import SceneClassifier, scene_classifier_for, toy_class_prompts
from tests.tiny_models import add_to_model_index, tiny_ddpm_dir

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = prompt_list("train", 12) + prompt_list("heldout", 4)  # the embedded model's 16 classes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier():
    return SceneClassifier(PROMPTS)


def test_fresh_jittered_renders_of_class_c_are_classified_as_c(classifier):
    n = 24
    scenes = [parse_prompt(p) for p in PROMPTS for _ in range(n)]
    images, _, _ = render_scenes(scenes, 32, torch.Generator().manual_seed(777))  # not the templates' seed
    labels = classifier.classify(images)
    truth = torch.arange(len(PROMPTS)).repeat_interleave(n)
    per_class = torch.stack([(labels[truth == c] == c).float().mean() for c in range(len(PROMPTS))])
    assert float((labels == truth).float().mean()) >= 0.98
    assert float(per_class.min()) >= 0.9, per_class


def test_the_background_colour_does_not_decide_the_class(classifier):
    """A trained model's backgrounds drift off the palette (data/toy_unet's card): renders on
    backgrounds of random colours are still classified as their scene."""
    from consolver.backends.toy_scenes import jittered_params, render

    n = 24
    g = torch.Generator().manual_seed(31)
    params = jittered_params([parse_prompt(p) for p in PROMPTS for _ in range(n)], g)
    params = params._replace(background=torch.rand(params.background.shape, generator=g, dtype=torch.float64))
    images, _, _ = render(params, 32)
    truth = torch.arange(len(PROMPTS)).repeat_interleave(n)
    assert float((classifier.classify(images) == truth).float().mean()) >= 0.95


def test_agreement_is_one_for_the_same_scene_and_zero_for_another(classifier):
    g = torch.Generator().manual_seed(5)
    a, _, _ = render_scenes([parse_prompt(PROMPTS[3]), parse_prompt(PROMPTS[14])], 32, g)
    b, _, _ = render_scenes([parse_prompt(PROMPTS[3]), parse_prompt(PROMPTS[0])], 32, g)
    assert classifier.agreement(a, b).tolist() == [1.0, 0.0]
    # a little pixel noise does not change the label; 64 px images are resized
    noisy = (a + 0.03 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert classifier.agreement(a, noisy).tolist() == [1.0, 1.0]
    assert classifier.classify(torch.nn.functional.interpolate(a, scale_factor=2)).tolist() == [3, 14]
    # labels are the given class ids
    relabelled = SceneClassifier(PROMPTS[:2], class_ids=[7, 9], renders_per_class=8)
    assert set(relabelled.classify(a).tolist()) <= {7, 9}
    with pytest.raises(ValueError, match="2 class ids for 1 prompts"):
        SceneClassifier(PROMPTS[:1], class_ids=[0, 1])


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """A tiny class-conditional pipeline directory laid out like data/toy_unet: 4 toy-prompt classes + null."""
    path = tiny_ddpm_dir(tmp_path_factory.mktemp("toyish") / "m", num_class_embeds=5, sd15_betas=True)
    add_to_model_index(path, id2label={str(i): p for i, p in enumerate(PROMPTS[10:14])})
    return path


def test_scene_classifier_only_for_models_of_toy_prompts(toy_dir, tmp_path):
    b = DiffusersModelBackend(str(toy_dir), device="cpu")
    assert toy_class_prompts(b) == (PROMPTS[10:14], [0, 1, 2, 3])
    clf = scene_classifier_for(b)
    assert clf is not None and clf.resolution == 8 and scene_classifier_for(b) is clf  # cached
    other = tiny_ddpm_dir(tmp_path / "names", num_class_embeds=6, sd15_betas=True)  # id2label: "red circle", ...
    assert scene_classifier_for(DiffusersModelBackend(str(other), device="cpu")) is None


def test_heldout_prompts_decide_the_evaluation_prompts(toy_dir, tmp_path):
    train, held = tmp_path / "train.txt", tmp_path / "held.txt"
    train.write_text("\n".join(PROMPTS[10:12]) + "\n")
    held.write_text("\n".join(PROMPTS[12:14]) + "\n")
    overrides = ["backend.name=diffusers", f"backend.model={toy_dir}", "backend.device=cpu", "backend.resolution=8",
                 "guidance=2.0", f"data.prompts={train}", "rewards=[{name: pixel_psnr}]", "reference.num_steps=4",
                 "data.solve_batch_size=4"]
    b = DiffusersModelBackend(str(toy_dir), device="cpu")
    plain = load_config(None, overrides)
    assert [r.text for r in eval_prompts(plain, b)] == PROMPTS[10:12]  # no held-out file: the training prompts
    cfg = load_config(None, overrides + [f"data.heldout_prompts={held}"])
    assert [r.text for r in eval_prompts(cfg, b)] == PROMPTS[12:14]
    # the null class as the evaluation condition: scene agreement is reported
    null = tmp_path / "null.txt"
    null.write_text("none\n")
    cfg = load_config(None, overrides + [f"data.heldout_prompts={null}"])
    eval_set = make_eval_set(cfg, b, None, num_noises=3)
    assert eval_set.prompts == ["none"] * 3 and eval_set.cond["class_labels"].tolist() == [4, 4, 4]
    metrics = score_latents(eval_set, eval_set.target_latent, b, None)
    assert metrics["scene_agreement"].tolist() == [1.0, 1.0, 1.0] and set(metrics) == {"scene_agreement", "pixel_psnr"}
    # a pixel_psnr reward and the pixel_psnr metric are one column of B values, not 2B
    from consolver.rewards import build_rewards

    reward = build_rewards(cfg.rewards)
    with_reward = score_latents(make_eval_set(cfg, b, reward, num_noises=3), eval_set.noise, b, reward, ["pixel_psnr"])
    assert with_reward["pixel_psnr"].shape == (3,) and set(with_reward) == {"scene_agreement", "pixel_psnr"}
    # a held-out class the model does not have is refused
    bad = tmp_path / "bad.txt"
    bad.write_text("a red triangle on the left\n")
    with pytest.raises(ValueError, match="unknown class name"):
        eval_prompts(load_config(None, overrides + [f"data.heldout_prompts={bad}"]), b)
    with pytest.raises(ConfigError, match="file not found"):
        eval_prompts(load_config(None, overrides + [f"data.heldout_prompts={tmp_path / 'missing.txt'}"]), b)
