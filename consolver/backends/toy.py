"""The embedded toy backend: a closed-form text-to-image "diffusion model".

For a prompt the data distribution is a mixture of narrow Gaussians ``N(mu_k, c^2 I)``
around ``R`` jittered renders ``mu_k`` of its scene (see :mod:`consolver.backends.toy_scenes`).
The latent *is* the image, scaled to [-1, 1]: ``latent = 2 image - 1``, ``D = 3 H W``.
At noise level ``(a, s)`` (VP: ``a = sqrt(abar_t)``, ``s = sqrt(1 - abar_t)``; flow matching:
``a = 1 - sigma``, ``s = sigma``) the exact denoiser is

    x | k ~ N(a mu_k, v I),   v = a^2 c^2 + s^2
    w_k   = softmax_k( -||x - a mu_k||^2 / (2 v) )            (over the branch's components)
    mbar  = sum_k w_k mu_k
    E[x0|x] = (s^2 mbar + a c^2 x) / v
    eps   = (x - a E[x0|x]) / s = (s / v) (x - a mbar)       (VP output)
    vel   = eps - E[x0|x]                                     (flow-matching output)

``||x - a mu_k||^2 = ||x||^2 - 2a x.mu_k + a^2 ||mu_k||^2``; the ``||x||^2`` term is the same
for every ``k`` and cancels in the softmax, so the logits are one matmul ``x @ means.T``
(never a ``B x N x D`` temporary). Memory per call is ``O(B N + N D)``.

Classifier-free guidance: the unconditional model is the mixture over *all* components of
the configured prompt set (every prompt equally likely); the conditional one uses the
prompt's own ``R`` components. Both branches run as one doubled batch of mixture weights
``[2B, N]`` and one matmul with the means; since the outputs are affine in ``mbar`` with
the same coefficients, guidance combines the two means.

Prompts: :meth:`ToyBackend.prompts` lists the configured set by split; :meth:`encode`
accepts any valid prompt (one outside the configured set gets its own renders, but is not
part of the unconditional mixture).
"""

from __future__ import annotations

import logging
import zlib
from typing import Optional, Sequence

import torch
from tensordict import TensorDict

from consolver.backends import toy_scenes
from consolver.backends.base import Backend
from consolver.schedules import FlowMatchingSchedule, Schedule, VPSchedule

logger = logging.getLogger(__name__)

TOY_SCHEDULES = ("vp", "flow")
#: Colour palettes of the renders: ``inverted`` draws ``1 - image`` (other colours and
#: backgrounds, same geometry and depth labels): a transfer world (consolver.evaluation.transfer).
TOY_PALETTES = ("default", "inverted")
#: ``backend.toy`` keys added after shards were first fingerprinted, with their defaults: at the
#: default they are left out of the backend meta and the shard fingerprint, so older shards stay valid.
LATER_TOY_KEYS = {"prompt_offset": 0, "palette": "default"}


# ---------------------------------------------------------------- pure numerics

def component_logits(x: torch.Tensor, means: torch.Tensor, sq_norms: torch.Tensor, alpha: torch.Tensor,
                     var: torch.Tensor) -> torch.Tensor:
    """Mixture log-weights up to a per-row constant: ``(a x.mu_k - a^2 ||mu_k||^2 / 2) / v``.

    Args: ``x [B, D]``, ``means [N, D]``, ``sq_norms [N]`` (``||mu_k||^2``), ``alpha, var [B, 1]``.
    Returns: ``[B, N]`` in the dtype of ``x``.
    """
    return (alpha * (x @ means.T) - (0.5 * alpha * alpha) * sq_norms) / var


def conditional_weights(logits: torch.Tensor, prompt_index: torch.Tensor, renders: int) -> torch.Tensor:
    """Softmax of each row over its prompt's columns ``[p R, (p + 1) R)`` only, zero elsewhere.

    ``logits [B, N]``, ``prompt_index [B]`` long -> weights ``[B, N]`` (rows sum to 1).
    """
    cols = prompt_index[:, None] * renders + torch.arange(renders, device=logits.device)
    weights = torch.zeros_like(logits)
    return weights.scatter_(1, cols, torch.softmax(logits.gather(1, cols), dim=1))


