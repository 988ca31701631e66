"""The preview-and-refine workflow on disk: a run folder with a contact sheet and a JSON manifest.

:func:`preview_run` writes into ``out``::

    manifest.json          prompt, seed, K, solver, config (+ overrides) and paths of every entry;
                           ``sheet_rows``: the sheet's rows in order (``kind`` preview | final)
    contact_sheet.png      the grid (one tile per seed; rows: the learned solver, then --compare,
                           then with ``final`` the full-step finals; preview tiles captioned
                           with their reward against the final)
    finals/pP_seedS.png    with ``final``: each final (+ ``.npy`` latents), as refine writes them
    previews/pP_seedS.png  each preview as its own PNG; preview_latents.npy [B, *latent_shape]

:func:`refine_run` reads the manifest, solves the finals of the chosen seeds with the reference
solver, writes ``finals/pP_seedS.png`` (+ ``.npy`` latents) and ``refine_sheet.png`` (preview |
final per seed, captioned with the configured reward between them), and records them in the
manifest. Paths in the manifest are relative to its folder; the config and solver paths are
absolute.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from consolver.config import TOY_BACKENDS, ConfigError, load_config
from consolver.data.format import to_uint8_hwc
from consolver.data.prompts import PromptRecord
from consolver.preview.core import (LEARNED, Progress, check_num_steps, consistency, format_seeds, load_solver,
                                    make_previews, refine)
from consolver.preview.prompts import warn_unconfigured
from consolver.preview.sheet import SheetBlock, draw_sheet, shorten

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MANIFEST = "manifest.json"


def check_writable(out: Path) -> Path:
    """Create ``out`` and prove it writable with a probe file; a one-line ``OSError`` otherwise."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(f"output path {str(out)!r} is not writable ({err.strerror or err})") from None
    return out


def default_out(solver_dir) -> Path:
    """The default preview folder of a solver: ``preview/`` beside its directory."""
    return Path(solver_dir).parent / "preview"


def default_final(cfg) -> bool:
    """Whether a preview run adds the full-step final row by default: on the toy backends only
    (there the reference solve costs milliseconds; on SD1.5/FLUX it costs a full solve per seed)."""
    return cfg.backend.name in TOY_BACKENDS


def scorer(cfg, backend) -> Callable[[torch.Tensor, torch.Tensor], Dict[str, torch.Tensor]]:
    """``score(previews, finals) -> {name: [B] float}`` for images ``[B, 3, H, W]`` in [0, 1]: the
    configured reward (``cfg.rewards``; each part and ``"reward"`` for a composite, see
    :func:`consistency`) of each preview against its final, then ``"pixel_psnr_dB"``. The first key
    is the configured reward (pixel PSNR when none is configured)."""
    reward, names = None, [r.name for r in cfg.rewards]
    if cfg.rewards:
        from consolver.rewards import build_rewards

        reward = build_rewards(cfg.rewards).to(backend.device)

    def score(previews: torch.Tensor, finals: torch.Tensor) -> Dict[str, torch.Tensor]:
        from consolver.rewards.pixel import psnr

        out = consistency(reward, previews, finals, names) if reward is not None else {}
        out["pixel_psnr_dB"] = psnr(previews, finals).float().cpu()
        return out

    return score


def _entry_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index}_seed{seed}"


