"""FID and KID of preview sets against fixed image sets (the full-step targets, a reference folder).

Features are the 2048-d pool features of the standard FID Inception: torchmetrics'
``NoTrainInceptionV3`` (torch-fidelity's ``inception-v3-compat``, the TensorFlow "2015-12-05" graph
ported to PyTorch). Its weights load **only from a local file** the caller names; nothing is
downloaded. The file is torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (a plain
``torch.save`` state dict; pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` names the same
hash): see :data:`STANDARD_WEIGHTS_URL`. A file with another sha256 is used with a warning.

FID and KID are torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` fed with
features extracted once per image (a pass-through feature module), with two exact shortcuts in
``compute`` so that evaluating many (solver, K) pairs stays cheap on a CPU:

- FID's trace term ``tr sqrt(S_r S_f)`` is ``sum sqrt(eig(L^T S_f L))`` with ``S_r = L L^T`` (``L``
  is ``d x rank(S_r)`` and cached while the reference is unchanged), instead of a general
  eigen-decomposition of the ``d x d`` product each time;
- KID's polynomial kernels are computed once over all samples when that is cheaper than per subset,
  and each subset indexes them (same subsets, same numbers as torchmetrics' ``compute``).

KID's subset size adapts to small sample counts (``min(kid_subset_size, n_reference, n_previews)``)
and its subsets are drawn from a fixed seed without touching the global RNG.

    fid_kid = FidKid(InceptionFeatures("weights-inception-2015-12-05-6726825d.pth", batch_size=64))
    fid_kid.add_reference("", eval_set.target_image)            # -> fid, kid, kid_se
    fid_kid.add_reference("_ref", iter_image_batches(list_images(DIR), (32, 32), 64))  # -> fid_ref, ...
    fid_kid.reset(); fid_kid.update(previews); fid_kid.compute()
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Where the standard FID Inception weights come from (download once on a machine with network).
STANDARD_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                        "weights-inception-2015-12-05-6726825d.pth")
#: First hex digits of the standard weights file's sha256 (torch hub's file-name convention).
STANDARD_WEIGHTS_SHA256_PREFIX = "6726825d"
#: The command-line flag named in errors about missing weights.
WEIGHTS_FLAG = "--inception-weights"
NUM_FEATURES = 2048
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class InceptionWeightsError(FileNotFoundError):
    """No usable local FID Inception weights file (the message says which flag to set)."""


def _weights_help() -> str:
    return (f"pass {WEIGHTS_FLAG} PATH, a local copy of torch-fidelity's FID Inception state dict "
            f"weights-inception-2015-12-05-6726825d.pth (download it once where there is network: "
            f"{STANDARD_WEIGHTS_URL}); nothing is downloaded here")


def check_weights_path(weights_path: Optional[Union[str, Path]]) -> Path:
    """``weights_path`` as a ``Path`` if it is a file, else :class:`InceptionWeightsError` naming
    ``--inception-weights`` (cheap: for failing before any solve)."""
    if weights_path is None:
        raise InceptionWeightsError("FID/KID need the Inception weights as a local file: " + _weights_help())
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise InceptionWeightsError(f"{WEIGHTS_FLAG} {str(path)!r}: no such file; " + _weights_help())
    return path


def load_inception(weights_path: Optional[Union[str, Path]], antialias: bool = False) -> nn.Module:
    """torchmetrics' ``NoTrainInceptionV3`` (2048-d pool features) with weights from a local file.

    Args:
        weights_path: a ``torch.save`` state dict of torch-fidelity's ``FeatureExtractorInceptionV3``
            (``None``: :class:`InceptionWeightsError` naming ``--inception-weights``).
        antialias: resize to 299x299 with torch's antialiased bilinear (torchmetrics' default) instead
            of torch-fidelity's TF1-compatible bilinear, which matches the original TF FID code and
            published numbers (default).

    Raises:
        InceptionWeightsError: no path, or no file there.
        ValueError: the file is not a plain state dict of this architecture.
    """
    path = check_weights_path(weights_path)
    try:  # safe load first: a file that is not plain tensors stops here (torch-fidelity unpickles freely)
        torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is the same user error
        raise ValueError(f"{WEIGHTS_FLAG} {str(path)!r} is not a PyTorch state dict ({err.__class__.__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); " + _weights_help()) from None
    from torchmetrics.image.fid import NoTrainInceptionV3

    kwargs = {"antialias": antialias} if "antialias" in inspect.signature(NoTrainInceptionV3).parameters else {}
    if antialias and not kwargs:
        raise ValueError("this torchmetrics has no antialiased Inception resize; upgrade torchmetrics")
    try:  # without `antialias` (older torchmetrics) the resize is torch-fidelity's, i.e. antialias=False
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(NUM_FEATURES)],
                                 feature_extractor_weights_path=str(path), **kwargs)
    except (RuntimeError, KeyError) as err:  # load_state_dict: missing/unexpected keys, wrong shapes
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ValueError(f"{WEIGHTS_FLAG} {str(path)!r} is not a state dict of the FID Inception "
                         f"({' '.join(lines)[:300]}); " + _weights_help()) from None
    digest = _sha256(path)
    if not digest.startswith(STANDARD_WEIGHTS_SHA256_PREFIX):
        logger.warning("Inception weights %s (sha256 %s...) are not the standard FID weights (%s...): FID/KID "
                       "will not compare with published numbers", path, digest[:8], STANDARD_WEIGHTS_SHA256_PREFIX)
    logger.info("FID Inception loaded from %s (sha256 %s...)", path, digest[:8])
    return net


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` float in [0, 1] -> uint8 in [0, 255] (rounded, as PNG writers do); uint8 as is."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


class InceptionFeatures(nn.Module):
    """Images -> FID Inception pool features, in chunks of ``batch_size``.

    ``forward(images [B, 3, H, W] float in [0, 1] or uint8) -> [B, 2048] float64`` on ``device``; any
    H x W (resized to 299 x 299 inside). Frozen, eval mode, no autograd.
    """

    num_features = NUM_FEATURES

    def __init__(self, weights_path: Optional[Union[str, Path]], batch_size: int = 64,
                 device: Union[str, torch.device] = "cpu", antialias: bool = False):
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"Inception batch size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.weights_path = None if weights_path is None else str(weights_path)
        self.net = load_inception(weights_path, antialias=antialias).to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[0] == 0:
            return torch.zeros(0, self.num_features, dtype=torch.float64, device=self.device)
        return torch.cat([self.net(to_uint8(images[i:i + self.batch_size]).to(self.device)).double()
                          for i in range(0, images.shape[0], self.batch_size)])


class _Precomputed(nn.Module):
    """The metrics' "feature extractor" for features already extracted: ``[N, d] -> [N, d]``."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor,
                     factor1: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)`` for PSD ``S1, S2 [d, d]`` (float64).

    The trace term is ``sum sqrt(eig(L^T S2 L))`` with ``S1 = L L^T`` (``factor1``, from
    :func:`psd_factor` of ``S1`` when not given): exact, symmetric, and ``rank(S1)``-sized.
    """
    L = psd_factor(sigma1) if factor1 is None else factor1
    inner = L.T @ sigma2 @ L
    root_trace = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root_trace


def psd_factor(sigma: torch.Tensor) -> torch.Tensor:
    """``L [d, r]`` with ``L L^T = sigma`` over the eigenvalues above round-off (``r = rank``)."""
    values, vectors = torch.linalg.eigh((sigma + sigma.T) / 2)
    keep = values > values.abs().max().clamp_min(1e-300) * sigma.shape[0] * torch.finfo(sigma.dtype).eps
    return vectors[:, keep] * values[keep].sqrt()


def _fid_class():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class FID(FrechetInceptionDistance):
        """torchmetrics' FID on precomputed features; the reference's covariance factor is cached."""

        def __init__(self, num_features: int):
            super().__init__(feature=_Precomputed(num_features), reset_real_features=False)
            self._real_factor: Optional[torch.Tensor] = None

        def update(self, imgs: torch.Tensor, real: bool) -> None:
            if real:
                self._real_factor = None
            super().update(imgs, real)

        def compute(self) -> torch.Tensor:
            n_real, n_fake = int(self.real_features_num_samples), int(self.fake_features_num_samples)
            if n_real < 2 or n_fake < 2:
                raise ValueError(f"FID needs >= 2 images on each side, got {n_real} reference and {n_fake}")
            mean_real, cov_real = _mean_cov(self.real_features_sum, self.real_features_cov_sum, n_real)
            mean_fake, cov_fake = _mean_cov(self.fake_features_sum, self.fake_features_cov_sum, n_fake)
            if self._real_factor is None:
                self._real_factor = psd_factor(cov_real)
            return frechet_distance(mean_real, cov_real, mean_fake, cov_fake, self._real_factor)

    return FID


def _mean_cov(total: torch.Tensor, cov_sum: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    mean = total / n
    return mean, (cov_sum - n * torch.outer(mean, mean)) / (n - 1)


def _kid_class():
    from torchmetrics.image.kid import KernelInceptionDistance, maximum_mean_discrepancy, poly_kernel
    from torchmetrics.utilities.data import dim_zero_cat

    class KID(KernelInceptionDistance):
        """torchmetrics' KID on precomputed features; ``subset_size`` capped at the sample counts,
        subsets drawn from ``seed`` (the global RNG is left alone), kernels computed once when cheaper."""

        def __init__(self, num_features: int, subsets: int, subset_size: int, seed: int):
            with warnings.catch_warnings():  # "will save all extracted features": that is the point
                warnings.simplefilter("ignore", UserWarning)
                super().__init__(feature=_Precomputed(num_features), subsets=int(subsets),
                                 subset_size=int(subset_size), reset_real_features=False)
            self.seed = int(seed)
            self.used_subset_size: Optional[int] = None

        def compute(self) -> Tuple[torch.Tensor, torch.Tensor]:
            real, fake = dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features)
            m = min(self.subset_size, real.shape[0], fake.shape[0])
            if m < 2:
                raise ValueError(f"KID needs >= 2 images on each side, got {real.shape[0]} reference and "
                                 f"{fake.shape[0]}")
            self.used_subset_size = m
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                n_r, n_f = real.shape[0], fake.shape[0]
                if (n_r + n_f) ** 2 <= 3 * self.subsets * m * m and max(n_r, n_f) <= 4096:
                    k_rr = poly_kernel(real, real, self.degree, self.gamma, self.coef)
                    k_ff = poly_kernel(fake, fake, self.degree, self.gamma, self.coef)
                    k_rf = poly_kernel(real, fake, self.degree, self.gamma, self.coef)
                    scores = []
                    for _ in range(self.subsets):  # the same draws as KernelInceptionDistance.compute
                        r = torch.randperm(n_r)[:m].to(real.device)
                        f = torch.randperm(n_f)[:m].to(real.device)
                        scores.append(maximum_mean_discrepancy(k_rr[r][:, r], k_rf[r][:, f], k_ff[f][:, f]))
                    scores = torch.stack(scores)
                    return scores.mean(), scores.std(unbiased=False)
                requested, self.subset_size = self.subset_size, m
                try:
                    return super().compute()
                finally:
                    self.subset_size = requested

    return KID


def list_images(folder: Union[str, Path]) -> List[Path]:
    """Image files (``IMAGE_SUFFIXES``) under ``folder``, recursively, sorted; errors if none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"reference image folder {str(folder)!r} not found")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"reference image folder {str(folder)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def iter_image_batches(paths: Sequence[Union[str, Path]], size: Optional[Tuple[int, int]] = None,
                       batch_size: int = 64) -> Iterable[torch.Tensor]:
    """Batches ``[b, 3, H, W]`` float in [0, 1] (exact ``k / 255`` values) of the images at ``paths``.

    ``size = (H, W)``: an image of another size is center-cropped to that aspect ratio and resized
    (bicubic), so reference and previews reach the Inception at the same resolution; ``None`` keeps
    every image's own size (they must then all agree).
    """
    import numpy as np
    from PIL import Image, ImageOps

    resized = 0
    for start in range(0, len(paths), max(int(batch_size), 1)):
        arrays = []
        for path in paths[start:start + batch_size]:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if size is not None and image.size != (size[1], size[0]):
                    image = ImageOps.fit(image, (size[1], size[0]), Image.BICUBIC)
                    resized += 1
                arrays.append(np.asarray(image, dtype=np.uint8))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"reference images of different sizes {sorted(shapes)}: give a size to resize them to")
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)
    if resized:
        logger.info("%d of %d reference images center-cropped and resized to %dx%d", resized, len(paths), *size)


