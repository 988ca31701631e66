"""The page's request handlers as plain functions (no gradio): values in, display values out.

Each takes the shared :class:`~consolver.app.service.PreviewService`, the browser's
:class:`~consolver.app.session.Session` and the page's input values, and returns a dict of what
the page shows. A refused request raises :class:`~consolver.app.service.AppError` (the UI shows
its message). Images are returned as PNG paths under the service's output folder: the page
never sends a path, it only receives them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence

from consolver.app.service import AppError, PreviewService, RefineResult, whole_number
from consolver.app.session import Session
from consolver.preview.core import LEARNED, Progress, format_seeds
from consolver.preview.sheet import shorten

#: Gallery tiles per row at most.
MAX_COLUMNS = 8


def progress_adapter(report: Optional[Callable[..., None]]) -> Optional[Progress]:
    """The library's ``progress(desc, total) -> advance(n)`` over a reporter called as
    ``report((done, total), desc=...)`` (gradio's ``gr.Progress``)."""
    if report is None:
        return None

    def factory(desc: str, total: int):
        done = [0]
        report((0, total), desc=desc)

        def advance(n: int) -> None:
            done[0] += n
            report((min(done[0], total), total), desc=desc)
        return advance
    return factory


def gallery_columns(num_seeds: int) -> int:
    """Tiles per gallery row: every seed on one row up to ``MAX_COLUMNS``, else a divisor of the
    seed count from 8 down to 4 (so each solver's rows start at the left), else ``MAX_COLUMNS``."""
    if num_seeds <= MAX_COLUMNS:
        return max(1, num_seeds)
    return next((c for c in range(MAX_COLUMNS, 3, -1) if num_seeds % c == 0), MAX_COLUMNS)


def shown_path(path) -> str:
    """``path`` relative to the working directory when it is inside it (shorter, and what a command
    typed there takes), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def solver_markdown(service: PreviewService) -> str:
    """The page's line saying which solver serves the previews and what it allows."""
    cfg = service.cfg
    ks = format_seeds(service.num_steps).replace(",", ", ")
    return (f"**Solver:** {service.choice.description}. **K:** {ks}. **Backend:** {cfg.backend.name}. "
            f"**Finals:** {cfg.reference.num_steps}-step {cfg.reference.solver}, guidance {cfg.guidance:g}. "
            f"**Outputs:** `{shown_path(service.out)}`")


def check_preview(service: PreviewService, prompt: str, num_seeds, seed_range: str, num_steps,
                  compare: Sequence[str] = (), image=None) -> None:
    """Refuse a bad preview request before it queues (:class:`AppError`); nothing is written."""
    service.check_seeds(num_seeds, seed_range)
    service.check_num_steps(num_steps)
    service.check_compare(compare)
    service.check_prompt(prompt)
    if service.editing and image is None:
        raise AppError("upload a reference image: this backend edits an image")


def on_preview(service: PreviewService, session: Session, prompt: str, num_seeds, seed_range: str, num_steps,
               compare: Sequence[str] = (), image=None, progress: Optional[Progress] = None) -> dict:
    """Previews of the requested seeds: ``{"gallery": [(png, caption)], "columns", "status",
    "running", "files": [manifest.json, contact_sheet.png]}``; ``session`` gains the run."""
    check_preview(service, prompt, num_seeds, seed_range, num_steps, compare, image)
    seeds = service.check_seeds(num_seeds, seed_range)
    ref_image = service.save_upload(image) if service.editing else None
    run = service.preview(prompt, seeds, num_steps, compare, ref_image=ref_image, progress=progress)
    session.runs.append(run)
    N = len(run)
    gallery = []
    for name, paths in run.rows.items():
        ms = 1e3 * run.seconds[name] / N
        label = "" if name == LEARNED else f"{name} · "
        gallery += [(str(p), f"{label}seed {s} · {ms:.1f} ms") for p, s in zip(paths, run.seeds)]
    times = ", ".join(f"{name} {run.seconds[name]:.3f} s" for name in run.rows if name != LEARNED)
    cfg = service.cfg
    status = (f"{N} previews of \u201c{shorten(run.prompt, 60)}\u201d at K={run.num_steps} in "
              f"{run.seconds[LEARNED]:.3f} s ({1e3 * run.seconds[LEARNED] / N:.1f} ms each, batched)"
              + (f"; compared: {times}" if times else "") + ". "
              f"Click a tile to refine it: the {cfg.reference.num_steps}-step {cfg.reference.solver} final from "
              f"the same noise. Continue from the command line: `python tools/preview.py refine --manifest "
              f"{shown_path(run.manifest_path)} --seeds {run.seeds[0]}`")
    status += "".join(f"\n\n**Warning:** {w}" for w in run.warnings)
    return {"gallery": gallery, "columns": gallery_columns(N), "status": status, "running": session.running_line(),
            "files": [str(run.manifest_path), str(run.directory / "contact_sheet.png")], "session": session}


def on_refine(service: PreviewService, session: Session, seed=None, tile: Optional[int] = None,
              progress: Optional[Progress] = None) -> dict:
    """The final of gallery tile ``tile`` (any row), or of ``seed`` (the learned row), of the
    session's latest run: ``{"preview", "final" (PNG paths), "reward", "files": [final PNG,
    manifest.json], "history", "running"}``; ``session`` gains the pick."""
    run = session.current
    if run is None:
        raise AppError("preview first: there is no preview run to refine in this session")
    if tile is not None:
        row, chosen = run.tile(int(tile))
    else:
        row, chosen = LEARNED, _seed(seed)
    result = service.refine(run, chosen, row, progress=progress)
    session.picks.append(result)
    return {"preview": str(result.preview_png), "final": str(result.final_png), "reward": reward_markdown(result),
            "files": [str(result.final_png), str(result.manifest_path)], "history": session.history_markdown(),
            "running": session.running_line(), "session": session}


def reward_markdown(result: RefineResult) -> str:
    """What stands between the picked preview and its final: the configured reward and timings."""
    row = "ConsistencySolver" if result.row == LEARNED else result.row
    scores: List[str] = [f"`{k}` **{v:.2f}**" for k, v in result.reward.items()]
    return (f"**seed {result.seed}**\n\n{row} preview (K={result.num_steps}) vs final ({result.final_steps} steps):"
            f"\n\n" + "\n\n".join(scores) + f"\n\nfinal in {result.seconds:.3f} s")


def _seed(value) -> int:
    seed = whole_number(value)
    if seed is None or seed < 0:
        raise AppError(f"seed must be a non-negative whole number, got {value!r}")
    return seed
