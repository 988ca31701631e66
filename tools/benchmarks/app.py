"""The Diffusion Preview app on the toy CPU (``tools/app.py``, default config): start-up, the first
16-seed grid, and the paper's interaction-time argument as a scripted session.

- ``app start``: a fresh ``tools/app.py`` process until its page answers (median of the runs);
  target < 10 s. ``first 16-seed grid``: from the Preview click until 16 tiles are loaded in
  Debian's chromium (Playwright; without it, the ``/preview`` call through gradio_client);
  target < 2 s. Both need the ``app`` extra.
- ``session``: ``N`` configured prompts (the held-out ones first) x 16 seeds at K=4 through the
  app's own service (the one shared backend, as the page calls it): preview all 16, pick one
  (scripted: seed ``p`` of prompt ``p``), refine it. Against it, ``refine all``: the 16 finals
  of every prompt (one batched reference solve per prompt, the cheapest way to make them all),
  to pick from finals instead; each prompt's two back to back, torch on 1 thread, medians of 3
  passes. Compute seconds of both and their ratio; ``session wall`` adds what the app does around
  the solves (PNGs, sheet, manifest). The solver is the main job's (``outputs/toy_depth/scheduler``)
  when it exists, else the base solver.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "conf" / "toy_depth.yaml"
SEEDS, K = 16, 4


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_app(out: str):
    """``(process, url, seconds until the page answered)``."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "app.py"), "--port", str(port), "--out", out],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while time.perf_counter() - start < 120:
        if proc.poll() is not None:
            raise RuntimeError(f"tools/app.py exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return proc, url, time.perf_counter() - start
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise RuntimeError("tools/app.py did not answer in 120 s")


def _first_grid_browser(url: str, prompt: str) -> float:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("CONSOLVER_CHROMIUM", "/usr/bin/chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        tab = browser.new_page()
        tab.goto(url)
        tab.fill("#prompt textarea", prompt)
        tab.fill("#num-seeds input", str(SEEDS))
        tab.fill("#steps input", str(K))
        start = time.perf_counter()
        tab.click("#preview-button")
        tab.wait_for_function(f"[...document.querySelectorAll('#gallery .thumbnail-item img')].filter("
                              f"i => i.complete && i.naturalWidth > 0).length === {SEEDS}", timeout=60_000)
        seconds = time.perf_counter() - start
        browser.close()
    return seconds


def _first_grid_client(url: str, prompt: str) -> float:
    from gradio_client import Client

    client = Client(url, verbose=False)
    start = time.perf_counter()
    client.predict(prompt, SEEDS, "", K, [], api_name="/preview")
    return time.perf_counter() - start


def _startup_rows(runs: int, prompt: str) -> list[dict]:
    starts, grid, how = [], None, ""
    for i in range(runs):
        with tempfile.TemporaryDirectory() as out:
            proc, url, seconds = _start_app(out)
            try:
                starts.append(seconds)
                if i == 0:
                    try:
                        grid, how = _first_grid_browser(url, prompt), "chromium, click to 16 tiles loaded"
                    except Exception as err:  # noqa: BLE001 - no browser here: the API call instead
                        grid, how = _first_grid_client(url, prompt), f"gradio_client /preview (no browser: {type(err).__name__})"
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    return [{"measure": "app start: process to page served", "seconds": statistics.median(starts),
             "note": f"median of {runs} (max {max(starts):.2f} s); target < 10 s"},
            {"measure": f"first {SEEDS}-seed grid after the click", "seconds": grid, "note": f"{how}; target < 2 s"}]


def _session_rows(num_prompts: int, repeats: int) -> list[dict]:
    """Per prompt, the app's session (preview 16, refine 1) and then refine-all of the same prompt,
    back to back, so that load changes hit both; medians of ``repeats`` passes; torch on 1 thread."""
    import torch

    from consolver.app import PreviewService
    from consolver.preview import refine
    from consolver.preview.prompts import toy_prompt_sets

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    main = ROOT / "outputs" / "toy_depth" / "scheduler"
    passes = []
    try:
        with tempfile.TemporaryDirectory() as out:
            service = PreviewService(str(CONFIG), solver=str(main) if main.is_dir() else None, out=out)
            sets = toy_prompt_sets(service.cfg)
            prompts = (sets["heldout"] + sets["train"])[:num_prompts]
            seeds = list(range(SEEDS))
            service.warm_up()
            refine(service.cfg, prompts[:1], [0], backend=service.backend)  # warm: renders, first calls
            for _ in range(repeats):
                compute = wall = all_s = 0.0
                for p, prompt in enumerate(prompts):
                    start = time.perf_counter()
                    run = service.preview(prompt, seeds, K)
                    result = service.refine(run, seeds[p % SEEDS])
                    wall += time.perf_counter() - start
                    compute += run.seconds["ConsistencySolver"] + result.seconds
                    all_s += refine(service.cfg, [prompt] * SEEDS, seeds, backend=service.backend).seconds
                passes.append((compute, wall, all_s))
            solver, steps = service.choice.description, service.cfg.reference.num_steps
            ref = f"{steps}-step {service.cfg.reference.solver}"
    finally:
        torch.set_num_threads(threads)
    compute, wall, all_s = (statistics.median(x[i] for x in passes) for i in range(3))
    nfe_app, nfe_all = num_prompts * (SEEDS * K + steps), num_prompts * SEEDS * steps
    what = f"{num_prompts} prompts x {SEEDS} seeds"
    note = f"median of {repeats} passes, 1 thread"
    return [{"measure": f"session: {what} previews at K={K} + 1 final each (compute)", "seconds": compute,
             "note": f"{solver}; {nfe_app} NFE; {note}"},
            {"measure": "session wall (the app's calls, with its files)", "seconds": wall, "note": note},
            {"measure": f"refine all: {what} finals ({ref}, batched per prompt)", "seconds": all_s,
             "note": f"{nfe_all} NFE; {note}"},
            {"measure": "refine all / session (compute)", "seconds": all_s / compute,
             "note": f"ratio; NFE ratio {nfe_all / nfe_app:.2f}; vs session wall {all_s / wall:.2f}"}]


def run(quick: bool = False) -> list[dict]:
    from consolver.preview.prompts import toy_prompt_sets
    from consolver.config import load_config

    prompt = toy_prompt_sets(load_config(str(CONFIG)))["heldout"][0]
    rows = _session_rows(2 if quick else 8, 1 if quick else 3)
    try:
        rows = _startup_rows(1 if quick else 3, prompt) + rows
    except ImportError as err:
        rows.insert(0, {"measure": "app start", "seconds": float("nan"), "note": f"needs the app extra ({err})"})
    return rows