class FidKid:
    """FID and KID of one image set at a time against fixed reference sets, each image's features
    extracted once.

    ``add_reference(suffix, images)`` caches a reference's features; then, per preview set,
    ``reset()``, ``update(images)`` per batch, and ``compute()`` ->
    ``{"fid<suffix>": FID, "kid<suffix>": KID mean over subsets, "kid<suffix>_se": KID std over subsets}``
    for every reference (floats; lower is better; ``suffix=""`` gives ``fid``/``kid``).
    Images are ``[B, 3, H, W]`` float in [0, 1] (or uint8), any size.
    """

    def __init__(self, extractor: nn.Module, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0):
        if int(kid_subset_size) < 2 or int(kid_subsets) < 1:
            raise ValueError(f"KID needs subset_size >= 2 and subsets >= 1, got {kid_subset_size}, {kid_subsets}")
        self.extractor = extractor
        self.kid_subsets, self.kid_subset_size, self.seed = int(kid_subsets), int(kid_subset_size), int(seed)
        self._metrics: Dict[str, Tuple[nn.Module, nn.Module]] = {}
        self.reference_sizes: Dict[str, int] = {}
        self.num_images = 0

    @property
    def device(self) -> torch.device:
        return getattr(self.extractor, "device", torch.device("cpu"))

    def add_reference(self, suffix: str, images: Union[torch.Tensor, Iterable[torch.Tensor]]) -> int:
        """Extract and keep the features of a reference set (a tensor or an iterable of batches);
        returns its number of images."""
        if suffix in self._metrics:
            raise ValueError(f"reference {suffix!r} added twice")
        fid = _fid_class()(self.extractor.num_features).to(self.device)
        kid = _kid_class()(self.extractor.num_features, self.kid_subsets, self.kid_subset_size,
                           self.seed).to(self.device)
        n = 0
        for batch in ([images] if isinstance(images, torch.Tensor) else images):
            features = self.extractor(batch)
            fid.update(features, real=True)
            kid.update(features, real=True)
            n += features.shape[0]
        if n < 2:
            raise ValueError(f"reference {suffix or 'targets'!r} has {n} images; FID/KID need >= 2")
        self._metrics[suffix] = (fid, kid)
        self.reference_sizes[suffix] = n
        logger.info("FID/KID reference %r: %d images", suffix or "targets", n)
        return n

    def reset(self) -> None:
        """Forget the preview features (the references stay)."""
        for fid, kid in self._metrics.values():
            fid.reset()
            kid.reset()
        self.num_images = 0

    def update(self, images: torch.Tensor) -> None:
        """Add previews ``[B, 3, H, W]`` in [0, 1] (features extracted once for every reference)."""
        if not self._metrics:
            raise ValueError("FidKid has no reference set: add_reference first")
        features = self.extractor(images)
        for fid, kid in self._metrics.values():
            fid.update(features, real=False)
            kid.update(features, real=False)
        self.num_images += features.shape[0]

    def compute(self) -> Dict[str, float]:
        """``{fid<suffix>, kid<suffix>, kid<suffix>_se}`` of the previews since ``reset``."""
        out: Dict[str, float] = {}
        for suffix, (fid, kid) in self._metrics.items():
            out[f"fid{suffix}"] = float(fid.compute())
            mean, std = kid.compute()
            out[f"kid{suffix}"], out[f"kid{suffix}_se"] = float(mean), float(std)
        return out

    def describe(self) -> str:
        """One markdown line for a report header."""
        refs = ", ".join(f"`fid{s}`/`kid{s}` against {'the full-step targets' if not s else 'the reference set'} "
                         f"({n} images)" for s, n in self.reference_sizes.items())
        weights = getattr(self.extractor, "weights_path", None)
        return (f"- FID/KID (lower is better; Inception pool features{f' from `{weights}`' if weights else ''}): "
                f"{refs}; KID: {self.kid_subsets} subsets of min({self.kid_subset_size}, #images), "
                f"`kid_se` is their std")


