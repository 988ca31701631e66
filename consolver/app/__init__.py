"""The Diffusion Preview app: a local web page over :mod:`consolver.preview` (``tools/app.py``).

- :mod:`~consolver.app.service`: the one shared model (backend, solver, reward), limits, the
  output folder; previews and refines as :func:`~consolver.preview.preview_run` /
  :func:`~consolver.preview.refine_run` write them.
- :mod:`~consolver.app.session`: one browser session's runs, picks and running time line.
- :mod:`~consolver.app.handlers`: the page's requests as plain functions (testable without a browser).
- :mod:`~consolver.app.ui`: the Gradio page (gradio is an optional extra: ``pip install -e ".[app]"``).
"""

from consolver.app.service import AppError, Limits, PreviewRun, PreviewService, RefineResult
from consolver.app.session import Session

__all__ = ["AppError", "Limits", "PreviewRun", "PreviewService", "RefineResult", "Session"]
