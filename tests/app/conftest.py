"""Fixtures of the app tests: a small toy config, a solver with tables for K = 3..5, a shared
:class:`~consolver.app.PreviewService`, and (for the gradio tests) the page served in this process.

The gradio and browser tests need the ``test`` extra (gradio, gradio_client, playwright) and
Debian's chromium (``apt-get install chromium``; ``.ci/run`` installs it). Without them they
skip with the reason, except under CI (``CI`` set), where a missing piece is a failure:
CI must run them. ``CONSOLVER_SKIP_BROWSER=1`` skips the browser test on purpose.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
from pathlib import Path

import pytest

from consolver.scheduler import ConsistencySolverScheduler

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "conf" / "toy_depth.yaml")
SMALL = ["backend.toy.renders_per_prompt=4", "backend.toy.num_train_prompts=3", "backend.toy.num_heldout_prompts=1",
         "reference.num_steps=6", "data.solve_batch_size=4", "rewards=[{name: pixel_psnr}]"]
#: A configured (train) prompt of SMALL: configured prompts preview well on the toy.
PROMPT = "an orange circle on the right"
KS = (3, 4, 5)
CHROMIUM = os.environ.get("CONSOLVER_CHROMIUM", "/usr/bin/chromium")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(module: str):
    """Import ``module`` or skip (fail under CI): the app tests need the ``test`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        message = f"{module} is not installed ({err}); pip install -e '.[test]'"
        if in_ci():
            pytest.fail(f"CI must run the app tests: {message}")
        pytest.skip(message)


def require_chromium() -> str:
    """Debian's chromium, or skip (fail under CI) saying how to install it."""
    if os.environ.get("CONSOLVER_SKIP_BROWSER") == "1":
        pytest.skip("CONSOLVER_SKIP_BROWSER=1")
    path = shutil.which(CHROMIUM) or (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)
    if path is None:
        message = f"no chromium at {CHROMIUM}: apt-get install -y chromium (or set CONSOLVER_CHROMIUM)"
        if in_ci():
            pytest.fail(f"CI must run the browser test: {message}")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def app_solver(tmp_path_factory) -> Path:
    """A learned-looking solver with tables for K = 3, 4, 5 (AB2-like rows)."""
    scheduler = ConsistencySolverScheduler(solver_order=2)
    scheduler.set_coefficient_tables({K: [[1.0, 0.0]] + [[1.4, -0.4]] * (K - 1) for K in KS})
    path = tmp_path_factory.mktemp("app_solver") / "scheduler"
    scheduler.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def service(app_solver, tmp_path_factory):
    """One shared service, as tools/app.py builds it (the small toy, the K = 3..5 solver)."""
    from consolver.app import PreviewService

    return PreviewService(TOY, SMALL, solver=str(app_solver), out=str(tmp_path_factory.mktemp("app_out")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app(service):
    """``(url, demo)``: the page served from this process (so tests compare with the library bit
    for bit), as tools/app.py serves it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    require("gradio")
    from consolver.app.ui import build_app, launch

    demo = build_app(service)
    url = launch(demo, port=free_port(), allowed=(str(service.out),), block=False)
    yield url, demo
    demo.close()