def build_fid_kid(target_images: torch.Tensor, weights_path: Optional[Union[str, Path]],
                  reference_dir: Optional[Union[str, Path]] = None, batch_size: int = 64,
                  kid_subset_size: int = 1000, kid_subsets: int = 100, device: Union[str, torch.device] = "cpu",
                  seed: int = 0) -> FidKid:
    """A :class:`FidKid` against ``target_images [N, 3, H, W]`` in [0, 1] (suffix ``""``) and, when
    given, the images under ``reference_dir`` (suffix ``"_ref"``, fitted to H x W)."""
    extractor = InceptionFeatures(weights_path, batch_size=batch_size, device=device)
    fid_kid = FidKid(extractor, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)
    fid_kid.add_reference("", target_images)
    if reference_dir is not None:
        size = tuple(int(s) for s in target_images.shape[-2:])
        fid_kid.add_reference("_ref", iter_image_batches(list_images(reference_dir), size, batch_size))
    return fid_kid


__all__ = ["FidKid", "InceptionFeatures", "InceptionWeightsError", "STANDARD_WEIGHTS_URL", "WEIGHTS_FLAG",
           "build_fid_kid", "check_weights_path", "frechet_distance", "iter_image_batches", "list_images",
           "load_inception", "psd_factor", "to_uint8"]