def save_png(image: torch.Tensor, path: Path) -> None:
    """``image [3, H, W]`` in [0, 1] as an 8-bit RGB PNG at ``path`` (folders created)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8_hwc(image[None])[0]).save(path, compress_level=6)


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def preview_run(config: str, solver_dir: str, prompts: Sequence[str], seeds: Sequence[int], num_steps: int,
                out: Optional[str] = None, *, overrides: Sequence[str] = (), compare: Sequence[str] = (), ref_image: Optional[str] = None,
                columns: int = 8, batch_size: Optional[int] = None, refine_all: bool = False,
                final: Optional[bool] = None, progress: Optional[Progress] = None, backend=None,
                solver=None, cfg=None) -> Dict[str, Any]:
    """Previews of every (prompt, seed) at K=``num_steps``, a contact sheet and a manifest in ``out``.

    ``final`` adds a last row to the sheet: every seed's full-step final (the reference solve of
    :func:`refine`, written to ``finals/`` as refine writes it), and captions every preview tile
    with the configured reward against its final (as refine reports it), so the sheet shows which
    solver's previews are faithful. Default (``None``): on for the toy backends, where the
    reference solve is cheap, off elsewhere (see :func:`default_final`).

    ``out`` defaults to ``preview/`` beside the solver directory (``Path(solver_dir).parent /
    "preview"``, e.g. ``outputs/toy_depth/preview`` for ``outputs/toy_depth/scheduler``), so previews
    of different solvers never overwrite each other. Everything a user can get wrong is checked
    before any solve: the solver directory, its K table, the ``--compare`` names, the config and the
    output folder. ``refine_all`` also runs :func:`refine_run` on every seed (the slow path the
    workflow avoids), for timings and the refine sheet of every preview.
    ``backend``, ``solver`` and ``cfg`` (optional): instances already built from ``config`` (+
    ``overrides``) and loaded from ``solver_dir`` (a long-lived caller such as the app shares one of
    each across runs); by default each call loads and builds its own.
    Returns the manifest (with ``"manifest_path"``: its path, ``"layout"``: the sheet's
    :class:`~consolver.preview.sheet.SheetLayout`, and ``"previews"``: the
    :class:`~consolver.preview.core.Previews` tensors).
    """
    from consolver.backends import build_backend
    from consolver.preview.core import COMPARE_NAMES

    solver = load_solver(solver_dir) if solver is None else solver
    check_num_steps(solver, int(num_steps), f"solver {str(solver_dir)!r}")
    bad = [c for c in compare if c not in COMPARE_NAMES]
    if bad:
        raise ValueError(f"unknown --compare solver {bad[0]!r}; valid: {', '.join(COMPARE_NAMES)}")
    if not prompts:
        raise ValueError("no prompt given (--prompt or --prompts FILE)")
    cfg = load_config(config, list(overrides)) if cfg is None else cfg
    out = check_writable(Path(out) if out else default_out(solver_dir))
    backend = build_backend(cfg.backend) if backend is None else backend
    from consolver.evaluation.core import check_schedule_match

    check_schedule_match(str(solver_dir), solver, backend, f"--config {config}")
    check = getattr(backend, "check_prompts", None)
    if check is not None:
        check(list(prompts))
    warn_unconfigured(backend, list(prompts), config)
    previews = make_previews(cfg, solver, prompts, seeds, num_steps, backend=backend, compare=compare,
                             ref_image=ref_image, batch_size=batch_size, progress=progress)
    final = default_final(cfg) if final is None else bool(final)
    finals, scores = None, {}
    if final:  # every seed's final, and each row's reward against it
        finals = refine(cfg, previews.records, previews.seeds, backend=backend, batch_size=batch_size, progress=progress)
        score = scorer(cfg, backend)
        scores = {LEARNED: score(previews.images, finals.images)}
        scores.update({name: score(images, finals.images) for name, images in previews.compare.items()})
    n_seeds = len(seeds)
    entries = []
    for b, (record, seed) in enumerate(zip(previews.records, previews.seeds)):
        p = b // n_seeds
        rel = f"previews/{_entry_name(p, seed)}.png"
        save_png(previews.images[b], out / rel)
        entries.append({"prompt": record.text, "prompt_index": p, "seed": seed, "image": record.ref_image,
                        "row": b, "preview": rel})
        if finals is not None:
            stem = _entry_name(p, seed)
            save_png(finals.images[b], out / f"finals/{stem}.png")
            np.save(out / f"finals/{stem}.npy", finals.latents[b].numpy())
            entries[-1].update(final=f"finals/{stem}.png", final_latent=f"finals/{stem}.npy",
                               final_steps=finals.num_steps,
                               reward={k: float(v[b]) for k, v in scores[LEARNED].items()},
                               compare_reward={name: {k: float(v[b]) for k, v in row.items()}
                                               for name, row in scores.items() if name != LEARNED})
    np.save(out / "preview_latents.npy", previews.latents.numpy())
    K = int(num_steps)
    row_names = {LEARNED: f"{LEARNED}\nK={K} (learned)", **{name: f"{name}\nK={K}" for name in previews.compare}}
    all_images = {LEARNED: previews.images, **previews.compare}
    caption = next(iter(scores[LEARNED])) if finals is not None else None  # the configured reward's name
    final_row = f"final\n{finals.num_steps} steps" if finals is not None else None
    blocks = []
    for p, prompt in enumerate(prompts):
        rows = slice(p * n_seeds, (p + 1) * n_seeds)
        images = {row_names[name]: imgs[rows] for name, imgs in all_images.items()}
        captions = {}
        if finals is not None:
            images[final_row] = finals.images[rows]
            captions = {row_names[name]: [f"{caption} {float(v):.2f}" for v in scores[name][caption][rows]]
                        for name in all_images}
        blocks.append(SheetBlock(f'"{prompt}"', [f"seed {s}" for s in seeds], images, captions))
    title = (f"{len(previews)} previews at K={K} steps ({1e3 * previews.seconds / len(previews):.1f} ms each, "
             f"batched), seeds {format_seeds(seeds)} - solver: {solver_dir}")
    if finals is not None:
        title += f"; last row: the {finals.num_steps}-step {finals.solver} final, caption: {caption} vs the final"
    sheet, layout = draw_sheet(blocks, title, columns=columns)
    sheet.save(out / "contact_sheet.png")
    learned_row = row_names[LEARNED]
    for e in entries:  # where each preview sits on the sheet (a UI maps a click to a seed with it)
        e["tile"] = list(layout.row(learned_row, e["prompt_index"])[e["row"] % n_seeds].box)
        if finals is not None:
            e["final_tile"] = list(layout.row(final_row, e["prompt_index"])[e["row"] % n_seeds].box)
    timings = {"previews": len(previews), "preview_seconds": previews.seconds,
               "seconds_per_preview": previews.seconds / len(previews),
               "compare_seconds": previews.compare_seconds}
    if finals is not None:  # the final row is a refine of every seed: a measured refine-all time
        timings.update(final_row_seconds=finals.seconds, measured_refine_all_seconds=finals.seconds)
    manifest = {
        "version": MANIFEST_VERSION, "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": str(Path(config).resolve()), "overrides": list(overrides),
        "solver": str(Path(solver_dir).resolve()), "num_steps": K, "guidance": float(cfg.guidance),
        "reference": {"solver": cfg.reference.solver, "num_steps": int(cfg.reference.num_steps)},
        "prompts": list(prompts), "seeds": [int(s) for s in seeds], "image": ref_image,
        "compare": list(compare), "sheet": "contact_sheet.png", "latents": "preview_latents.npy",
        "sheet_rows": [{"name": row_names[name], "kind": "preview", "solver": name} for name in all_images]
        + ([{"name": final_row, "kind": "final", "solver": finals.solver, "num_steps": finals.num_steps,
             "caption": f"{caption} of each preview against this final"}] if finals is not None else []),
        "final": finals is not None,
        "noise": "make_noise([seed], latent_shape) (consolver.data.writer)",
        "timings": timings, "entries": entries,
    }
    path = out / MANIFEST
    _write_json(path, manifest)
    logger.debug("wrote %s and %s", out / "contact_sheet.png", path)
    if refine_all:
        result = refine_run(str(path), [int(s) for s in seeds], progress=progress, all_seeds=True, backend=backend,
                            cfg=cfg)
        manifest = result["manifest"]
    return dict(manifest, manifest_path=str(path), layout=layout, previews=previews)


def load_manifest(path: str) -> Dict[str, Any]:
    """The manifest at ``path`` (one-line errors for a missing or broken file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} not found; tools/preview.py writes <out>/{MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"manifest {str(path)!r} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION or "entries" not in manifest:
        raise ValueError(f"{str(path)!r} is not a preview manifest (version {MANIFEST_VERSION})")
    return manifest


def refine_run(manifest_path: str, seeds: Sequence[int], *, num_steps: Optional[int] = None,
               prompt_index: Optional[int] = None, exact: bool = False, columns: int = 8,
               progress: Optional[Progress] = None, all_seeds: bool = False, backend=None,
               score: Optional[Callable[[torch.Tensor, torch.Tensor], Dict[str, torch.Tensor]]] = None,
               cfg=None) -> Dict[str, Any]:
    """Finals of the chosen ``seeds`` (of every prompt, or of ``prompt_index``) of a preview run.

    Writes the finals and ``refine_sheet.png`` next to the manifest and records them in it.
    ``exact`` (off by default) solves in the make_shards batch shape: see :func:`~consolver.preview.core.refine`.
    Returns ``{"manifest", "entries" (the refined ones, with "reward"), "timings", "sheet"}``;
    ``timings`` holds the interaction-time comparison (see :func:`interaction_times`), and
    ``"finals"`` the :class:`~consolver.preview.core.Finals` tensors. ``backend``, ``score`` and
    ``cfg`` (optional): the manifest's config (+ overrides) loaded, a backend built from it and its
    :func:`scorer`, shared by a long-lived caller (the app); by default each call makes its own.
    """
    from consolver.backends import build_backend

    path = Path(manifest_path)
    manifest = load_manifest(str(path))
    out = check_writable(path.parent)
    have = sorted({e["seed"] for e in manifest["entries"]})
    missing = [s for s in seeds if s not in have]
    if missing:
        raise ValueError(f"seed(s) {format_seeds(missing)} are not in {str(path)!r}; it has seeds {format_seeds(have)}")
    n_prompts = len(manifest["prompts"])
    if prompt_index is not None and not 0 <= prompt_index < n_prompts:
        raise ValueError(f"--prompt-index {prompt_index}: the manifest has prompts 0..{n_prompts - 1}")
    chosen = [e for e in manifest["entries"] if e["seed"] in set(seeds)
              and (prompt_index is None or e["prompt_index"] == prompt_index)]
    order = {s: i for i, s in enumerate(seeds)}
    chosen.sort(key=lambda e: (e["prompt_index"], order[e["seed"]]))
    if cfg is None:
        try:
            cfg = load_config(manifest["config"], manifest.get("overrides", []))
        except ConfigError as err:
            raise ConfigError(f"the manifest's config: {err}") from None
    backend = build_backend(cfg.backend) if backend is None else backend
    records = [PromptRecord(e["prompt"], e.get("image")) for e in chosen]
    finals = refine(cfg, records, [e["seed"] for e in chosen], num_steps=num_steps, backend=backend, exact=exact,
                    progress=progress)
    latents = torch.from_numpy(np.load(path.parent / manifest["latents"]))
    preview_images = backend.decode(latents[[e["row"] for e in chosen]].to(backend.device)).float().cpu()
    scores = (score or scorer(cfg, backend))(preview_images, finals.images)
    for b, e in enumerate(chosen):
        stem = _entry_name(e["prompt_index"], e["seed"])
        save_png(finals.images[b], out / f"finals/{stem}.png")
        np.save(out / f"finals/{stem}.npy", finals.latents[b].numpy())
        e.update(final=f"finals/{stem}.png", final_latent=f"finals/{stem}.npy", final_steps=finals.num_steps,
                 reward={k: float(v[b]) for k, v in scores.items()})
    timings = interaction_times(manifest, finals)
    K = manifest["num_steps"]
    first = next(iter(scores))
    preview_col, final_col = f"preview K={K}", f"final {finals.num_steps} steps"
    blocks = []
    for p in sorted({e["prompt_index"] for e in chosen}):  # side by side: one row per seed, preview | final
        idx = [b for b, e in enumerate(chosen) if e["prompt_index"] == p]
        labels = [f"seed {chosen[b]['seed']}" for b in idx]
        captions = [f"{first} {float(scores[first][b]):.2f}" for b in idx]
        if len(idx) <= 4:
            rows = {label: torch.stack([preview_images[b], finals.images[b]]) for label, b in zip(labels, idx)}
            block = SheetBlock(f'"{manifest["prompts"][p]}"', [preview_col, final_col], rows,
                               {label: ["", c] for label, c in zip(labels, captions)})
        else:  # many seeds: a column per seed, the preview above its final
            rows = {preview_col.replace(" ", "\n"): preview_images[idx], final_col.replace(" ", "\n", 1): finals.images[idx]}
            block = SheetBlock(f'"{manifest["prompts"][p]}"', labels, rows, {list(rows)[1]: captions})
        blocks.append(block)
    title = f"Preview | final ({finals.num_steps}-step {finals.solver}); caption: {first}, preview vs final"
    sheet_name = "refine_all_sheet.png" if all_seeds else "refine_sheet.png"
    sheet, _ = draw_sheet(blocks, title, columns=columns)
    sheet.save(out / sheet_name)
    manifest["timings"].update({("refine_all" if all_seeds else "refine"): timings})
    if all_seeds:
        manifest["timings"]["measured_refine_all_seconds"] = finals.seconds
    manifest["refine_sheet" if not all_seeds else "refine_all_sheet"] = sheet_name
    _write_json(path, manifest)
    logger.debug("wrote %d finals and %s", len(chosen), out / sheet_name)
    return {"manifest": manifest, "entries": chosen, "timings": timings, "sheet": str(out / sheet_name),
            "reward_names": list(scores), "finals": finals}


def interaction_times(manifest: Dict[str, Any], finals) -> Dict[str, Any]:
    """The paper's interaction-time argument as numbers, for N previewed entries of which n were refined.

    ``preview_and_refine_s`` = previews of all N + this refine of the n chosen finals (measured);
    ``refine_all_s`` = all N finals
    (measured when ``preview --refine-all`` ran, else estimated from this refine: an exact refine
    runs fixed-shape solves of ``chunk`` rows, so N finals cost ``ceil(N / chunk)`` of them; a
    non-exact one is scaled linearly). NFE counts model evaluations per image.
    """
    t = manifest["timings"]
    N, n = int(t["previews"]), len(finals)
    per_solve = finals.seconds / finals.num_chunks
    measured = t.get("measured_refine_all_seconds")
    if measured is not None:
        all_s, how = float(measured), "measured"
    elif finals.exact:
        all_s, how = per_solve * -(-N // finals.chunk), f"estimated: {-(-N // finals.chunk)} solve(s) of {finals.chunk} rows"
    else:
        all_s, how = finals.seconds / n * N, "estimated: N x time per final, an upper bound (batching is cheaper)"
    K, S = int(manifest["num_steps"]), finals.num_steps
    return {"N": N, "refined": n, "K": K, "final_steps": S, "exact": finals.exact, "chunk": finals.chunk,
            "preview_seconds": t["preview_seconds"], "seconds_per_preview": t["seconds_per_preview"],
            "refine_seconds": finals.seconds, "seconds_per_final": finals.seconds / n,
            "preview_and_refine_s": t["preview_seconds"] + finals.seconds, "refine_all_s": all_s,
            "refine_all_how": how, "nfe_preview_and_refine": N * K + n * S, "nfe_refine_all": N * S}


def report_lines(result: Dict[str, Any]) -> List[str]:
    """Human-readable lines of a :func:`refine_run` result: timings and the per-seed reward."""
    t = result["timings"]
    lines = [
        f"previews: {t['N']} at K={t['K']} in {t['preview_seconds']:.3f} s ({1e3 * t['seconds_per_preview']:.1f} ms per preview, batched)",
        f"finals:   {t['refined']} at {t['final_steps']} steps in {t['refine_seconds']:.3f} s "
        f"({1e3 * t['seconds_per_final']:.1f} ms per final{', exact: solves of ' + str(t['chunk']) + ' rows' if t['exact'] else ''})",
        f"preview {t['N']} + refine {t['refined']}: {t['preview_and_refine_s']:.3f} s ({t['nfe_preview_and_refine']} NFE)  vs  "
        f"refine all {t['N']}: {t['refine_all_s']:.3f} s ({t['nfe_refine_all']} NFE; {t['refine_all_how']})  -> "
        f"{t['refine_all_s'] / max(t['preview_and_refine_s'], 1e-12):.2f}x time, "
        f"{t['nfe_refine_all'] / t['nfe_preview_and_refine']:.2f}x NFE",
    ]
    for e in result["entries"]:
        scores = ", ".join(f"{k} {v:.2f}" for k, v in e["reward"].items())
        lines.append(f"  seed {e['seed']} ({shorten(e['prompt'], 40)}): preview vs final: {scores} -> {e['final']}")
    return lines
