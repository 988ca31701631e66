"""The app's one model: config, backend, solver, reward scorer, output folder and request limits.

One :class:`PreviewService` per process serves every request: the backend (the diffusion model),
the solver and the reward network are built once, and a lock lets one solve run at a time (the
web page's queue limits concurrency too; the lock also covers calls from Python). Requests are
checked against :class:`Limits` before any solve and refused with :class:`AppError`, whose
message the page shows. Every file goes under the one output folder ``out``::

    out/base_solver/            the base solver, when no trained one is used (a scheduler directory)
    out/uploads/<sha1>.png      uploaded reference images (editing backends), named by content
    out/runs/<run id>/          one preview run: what tools/preview.py writes (manifest.json,
                                contact_sheet.png, previews/, preview_latents.npy; finals/ and
                                refine_sheet.png once refined), plus compare/<row>/ PNGs

Previews and finals are :func:`~consolver.preview.preview_run` and
:func:`~consolver.preview.refine_run` with the shared backend: bit for bit what
``tools/preview.py`` gives for the same prompt, seeds and K on the same machine, and the run
folder can be continued with ``tools/preview.py refine --manifest out/runs/<id>/manifest.json``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from consolver.config import EDITING_BACKENDS, TOY_BACKENDS, load_config
from consolver.preview.core import COMPARE_NAMES, LEARNED, Progress, format_seeds, load_solver, parse_seeds
from consolver.preview.workflow import check_writable, preview_run, refine_run, save_png, scorer

logger = logging.getLogger(__name__)

#: The solvers the page offers in "compare with" (the API accepts any ``COMPARE_NAMES`` key).
PAGE_COMPARE = ("ddim", "dpmsolver++")
BASE = "base"
TRAINED = "given"
MAIN_JOB = "main job"


class AppError(ValueError):
    """A request the app refuses (bad seeds, K, prompt, image); the message is shown in the page."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. K is limited separately, to the solver's trained K values."""

    max_seeds: int = 64
    max_prompt_chars: int = 300
    max_image_pixels: int = 4096 * 4096


@dataclass
class SolverChoice:
    """Which solver the app serves: ``path`` (a scheduler directory), ``source`` (``"given"``:
    ``--solver``; ``"main job"``: the default config's ``<output_dir>/scheduler``; ``"base"``:
    the untrained base solver, saved under the output folder) and a sentence for the page."""

    path: Path
    source: str
    description: str


