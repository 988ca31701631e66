"""The toy editing world (``backend.name: toy_edit``): FLUX.1-Kontext's code path in closed form.

A sample is a reference scene (an image) plus an instruction ("make the circle blue", "move the
square to the left", see :mod:`consolver.backends.toy_edits`). Its conditional distribution is a
mixture of ``R`` narrow Gaussians around jittered renders of the *edited* scene, drawn on the
reference's background, with the exact denoiser of :mod:`consolver.backends.toy`. What it shares
with the Kontext backend:

- a flow-matching schedule with FLUX.1-Kontext-dev's dynamic shift: ``mu`` from the packed image
  token count ``(H/2)(W/2)`` (the toy latent is the image in [-1, 1], packed 2x2 like FLUX
  latents) on FLUX's sigmas ``linspace(1, 1/K, K)`` (:meth:`Backend.timestep_kwargs`);
- reference conditioning: ``encode(instructions, ref_images)`` encodes each reference once (its
  packed tokens and the mixture it selects) into the cond TensorDict, and :meth:`predict`
  concatenates the reference tokens after the latent tokens and keeps the latent tokens' output;
- guidance as one batch: the guided output combines the conditional mixture with the
  unconditional one (every configured edit's components), as guidance distillation approximates.

The reference image is recognised as the nearest configured reference render (uint8 PNG round
trips are fine); an image that is none of them is an error. Reference PNGs for shards and
evaluation are written by :meth:`ToyEditBackend.prompt_records`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tensordict import TensorDict

from consolver.backends import toy_edits, toy_scenes
from consolver.backends.packing import pack, unpack
from consolver.backends.toy import ToyBackend, prompt_seed
from consolver.schedules import FlowMatchingSchedule

logger = logging.getLogger(__name__)

#: RMS distance (image units, [0, 1]) above which an image is not a reference of this world.
MAX_REFERENCE_RMS = 0.02


def kontext_schedule() -> FlowMatchingSchedule:
    """FLUX.1-Kontext-dev's scheduler config: shift 3, dynamic shifting on 256..4096 tokens, 0.5..1.15."""
    return FlowMatchingSchedule(1000, 3.0, True, 0.5, 1.15, 256, 4096)


def configured_edits(num_train: int, num_heldout: int) -> List[toy_edits.Edit]:
    return toy_edits.edit_list("train", num_train) + toy_edits.edit_list("heldout", num_heldout)


