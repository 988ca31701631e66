"""Diffusion Preview: cheap K-step previews of many seeds, a contact sheet, and full-step finals
of the chosen seeds from exactly the same noise and condition.

Library API (``tools/preview.py`` is a thin CLI over it)::

    from consolver.preview import load_solver, make_previews, refine, draw_sheet
    solver = load_solver("outputs/toy_depth/scheduler")
    previews = make_previews(cfg, solver, ["a red triangle on the left"], range(16), num_steps=4,
                             compare=["ddim", "dpmsolver++"])
    finals = refine(cfg, ["a red triangle on the left"] * 2, [3, 7])   # bit-exact shard targets on CPU

On disk (manifest + PNGs): :func:`preview_run` and :func:`refine_run`.
"""

from consolver.preview.core import (COMPARE_NAMES, LEARNED, Finals, Previews, check_num_steps, compare_schedulers,
                                    consistency, format_seeds, load_solver, make_previews, parse_seeds, refine)
from consolver.preview.sheet import SheetBlock, SheetLayout, Tile, default_tile_size, draw_sheet, shorten, tile_pixels
from consolver.preview.workflow import (MANIFEST, check_writable, default_final, default_out, interaction_times,
                                        load_manifest, preview_run, refine_run, report_lines, scorer)

__all__ = ["COMPARE_NAMES", "Finals", "LEARNED", "MANIFEST", "Previews", "SheetBlock", "SheetLayout", "Tile",
           "check_num_steps", "check_writable", "compare_schedulers", "consistency", "default_final", "default_out", "default_tile_size", "draw_sheet",
           "format_seeds", "interaction_times", "load_manifest", "load_solver", "make_previews", "parse_seeds",
           "preview_run", "refine", "refine_run", "report_lines", "scorer", "shorten", "tile_pixels"]