@dataclass
class PreviewRun:
    """One preview request's results (paths only; the images are files in ``directory``).

    ``rows``: row name -> ``[N]`` PNG paths (the learned solver first, then each compared one);
    ``seconds``: row name -> wall time of that row's N previews (batched).
    """

    run_id: str
    directory: Path
    manifest_path: Path
    prompt: str
    ref_image: Optional[str]
    seeds: List[int]
    num_steps: int
    compare: List[str]
    rows: Dict[str, List[Path]]
    seconds: Dict[str, float]
    warnings: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seeds)

    def tile(self, index: int):
        """``(row name, seed)`` of gallery tile ``index`` (row-major over :attr:`rows`)."""
        names = list(self.rows)
        if not 0 <= index < len(names) * len(self.seeds):
            raise AppError(f"tile {index} does not exist: this run has {len(names) * len(self.seeds)} tiles")
        return names[index // len(self.seeds)], self.seeds[index % len(self.seeds)]


@dataclass
class RefineResult:
    """A refined seed: the clicked preview and its full-step final, the configured reward between
    them (``reward``: name -> value, the configured reward first, then ``pixel_psnr_dB``)."""

    run_id: str
    prompt: str
    seed: int
    row: str
    num_steps: int
    final_steps: int
    preview_png: Path
    final_png: Path
    manifest_path: Path
    reward: Dict[str, float]
    seconds: float


def allowed_num_steps(solver, cfg) -> List[int]:
    """The K values a request may ask for: the solver's learned tables, or (a solver with none,
    e.g. the base solver) the config's ``solver.num_steps``."""
    return sorted(getattr(solver, "available_num_steps", []) or [int(k) for k in cfg.solver.num_steps])


def choose_solver(solver: Optional[str], cfg, backend, out: Path) -> SolverChoice:
    """``--solver`` if given; else the main job's ``<output_dir>/scheduler`` if it exists; else the
    base solver (the config's ``solver.base_solver`` with no learned table), saved to ``out/base_solver``."""
    if solver:
        return SolverChoice(Path(solver), TRAINED, f"solver {solver}")
    main = Path(cfg.output_dir) / "scheduler"
    if (main / "scheduler_config.json").is_file():
        return SolverChoice(main, MAIN_JOB, f"the main job's solver {main}")
    from consolver.scheduler import solver_scheduler

    path = out / "base_solver"
    solver_scheduler(cfg, backend.schedule).save_pretrained(str(path))
    return SolverChoice(path, BASE, f"the base solver ({cfg.solver.base_solver}, untrained): no trained solver at "
                                    f"{main} (train one with python tools/fit.py, or pass --solver)")


def default_out(solver: Optional[str], cfg) -> Path:
    """The app's output folder: ``app/`` beside ``--solver``'s directory, else ``<output_dir>/app``."""
    return Path(solver).parent / "app" if solver else Path(cfg.output_dir) / "app"


def whole_number(value) -> Optional[int]:
    """``value`` as an int when it is a whole number (``8``, ``8.0``, ``"8"``), else ``None``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


class PreviewService:
    """The shared model behind every request (see the module docstring).

    Args:
        config: YAML config path; ``overrides``: ``key=value`` strings.
        solver: a trained scheduler directory, or ``None`` (see :func:`choose_solver`).
        out: the output folder (default :func:`default_out`).
        limits: per-request :class:`Limits`.
    """

    def __init__(self, config: str, overrides: Sequence[str] = (), solver: Optional[str] = None,
                 out: Optional[str] = None, limits: Limits = Limits()):
        from consolver.backends import build_backend
        from consolver.evaluation.core import check_schedule_match

        start = time.perf_counter()
        self.config, self.overrides, self.limits = str(Path(config).resolve()), list(overrides), limits
        self.cfg = load_config(config, self.overrides)
        self.out = check_writable(Path(out) if out else default_out(solver, self.cfg)).resolve()
        self.backend = build_backend(self.cfg.backend)
        self.choice = choose_solver(solver, self.cfg, self.backend, self.out)
        self.solver = load_solver(self.choice.path)
        check_schedule_match(str(self.choice.path), self.solver, self.backend, f"--config {config}")
        self.num_steps = allowed_num_steps(self.solver, self.cfg)
        self._score = None  # the reward network loads on the first refine, or in warm_up()
        self.editing = self.cfg.backend.name in EDITING_BACKENDS
        self.lock, self._score_lock = threading.Lock(), threading.Lock()
        self._counter = itertools.count()
        self.startup_seconds = time.perf_counter() - start
        logger.info("app model ready in %.2f s: %s backend, %s, K in %s, outputs in %s", self.startup_seconds,
                    self.cfg.backend.name, self.choice.description, format_seeds(self.num_steps), self.out)

    @property
    def score(self):
        """The configured reward of previews against finals (:func:`~consolver.preview.scorer`),
        built once, on first use."""
        with self._score_lock:
            if self._score is None:
                self._score = scorer(self.cfg, self.backend)
            return self._score

    def warm_up(self) -> None:
        """Load what the first refine needs (the reward network) ahead of it: the app calls this in
        the background once the page is served, so start-up does not wait for it."""
        self.score  # noqa: B018 - builds it

    # ---------------------------------------------------------------- what the page offers

    def prompt_choices(self) -> List[tuple]:
        """``[(label, value)]`` of the configured prompts (toy worlds: the held-out ones marked; a
        config's prompt file otherwise); ``[]`` when the backend has no list."""
        from consolver.preview.prompts import prompt_listing, toy_prompt_sets

        if self.cfg.backend.name in TOY_BACKENDS:
            sets = toy_prompt_sets(self.cfg)
            return [(p, p) for p in sets["train"]] + [(f"{p}  (held-out)", p) for p in sets["heldout"]]
        listing = prompt_listing(self.cfg)
        return [(p, p) for p in listing.get("prompts", [])[:500]]

    def reference_for(self, choice: str):
        """A toy_edit configured edit ``"<source> | <instruction>"`` -> ``(reference image [H, W, 3]
        uint8, instruction)``; ``None`` for anything else."""
        if self.cfg.backend.name != "toy_edit" or " | " not in str(choice):
            return None
        image = self.backend.reference_image(choice)
        return (image.permute(1, 2, 0).mul(255).round().byte().numpy(), choice.split(" | ", 1)[1])

    # ---------------------------------------------------------------- checks

    def check_prompt(self, prompt: str) -> str:
        prompt = " ".join(str(prompt or "").split())
        if not prompt:
            raise AppError("type a prompt" + (" (the edit instruction)" if self.editing else ""))
        if len(prompt) > self.limits.max_prompt_chars:
            raise AppError(f"the prompt has {len(prompt)} characters; at most {self.limits.max_prompt_chars}")
        check = getattr(self.backend, "check_prompts", None)
        if check is not None:
            try:
                check([prompt])
            except ValueError as err:
                raise AppError(str(err)) from None
        return prompt

    def check_seeds(self, count=None, seed_range: Optional[str] = None) -> List[int]:
        """A seed range (e.g. ``"100-115"``) if given, else seeds ``0 .. count-1``."""
        limit = self.limits.max_seeds
        if seed_range and str(seed_range).strip():
            try:
                seeds = parse_seeds(str(seed_range))
            except ValueError as err:
                raise AppError(str(err)) from None
            if len(seeds) > limit:
                raise AppError(f"seed range {seed_range!r} has {len(seeds)} seeds; at most {limit} per request")
            return seeds
        n = whole_number(count)
        if n is None or not 1 <= n <= limit:
            raise AppError(f"number of seeds must be a whole number from 1 to {limit}, got {count!r}; or give a "
                           f"seed range such as 100-115")
        return list(range(n))

    def check_num_steps(self, num_steps) -> int:
        K = whole_number(num_steps)
        if K is None or K not in self.num_steps:
            raise AppError(f"K={num_steps!r} is not available: the solver serves K in {', '.join(map(str, self.num_steps))}")
        return K

    def check_compare(self, compare: Optional[Sequence[str]]) -> List[str]:
        names = [str(c) for c in (compare or [])]
        bad = [c for c in names if c not in COMPARE_NAMES]
        if bad:
            raise AppError(f"unknown compare solver {bad[0]!r}; valid: {', '.join(COMPARE_NAMES)}")
        return list(dict.fromkeys(names))

    def save_upload(self, image) -> str:
        """An uploaded reference image (``[H, W, 3]`` uint8 array or PIL image) as a PNG in
        ``out/uploads``, named by its content's hash; returns the path."""
        import numpy as np
        from PIL import Image

        if image is None:
            raise AppError("upload a reference image: this backend edits an image")
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        if pil.width * pil.height > self.limits.max_image_pixels:
            raise AppError(f"the reference image has {pil.width}x{pil.height} pixels; at most "
                           f"{self.limits.max_image_pixels} pixels")
        pil = pil.convert("RGB")
        digest = hashlib.sha1(pil.tobytes() + repr(pil.size).encode()).hexdigest()[:16]
        path = check_writable(self.out / "uploads") / f"ref-{digest}.png"
        if not path.is_file():
            pil.save(path)
        return str(path)

    # ---------------------------------------------------------------- requests

    def preview(self, prompt: str, seeds: Sequence[int], num_steps: int, compare: Sequence[str] = (),
                ref_image: Optional[str] = None, progress: Optional[Progress] = None) -> PreviewRun:
        """Checked previews of ``seeds`` at K=``num_steps`` (plus ``compare`` rows) into a new run folder."""
        prompt, K, compare = self.check_prompt(prompt), self.check_num_steps(num_steps), self.check_compare(compare)
        if self.editing and not ref_image:
            raise AppError("upload a reference image: this backend edits an image")
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self._counter):04d}-{uuid.uuid4().hex[:6]}"
        directory = self.out / "runs" / run_id
        with self.lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            manifest = preview_run(self.config, str(self.choice.path), [prompt], list(seeds), K, str(directory),
                                   overrides=self.overrides, compare=compare, ref_image=ref_image, final=False,
                                   progress=progress, backend=self.backend, solver=self.solver, cfg=self.cfg)
        previews = manifest["previews"]
        rows = {LEARNED: [directory / e["preview"] for e in manifest["entries"]]}
        seconds = {LEARNED: previews.seconds}
        for name, images in previews.compare.items():  # tools/preview.py draws these only on the sheet
            rows[name] = [directory / "compare" / _slug(name) / f"p0_seed{s}.png" for s in previews.seeds]
            for image, path in zip(images, rows[name]):
                save_png(image, path)
            seconds[name] = previews.compare_seconds[name]
        notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        for note in notes:
            logger.warning("%s", note)
        return PreviewRun(run_id, directory, Path(manifest["manifest_path"]), prompt, ref_image, list(previews.seeds),
                          K, compare, rows, seconds, notes)

    def refine(self, run: PreviewRun, seed: int, row: str = LEARNED,
               progress: Optional[Progress] = None) -> RefineResult:
        """The full-step final of ``seed`` of ``run`` (the reference solve from the same noise), and the
        configured reward of row ``row``'s preview against it."""
        if seed not in run.seeds:
            raise AppError(f"seed {seed} is not in this preview run; it has seeds {format_seeds(run.seeds)}")
        if row not in run.rows:
            raise AppError(f"row {row!r} is not in this preview run; it has {', '.join(run.rows)}")
        with self.lock:
            result = refine_run(str(run.manifest_path), [int(seed)], progress=progress, backend=self.backend,
                                score=self.score, cfg=self.cfg)
            entry, finals = result["entries"][0], result["finals"]
            reward = dict(entry["reward"])
            preview_png = run.rows[row][run.seeds.index(seed)]
            if row != LEARNED:  # a compared solver's preview, read back from its PNG
                reward = {k: float(v[0]) for k, v in self.score(_load_png(preview_png), finals.images).items()}
        return RefineResult(run.run_id, run.prompt, int(seed), row, run.num_steps, finals.num_steps, preview_png,
                            run.directory / entry["final"], run.manifest_path, reward, finals.seconds)


def _load_png(path: Path) -> torch.Tensor:
    """``[1, 3, H, W]`` float in [0, 1] from an RGB PNG."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]