class ToyEditBackend(ToyBackend):
    """Closed-form instruction editing over procedural scenes.

    Args:
        resolution: image side (even; 32 default); ``image_seq_len = (resolution / 2)^2``.
        renders_per_prompt: ``R``, mixture components per edit.
        component_std, seed: as :class:`~consolver.backends.toy.ToyBackend`.
        num_train_edits, num_heldout_edits: the configured edits (config ``backend.toy.num_train_prompts``,
            ``backend.toy.num_heldout_prompts``), the first of each split of :func:`toy_edits.edit_list`.
        device: where the bank and outputs live.
    """

    name = "toy_edit"

    def __init__(self, resolution: int = 32, renders_per_prompt: int = 64, component_std: float = 0.05, seed: int = 0,
                 num_train_edits: int = 12, num_heldout_edits: int = 4, device: str | torch.device = "cpu"):
        if resolution < 8 or resolution % 2 or renders_per_prompt < 1 or component_std <= 0:
            raise ValueError(f"toy_edit needs an even backend.resolution >= 8, backend.toy.renders_per_prompt >= 1 and "
                             f"backend.toy.component_std > 0; got {resolution}, {renders_per_prompt}, {component_std}")
        self.schedule = kontext_schedule()
        self.resolution, self.renders_per_prompt = int(resolution), int(renders_per_prompt)
        self.latent_shape = (3, self.resolution, self.resolution)
        self.image_seq_len = (self.resolution // 2) ** 2
        self.component_std, self.seed, self.device = float(component_std), int(seed), torch.device(device)
        edits = configured_edits(num_train_edits, num_heldout_edits)
        if not edits:
            raise ValueError("toy_edit needs at least one edit (backend.toy.num_train_prompts + num_heldout_prompts >= 1)")
        self._prompts, self._index, self._cache = [], {}, {}
        self._means = torch.empty(0, 3 * self.resolution**2, device=self.device)
        self._refs = torch.empty(0, 3 * self.resolution**2)  # reference latents [E, D], CPU
        self._ref_scene: list = []  # per reference: (source scene, background [3] float64, edit key, instruction)
        self._splits: dict = {}
        for edit in edits:
            self._add_edit(edit.key, edit.source, edit.target, instruction=edit.instruction)
            self._splits[edit.key] = toy_edits.edit_split(edit)
        self.num_configured = len(edits)
        logger.info("toy_edit backend: %d edits x %d renders at %dx%d, flow schedule with mu=%.3f",
                    self.num_configured, self.renders_per_prompt, self.resolution, self.resolution, self.schedule_mu())

    @classmethod
    def from_config(cls, cfg) -> "ToyEditBackend":
        """From a :class:`~consolver.config.BackendConfig` (``cfg.toy`` holds the toy options)."""
        toy = cfg.toy
        if toy.schedule != "flow":
            raise ValueError(f"toy_edit runs FLUX.1-Kontext's flow-matching schedule: set backend.toy.schedule=flow "
                             f"(got {toy.schedule!r})")
        device = "cpu" if cfg.device == "auto" else cfg.device
        return cls(cfg.resolution, toy.renders_per_prompt, toy.component_std, toy.seed, toy.num_train_prompts,
                   toy.num_heldout_prompts, device)

    @classmethod
    def config_meta(cls, cfg) -> dict:
        """Exactly :meth:`meta` of ``from_config(cfg)``, without rendering anything."""
        toy, r = cfg.toy, int(cfg.resolution)
        keys = [e.key for e in configured_edits(toy.num_train_prompts, toy.num_heldout_prompts)]
        return {"backend": cls.name, "schedule": "flow", "prediction_type": "flow_prediction", "resolution": r,
                "latent_shape": [3, r, r],
                "toy": {"renders_per_prompt": int(toy.renders_per_prompt), "component_std": float(toy.component_std),
                        "seed": int(toy.seed), "prompts": keys}}

    # ------------------------------------------------------------ bank
    def _add_edit(self, key: str, source, target, ref: Optional[int] = None, instruction: str = "") -> None:
        """Render ``R`` components of ``target`` (and, without ``ref``, a new reference render of
        ``source``) for the bank entry ``key``."""
        R, res = self.renders_per_prompt, self.resolution
        generator = torch.Generator().manual_seed(prompt_seed(key, self.seed))
        if ref is None:
            params = toy_scenes.jittered_params([source], generator)
            image = toy_scenes.render(params, res)[0]
            self._refs = torch.cat([self._refs, image.reshape(1, -1) * 2 - 1])
            self._ref_scene.append((source, params.background[0], key, toy_edits.normalize(instruction)))
            ref = len(self._ref_scene) - 1
        background = self._ref_scene[ref][1]
        params = toy_scenes.jittered_params([target] * R, generator)
        params = params._replace(background=background.expand(R, 3).clone())
        image = toy_scenes.render(params, res)[0]
        self._means = torch.cat([self._means, (image.reshape(R, -1) * 2 - 1).to(self.device)])
        self._index[key] = len(self._prompts)
        self._prompts.append(key)
        self._cache.clear()

    def prompts(self, split: Optional[str] = None) -> List[str]:
        """Keys ``"<source prompt> | <instruction>"`` of the configured edits (of ``split`` if given)."""
        keys = self._prompts[: self.num_configured]
        if split is None:
            return list(keys)
        toy_scenes._check_split(split)
        return [k for k in keys if self._splits[k] == split]

    def reference_image(self, key: str) -> torch.Tensor:
        """The reference image ``[3, H, W]`` in [0, 1] of a configured edit."""
        ref = next(i for i, info in enumerate(self._ref_scene) if info[2] == key)
        return ((self._refs[ref].reshape(self.latent_shape) + 1) / 2).clamp(0, 1)

    def prompt_records(self, split: str, directory: str | Path) -> list:
        """``PromptRecord(instruction, reference PNG path)`` of the configured edits of ``split``,
        writing the reference PNGs into ``directory`` (named by a hash of what determines them)."""
        from consolver.data.prompts import PromptRecord

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        records = []
        for key in self.prompts(split):
            name = hashlib.sha1(f"{key}|{self.resolution}|{self.seed}".encode()).hexdigest()[:16]
            path = directory / f"ref-{name}.png"
            if not path.is_file():
                pixels = (self.reference_image(key).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                tmp = path.with_suffix(".tmp.png")
                Image.fromarray(pixels).save(tmp)
                tmp.replace(path)
            records.append(PromptRecord(key.split(" | ", 1)[1], str(path)))
        return records

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Parse every instruction's form and words (``ValueError`` listing the forms or the vocabulary)."""
        for text in prompts:
            toy_edits.parse_instruction(text)

    # ------------------------------------------------------------ Backend protocol
    def encode(self, prompts: Sequence[str], ref_images: Optional[torch.Tensor] = None) -> TensorDict:
        """``TensorDict(prompt_index [B] long, ref_tokens [B, (H/2)(W/2), 12])`` from instructions and
        reference images ``[B, 3, H, W]`` in [0, 1] (each recognised as a configured reference)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if ref_images is None:
            raise ValueError("toy_edit edits a reference image: pass ref_images (a prompt file needs "
                             "data.ref_image_column naming its column of image paths)")
        if ref_images.shape[0] != len(prompts) or tuple(ref_images.shape[1:]) != self.latent_shape:
            raise ValueError(f"need {len(prompts)} reference images of shape {self.latent_shape}, "
                             f"got {tuple(ref_images.shape)}")
        latents = ref_images.detach().to("cpu", torch.float32) * 2 - 1
        flat = latents.reshape(len(prompts), -1)
        d2 = flat.square().sum(1, keepdim=True) - 2 * flat @ self._refs.T + self._refs.square().sum(1)
        best = d2.argmin(1)
        rms = (d2.gather(1, best[:, None]).clamp(min=0).squeeze(1) / flat.shape[1]).sqrt() / 2
        index = []
        for b, (text, ref) in enumerate(zip(prompts, best.tolist())):
            if float(rms[b]) > MAX_REFERENCE_RMS:
                raise ValueError(f"reference image {b} is not a reference scene of the toy edit world "
                                 f"(RMS distance {float(rms[b]):.3f} to the nearest); use ToyEditBackend.prompt_records")
            source, _, ref_key, ref_instruction = self._ref_scene[ref]
            instruction = toy_edits.normalize(text)
            key = ref_key if instruction == ref_instruction else f"{ref_key} || {instruction}"
            if key not in self._index:
                logger.info("toy_edit backend: rendering the new edit %r", key)
                self._add_edit(key, source, toy_edits.apply_instruction(source, instruction), ref=ref)
            index.append(self._index[key])
        return TensorDict({"prompt_index": torch.tensor(index, dtype=torch.long, device=self.device),
                           "ref_tokens": pack(latents).to(self.device)}, batch_size=[len(prompts)], device=self.device)

    def predict(self, x: torch.Tensor, t, cond: TensorDict, guidance: float) -> torch.Tensor:
        """Exact guided velocity ``[B, 3, H, W]``. As Kontext's transformer, the model sees the latent
        tokens followed by the reference tokens and its output keeps the latent tokens; the closed
        form reads the reference through the mixture ``encode`` selected (``cond["prompt_index"]``)."""
        B, _, h, w = x.shape
        joint = torch.cat([pack(x), cond["ref_tokens"].to(x.dtype)], dim=1)
        latent = unpack(joint[:, : (h // 2) * (w // 2)], h, w)
        return super().predict(latent, t, cond, guidance)

    def renders(self, prompt: str) -> torch.Tensor:
        """The mixture means of the bank entry ``prompt`` (an edit key) as images ``[R, 3, H, W]``."""
        p, R = self._index[prompt], self.renders_per_prompt
        return self.decode(self._means[p * R:(p + 1) * R].reshape(R, *self.latent_shape))


__all__ = ["MAX_REFERENCE_RMS", "ToyEditBackend", "configured_edits", "kontext_schedule"]
