"""FID and KID (consolver.evaluation.fid): the exact fast paths against torchmetrics' own formulas,
behaviour on a stub feature extractor, weights errors, reference folders, and — with a randomly
initialised Inception of the FID architecture saved as the "local weights" (nothing is downloaded) —
FID/KID of real images and tools/evaluate.py's fid/kid columns on the toy world."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

from consolver.evaluation.fid import (WEIGHTS_FLAG, FidKid, InceptionFeatures, InceptionWeightsError, _kid_class,
                                      _Precomputed, build_fid_kid, frechet_distance, iter_image_batches, list_images,
                                      load_inception)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "conf" / "toy_depth.yaml"


def save_random_inception(path: Path, seed: int = 0) -> Path:
    """A state dict of torch-fidelity's FID Inception with random weights (He-normal convolutions,
    so features neither vanish nor explode), built without loading or downloading anything."""
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    with mock.patch.object(tfi, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
    torch.save(net.state_dict(), path)
    return path


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``[n, 3, size, size]`` in [0, 1]: blurry random blobs (image-like, not white noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def perturb(images: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images + sigma * torch.randn(images.shape, generator=g)).clamp(0, 1)


class StubExtractor(nn.Module):
    """A fixed random projection of centred pixels: ``[B, 3, H, W] -> [B, 32]`` float64, features of
    order 0.1 like Inception's (a fast stand-in)."""

    num_features = 32

    def __init__(self, size: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(3 * size * size, self.num_features, generator=g, dtype=torch.float64) / size
        self.calls = 0

    def forward(self, images):
        self.calls += images.shape[0]
        return (images.double() - 0.5).flatten(1) @ self.weight


# ---------------------------------------------------------------- the math, against torchmetrics


@pytest.mark.parametrize("n1,n2", [(5, 9), (200, 150)])  # rank-deficient and full-rank covariances
def test_frechet_distance_matches_torchmetrics(n1, n2):
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(n1)
    d = 64
    a = torch.randn(n1, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    b = torch.randn(n2, d, generator=g, dtype=torch.float64) + 0.3
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    expected = _compute_fid(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * float(s1.trace() + s2.trace()))
    assert abs(float(frechet_distance(mu1, s1, mu1, s1))) < 1e-8 * float(s1.trace())


def test_kid_shortcut_gives_torchmetrics_numbers_and_leaves_the_global_rng_alone():
    from torchmetrics.image.kid import KernelInceptionDistance

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(40, 16, generator=g, dtype=torch.float64), torch.randn(30, 16, generator=g,
                                                                                   dtype=torch.float64) + 0.2
    ours = _kid_class()(16, subsets=7, subset_size=20, seed=3)
    with pytest.warns(UserWarning):
        plain = KernelInceptionDistance(feature=_Precomputed(16), subsets=7, subset_size=20)
    for metric in (ours, plain):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    state = torch.random.get_rng_state()
    mean, std = ours.compute()
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(3)
    expected_mean, expected_std = plain.compute()
    torch.testing.assert_close((mean, std), (expected_mean, expected_std), rtol=1e-9, atol=1e-12)
    assert ours.compute() == (mean, std)  # fixed seed: the same subsets every time


# ---------------------------------------------------------------- FidKid on a stub extractor


@pytest.mark.slow
def test_fid_kid_zero_on_itself_growing_with_noise_and_small_sets_adapt_kid():
    images = smooth_images(200)
    stub = StubExtractor()
    fid_kid = FidKid(stub, kid_subsets=20, kid_subset_size=1000)
    assert fid_kid.add_reference("", images) == 200
    assert stub.calls == 200

    def score(previews):
        fid_kid.reset()
        for chunk in previews.split(64):  # batched updates
            fid_kid.update(chunk)
        return fid_kid.compute()

    same = score(images)
    assert set(same) == {"fid", "kid", "kid_se"}
    assert abs(same["fid"]) < 1e-9 * float(torch.cov(stub(images).T).trace())
    results = [score(perturb(images, sigma)) for sigma in (0.02, 0.1, 0.3)]
    fids, kids = [r["fid"] for r in results], [r["kid"] for r in results]
    assert same["fid"] < fids[0] < fids[1] < fids[2]
    assert same["kid"] < kids[0] < kids[1] < kids[2]
    # KID is the unbiased MMD^2 estimate: a set against itself (not independent of itself) scores
    # -2 (mean k(x, x) - mean k(x, y)) / n, an independent draw of the same distribution ~0
    from torchmetrics.image.kid import poly_kernel

    k, n = poly_kernel(stub(images), stub(images)), 200
    assert same["kid"] == pytest.approx(float(2 * (k.sum() - k.trace()) / (n * (n - 1)) - 2 * k.sum() / n**2))
    other = smooth_images(200, seed=1)
    independent = [score(perturb(other, sigma) if sigma else other)["kid"] for sigma in (0, 0.1, 0.2, 0.4)]
    assert independent == sorted(independent) and abs(independent[0]) < 0.1 * independent[-1]
    # KID's subset size shrank to the 200 samples (subset_size 1000 asked)
    kid = fid_kid._metrics[""][1]
    assert kid.used_subset_size == 200 and kid.subset_size == 1000
    # fewer previews than the reference: capped by the smaller side
    assert fid_kid.add_reference("_ref", images[:6]) == 6
    out = score(images[:3])
    assert set(out) == {"fid", "kid", "kid_se", "fid_ref", "kid_ref", "kid_ref_se"}
    assert fid_kid._metrics["_ref"][1].used_subset_size == 3
    fid_kid.reset()
    fid_kid.update(images[:1])
    with pytest.raises(ValueError, match=">= 2"):
        fid_kid.compute()


# ---------------------------------------------------------------- weights: local file only, clear errors


def test_missing_or_wrong_weights_name_the_flag(tmp_path):
    assert WEIGHTS_FLAG == "--inception-weights"
    with pytest.raises(InceptionWeightsError, match="--inception-weights PATH.*weights-inception-2015-12-05"):
        load_inception(None)
    with pytest.raises(InceptionWeightsError, match="--inception-weights .*nowhere.pth.*no such file"):
        InceptionFeatures(tmp_path / "nowhere.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="--inception-weights .*not a PyTorch state dict"):
        load_inception(garbage)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="--inception-weights .*not a state dict of the FID Inception"):
        load_inception(wrong)


def test_reference_folder_reads_exact_values_and_fits_sizes(tmp_path):
    from PIL import Image

    pixels = (torch.arange(4 * 4 * 3) * 5 % 256).to(torch.uint8).reshape(4, 4, 3)
    Image.fromarray(pixels.numpy()).save(tmp_path / "a.png")
    Image.fromarray(pixels.numpy()).save(tmp_path / "b.PNG")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (12, 6), (255, 0, 0)).save(tmp_path / "sub" / "c.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    paths = list_images(tmp_path)
    assert [p.name for p in paths] == ["a.png", "b.PNG", "c.jpg"]
    batches = list(iter_image_batches(paths, size=(4, 4), batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 4, 4), (1, 3, 4, 4)]
    assert torch.equal((batches[0][0] * 255).round().to(torch.uint8), pixels.permute(2, 0, 1))
    assert float(batches[1][0, 0].mean()) > 0.9 and float(batches[1][0, 1:].mean()) < 0.1  # red, cropped
    with pytest.raises(ValueError, match="different sizes"):
        list(iter_image_batches(paths, size=None, batch_size=3))
    with pytest.raises(ValueError, match="has no images"):
        list_images(_empty(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        list_images(tmp_path / "missing")


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def load_tool():
    spec = importlib.util.spec_from_file_location("evaluate_tool_fid", ROOT / "tools" / "evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_tool_fid_without_weights_fails_before_any_solve(tmp_path):
    tool = load_tool()
    with mock.patch("consolver.config.load_config", side_effect=AssertionError("got past the weights check")):
        with pytest.raises(InceptionWeightsError, match="--inception-weights"):
            tool.main(["--fid", "--config", str(CONFIG), "--out", str(tmp_path)])
        with pytest.raises(InceptionWeightsError, match="--inception-weights .*no such file"):
            tool.main(["--inception-weights", str(tmp_path / "none.pth"), "--config", str(CONFIG)])


# ---------------------------------------------------------------- a real (randomly initialised) Inception


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    return save_random_inception(tmp_path_factory.mktemp("inception") / "random_inception.pth")


@pytest.mark.slow
def test_importing_and_loading_never_downloads(random_weights):
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise RuntimeError('network access')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse\n"
        "import torch_fidelity, torchmetrics.image.fid, torchmetrics.image.kid\n"
        "import consolver.evaluation.fid as fid\n"
        "import torch.hub, torch_fidelity.feature_extractor_inceptionv3 as tfi\n"
        "torch.hub.load_state_dict_from_url = tfi.load_state_dict_from_url = refuse\n"
        f"net = fid.InceptionFeatures({str(random_weights)!r}, batch_size=2)\n"
        "print(tuple(net(torch.rand(1, 3, 32, 32)).shape))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("(1, 2048)")


@pytest.mark.slow
def test_inception_fid_kid_zero_on_itself_and_monotone_in_noise(random_weights, one_thread):
    extractor = InceptionFeatures(random_weights, batch_size=4)
    assert extractor.net.training is False
    images = smooth_images(8)
    features = extractor(images[:2])
    assert features.shape == (2, 2048) and features.dtype == torch.float64 and bool(features.isfinite().all())
    assert float((features[0] - features[1]).abs().max()) > 1e-3  # random weights, yet informative features
    fid_kid = FidKid(extractor, kid_subsets=20, kid_subset_size=1000)
    fid_kid.add_reference("", images)
    scores = []
    for sigma in (0.0, 0.05, 0.15, 0.4):
        fid_kid.reset()
        fid_kid.update(perturb(images, sigma) if sigma else images)
        scores.append(fid_kid.compute())
    fids, kids = [s["fid"] for s in scores], [s["kid"] for s in scores]
    assert abs(fids[0]) < 1e-6 * fids[-1]
    assert fids[0] < fids[1] < fids[2] < fids[3], fids
    assert kids[0] < kids[1] < kids[2] < kids[3], kids
    assert abs(kids[0]) < 0.1 * kids[3]


@pytest.mark.slow
def test_tool_writes_fid_and_kid_columns_on_the_toy_world(random_weights, tmp_path, one_thread):
    from PIL import Image

    from consolver.scheduler import ConsistencySolverScheduler
    from consolver.solvers.tables import ddim_table

    solver_dir = tmp_path / "run" / "scheduler"
    solver = ConsistencySolverScheduler(solver_order=4, timestep_spacing="trailing")
    solver.set_coefficient_tables({3: ddim_table(3, 4)})
    solver.save_pretrained(str(solver_dir))
    reference = tmp_path / "reference"
    reference.mkdir()
    for i, image in enumerate(smooth_images(4, size=48, seed=5)):  # another size: fitted to 32x32
        Image.fromarray((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(reference / f"{i}.png")
    out = tmp_path / "eval"
    result = load_tool().main([
        str(solver_dir), "--config", str(CONFIG), "--num-noises", "2", "--steps", "3", "--out", str(out),
        "--baselines", "ddim", "--no-progress", "--threads", "1", "reference.num_steps=10",
        "backend.toy.renders_per_prompt=8", "--inception-weights", str(random_weights), "--fid-reference",
        str(reference), "--fid-batch-size", "8"])
    rows = result["rows"]
    assert [(r["solver"], r["K"]) for r in rows] == [("ConsistencySolver", 3), ("DDIM", 3)]
    for row in rows:
        assert {"fid", "kid", "kid_se", "fid_ref", "kid_ref", "kid_ref_se"} <= set(row)
        assert row["fid"] > 0 and row["fid_ref"] > row["fid"]  # previews are nearer their own targets
    assert rows[0]["fid"] == pytest.approx(rows[1]["fid"], rel=1e-9)  # a DDIM table is DDIM
    with open(out / "eval.csv", newline="") as f:
        header = next(csv.reader(f))
    assert {"fid", "kid", "kid_se", "fid_ref", "kid_ref"} <= set(header)
    md = (out / "eval.md").read_text()
    assert "FID/KID" in md and "| solver | K |" in md and " fid | kid |" in md
    assert "(8 images)" in md and "(4 images)" in md


def test_build_fid_kid_checks_weights_first(tmp_path):
    with pytest.raises(InceptionWeightsError, match="--inception-weights"):
        build_fid_kid(smooth_images(4), None, reference_dir=tmp_path)