def posterior_outputs(x: torch.Tensor, mbar: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                      c2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eps, E[x0|x])`` from the mixture mean ``mbar``; all ``[B, D]`` with ``alpha, sigma [B, 1]``.

    Uses ``eps = (s / v)(x - a mbar)``, which has no cancellation as ``s -> 0``.
    """
    var = alpha * alpha * c2 + sigma * sigma
    eps = (sigma / var) * (x - alpha * mbar)
    x0 = (sigma * sigma * mbar + (alpha * c2) * x) / var
    return eps, x0


def nearest_component(x: torch.Tensor, means: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Index ``[B]`` of the mean closest to each row of ``x [B, D]`` (``argmax x.mu - ||mu||^2/2``)."""
    return torch.argmax(x @ means.T - 0.5 * sq_norms, dim=1)


def prompt_seed(prompt: str, seed: int) -> int:
    """Stable 63-bit seed of a canonical prompt's renders (independent of the prompt set)."""
    return (zlib.crc32(prompt.encode("utf-8")) << 31 ^ int(seed) * 0x9E3779B1) & (2**63 - 1)


def configured_prompts(num_train_prompts: int, num_heldout_prompts: int,
                       prompts: Optional[Sequence[str]] = None, prompt_offset: int = 0) -> list[str]:
    """The configured prompt set in bank order: canonical, deduplicated ``prompts``, or else
    ``num_train_prompts`` train and ``num_heldout_prompts`` held-out prompts, each split's list
    starting after its first ``prompt_offset`` prompts (an offset at least the other set's counts
    gives a disjoint prompt family)."""
    if prompts is None:
        k = int(prompt_offset)
        if k < 0:
            raise ValueError(f"backend.toy.prompt_offset must be >= 0, got {k}")
        prompts = (toy_scenes.prompt_list("train", k + num_train_prompts)[k:]
                   + toy_scenes.prompt_list("heldout", k + num_heldout_prompts)[k:])
    return list(dict.fromkeys(toy_scenes.canonical_prompt(p) for p in prompts))


# ---------------------------------------------------------------- the backend

class ToyBackend(Backend):
    """Closed-form mixture-of-Gaussians denoiser over procedural scenes.

    Args:
        resolution: image side ``H = W`` (32 default; 64 works).
        renders_per_prompt: mixture components ``R`` per prompt.
        component_std: ``c``, each component's std in latent units ([-1, 1] scale).
        seed: render jitter seed (the prompt split does not depend on it).
        schedule: ``"vp"`` (epsilon, SD1.5 betas) or ``"flow"`` (velocity), or a schedule object.
        num_train_prompts, num_heldout_prompts: size of the configured prompt set, the first
            prompts of each split (:func:`toy_scenes.prompt_list`); ignored if ``prompts`` is given.
        prompts: an explicit configured prompt set instead.
        device: where the component bank and all outputs live.
        prompt_offset: skip the first ``prompt_offset`` prompts of each split (a disjoint family).
        palette: ``"default"`` or ``"inverted"`` (renders ``1 - image``), see ``TOY_PALETTES``.
    """

    name = "toy"
    palette = "default"  # subclasses (toy_edit) that do not take the option keep the default renders

    def __init__(self, resolution: int = 32, renders_per_prompt: int = 64, component_std: float = 0.05,
                 seed: int = 0, schedule: str | Schedule = "vp", num_train_prompts: int = 12,
                 num_heldout_prompts: int = 4, prompts: Optional[Sequence[str]] = None,
                 device: str | torch.device = "cpu", prompt_offset: int = 0, palette: str = "default"):
        if resolution < 8 or renders_per_prompt < 1 or component_std <= 0:
            raise ValueError(f"toy backend needs resolution >= 8, renders_per_prompt >= 1 and component_std > 0 "
                             f"(config backend.resolution, backend.toy.renders_per_prompt, backend.toy.component_std); "
                             f"got {resolution}, {renders_per_prompt}, {component_std}")
        if isinstance(schedule, str):
            if schedule not in TOY_SCHEDULES:
                raise ValueError(f"unknown toy schedule {schedule!r}; valid: {', '.join(TOY_SCHEDULES)}")
            schedule = VPSchedule.sd15() if schedule == "vp" else FlowMatchingSchedule()
        if palette not in TOY_PALETTES:
            raise ValueError(f"unknown toy palette {palette!r} (backend.toy.palette); valid: {', '.join(TOY_PALETTES)}")
        self.palette = palette
        self.schedule = schedule
        self.resolution = int(resolution)
        self.latent_shape = (3, self.resolution, self.resolution)
        self.renders_per_prompt = int(renders_per_prompt)
        self.component_std = float(component_std)
        self.seed = int(seed)
        self.device = torch.device(device)
        canonical = configured_prompts(num_train_prompts, num_heldout_prompts, prompts, prompt_offset)
        if not canonical:
            raise ValueError("the toy backend needs at least one prompt (config backend.toy.num_train_prompts "
                             "+ backend.toy.num_heldout_prompts >= 1)")
        self._prompts: list[str] = []
        self._index: dict[str, int] = {}
        self._means = torch.empty(0, 3 * self.resolution**2, device=self.device)
        self._cache: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self._add_prompts(canonical)
        self.num_configured = len(canonical)
        logger.info("toy backend: %d prompts x %d renders at %dx%d, %s schedule", self.num_configured,
                    self.renders_per_prompt, self.resolution, self.resolution, self.schedule.kind)

    @classmethod
    def from_config(cls, cfg) -> "ToyBackend":
        """From a :class:`~consolver.config.BackendConfig` (``cfg.toy`` holds the toy options)."""
        toy = cfg.toy
        device = "cpu" if cfg.device == "auto" else cfg.device  # closed form: the CPU is fast enough
        return cls(resolution=cfg.resolution, renders_per_prompt=toy.renders_per_prompt,
                   component_std=toy.component_std, seed=toy.seed, schedule=toy.schedule,
                   num_train_prompts=toy.num_train_prompts, num_heldout_prompts=toy.num_heldout_prompts,
                   device=device, prompt_offset=toy.prompt_offset, palette=toy.palette)

    @classmethod
    def config_meta(cls, cfg) -> dict:
        """Exactly :meth:`meta` of ``from_config(cfg)``, without rendering anything."""
        toy = cfg.toy
        if toy.schedule not in TOY_SCHEDULES:
            raise ValueError(f"unknown toy schedule {toy.schedule!r}; valid: {', '.join(TOY_SCHEDULES)}")
        r = int(cfg.resolution)
        return {"backend": cls.name, "schedule": toy.schedule,
                "prediction_type": "epsilon" if toy.schedule == "vp" else "flow_prediction",
                "resolution": r, "latent_shape": [3, r, r],
                "toy": _toy_meta(toy.renders_per_prompt, toy.component_std, toy.seed, toy.palette,
                                 configured_prompts(toy.num_train_prompts, toy.num_heldout_prompts, None,
                                                    toy.prompt_offset))}

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Parse every prompt (``ValueError`` naming the word and the vocabulary); renders nothing."""
        for prompt in prompts:
            toy_scenes.canonical_prompt(prompt)

    # ------------------------------------------------------------ prompts and components

    def prompts(self, split: Optional[str] = None) -> list[str]:
        """Canonical prompts of the configured set, in bank order; only ``split`` ("train" or
        "heldout") if given. Held-out prompts contain (color, shape) pairs no train prompt has."""
        configured = self._prompts[: self.num_configured]
        if split is None:
            return list(configured)
        toy_scenes._check_split(split)
        return [p for p in configured if toy_scenes.prompt_split(p) == split]

    @property
    def num_components(self) -> int:
        """Components in the bank (configured prompts first, then any encoded extras)."""
        return int(self._means.shape[0])

    def _add_prompts(self, canonical: Sequence[str]) -> None:
        R, new = self.renders_per_prompt, []
        for prompt in canonical:
            scene = toy_scenes.parse_prompt(prompt)
            generator = torch.Generator().manual_seed(prompt_seed(prompt, self.seed))
            image, _, _ = toy_scenes.render_scenes([scene] * R, self.resolution, generator)
            if self.palette == "inverted":
                image = 1 - image
            new.append(image.reshape(R, -1) * 2 - 1)
            self._index[prompt] = len(self._prompts)
            self._prompts.append(prompt)
        self._means = torch.cat([self._means, torch.cat(new).to(self.device)])
        self._cache.clear()

    def _bank(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(means [N, D], ||means||^2 [N])`` in ``dtype`` (cached)."""
        if dtype not in self._cache:
            means = self._means.to(dtype)
            self._cache[dtype] = (means, means.double().square().sum(1).to(dtype))
        return self._cache[dtype]

    def renders(self, prompt: str) -> torch.Tensor:
        """The mixture means of ``prompt`` as images ``[R, 3, H, W]`` in [0, 1]."""
        p = int(self.encode([prompt])["prompt_index"][0])
        R = self.renders_per_prompt
        return self.decode(self._means[p * R:(p + 1) * R].reshape(R, *self.latent_shape))

    def component_index(self, latents: torch.Tensor, prompt_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Bank index ``[B]`` (long) of the render nearest to each latent ``[B, 3, H, W]``.

        With ``prompt_index [B]`` the search is restricted to each sample's own prompt; without it,
        it runs over every component. Component ``k`` belongs to prompt ``k // renders_per_prompt``.
        """
        x = latents.reshape(latents.shape[0], -1).to(torch.promote_types(latents.dtype, torch.float32))
        means, sq_norms = self._bank(x.dtype)
        if prompt_index is None:
            return nearest_component(x, means, sq_norms)
        R = self.renders_per_prompt
        cols = prompt_index.to(self.device)[:, None] * R + torch.arange(R, device=self.device)
        scores = (x @ means.T - 0.5 * sq_norms).gather(1, cols)
        return cols.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)

    # ------------------------------------------------------------ Backend protocol

    def encode(self, prompts: Sequence[str], ref_images: Optional[torch.Tensor] = None) -> TensorDict:
        """``TensorDict(prompt_index=[B] long, batch_size=[B])``. Raises ``ValueError`` on an unknown
        word (listing the vocabulary) or reference images (the toy is text-to-image only)."""
        if ref_images is not None:
            raise ValueError("the toy backend is text-to-image; it takes no reference images")
        if isinstance(prompts, str):
            prompts = [prompts]
        canonical = [toy_scenes.canonical_prompt(p) for p in prompts]
        extra = [p for p in dict.fromkeys(canonical) if p not in self._index]
        if extra:
            logger.info("toy backend: rendering %d prompt(s) outside the configured set", len(extra))
            self._add_prompts(extra)
        index = torch.tensor([self._index[p] for p in canonical], dtype=torch.long, device=self.device)
        return TensorDict({"prompt_index": index}, batch_size=[len(canonical)], device=self.device)

    def alpha_sigma(self, t, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, s)`` float64 ``[batch]`` on the CPU from timesteps in scheduler units (VP: integer
        timestep in ``[0, T)``; flow: ``sigma * num_train_timesteps``, sigma in [0, 1]).
        Differentiable in ``t`` when it requires grad (learned step grids): VP values stay the
        schedule's own, with the gradient of its continuous interpolation."""
        t_grad = torch.as_tensor(t).to("cpu", torch.float64).reshape(-1)
        if t_grad.numel() == 1:
            t_grad = t_grad.expand(batch)
        t = t_grad.detach()
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or [B={batch}], got shape {tuple(t.shape)}")
        T = self.schedule.num_train_timesteps
        if isinstance(self.schedule, VPSchedule):
            if bool(((t < 0) | (t > T - 1) | (t != t.round())).any()):
                raise ValueError(f"VP timesteps must be integers in [0, {T - 1}], got {t.tolist()}")
            a, s = self.schedule.alpha_sigma(t.long())
            if t_grad.requires_grad:  # straight through: exact values, the interpolation's slope
                a_c, s_c = self.schedule.alpha_sigma_continuous(t_grad)
                a, s = a + (a_c - a_c.detach()), s + (s_c - s_c.detach())
            return a, s
        if bool(((t < 0) | (t > T)).any()):
            raise ValueError(f"flow-matching timesteps must be sigma * {T} in [0, {T}], got {t.tolist()}")
        return self.schedule.alpha_sigma(t_grad / T)

    def predict(self, x: torch.Tensor, t, cond: TensorDict, guidance: float) -> torch.Tensor:
        """Exact eps (VP) or velocity (flow) for ``x [B, 3, H, W]`` at timesteps ``t`` (scalar or
        ``[B]``), guided with scale ``guidance``; returned in ``x``'s dtype, computed in it but at
        least in float32 (the logits reach ~1e6 near the data: float16 would overflow)."""
        B = x.shape[0]
        prompt_index = cond["prompt_index"].to(self.device)
        if prompt_index.shape != (B,):
            raise ValueError(f"cond has batch {tuple(prompt_index.shape)} but x has batch {B}")
        dtype = torch.promote_types(x.dtype, torch.float32)
        flat = x.reshape(B, -1).to(dtype)
        a64, s64 = self.alpha_sigma(t, B)
        alpha, sigma = a64.to(self.device, dtype)[:, None], s64.to(self.device, dtype)[:, None]
        c2 = self.component_std**2
        var = ((a64 * a64 * c2 + s64 * s64).to(self.device, dtype))[:, None]
        means, sq_norms = self._bank(dtype)
        logits = component_logits(flat, means, sq_norms, alpha, var)
        weights = conditional_weights(logits, prompt_index, self.renders_per_prompt)
        if guidance != 1.0:
            n = self.num_configured * self.renders_per_prompt
            unconditional = torch.zeros_like(logits)
            unconditional[:, :n] = torch.softmax(logits[:, :n], dim=1)
            weights = torch.cat([unconditional, weights])  # the doubled batch [2B, N]
        mbar = weights @ means
        if guidance != 1.0:
            mbar = mbar[:B] + guidance * (mbar[B:] - mbar[:B])
        eps, x0 = posterior_outputs(flat, mbar, alpha, sigma, c2)
        out = eps if isinstance(self.schedule, VPSchedule) else eps - x0
        return out.reshape(x.shape).to(x.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1]: ``(latents + 1) / 2``, clamped."""
        return ((latents + 1) * 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents ``2 image - 1`` from images ``[B, 3, H, W]`` in [0, 1] (inverse of decode)."""
        return images * 2 - 1

    def meta(self) -> dict:
        """Protocol meta plus ``"toy"``: the mixture's parameters and configured prompts (which
        define the unconditional model), named as the config section ``backend.toy``."""
        toy = _toy_meta(self.renders_per_prompt, self.component_std, self.seed, self.palette, self.prompts())
        return {**super().meta(), "toy": toy}


def _toy_meta(renders_per_prompt: int, component_std: float, seed: int, palette: str, prompts: list) -> dict:
    """The ``"toy"`` part of the backend meta (the palette only when not the default, so metas of
    default worlds, and the shard fingerprints made from them, stay as they were)."""
    meta = {"renders_per_prompt": int(renders_per_prompt), "component_std": float(component_std), "seed": int(seed)}
    if palette != LATER_TOY_KEYS["palette"]:
        meta["palette"] = palette
    return {**meta, "prompts": list(prompts)}


__all__ = ["LATER_TOY_KEYS", "TOY_PALETTES", "TOY_SCHEDULES", "ToyBackend", "component_logits", "conditional_weights", "configured_prompts",
           "nearest_component", "posterior_outputs", "prompt_seed"]
