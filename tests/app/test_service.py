"""The app's library without a browser (consolver.app.service, session, handlers): bit-identical
previews and finals to the CLI's library calls, limits refused with clear messages, the gallery's
labels, refines from any row, the session's history and running line, where files go."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from consolver.app import AppError, Limits, PreviewService, Session
from consolver.app import handlers
from consolver.app.service import PreviewRun, RefineResult, allowed_num_steps, choose_solver
from consolver.config import load_config
from consolver.data.format import to_uint8_hwc
from consolver.preview import LEARNED, load_manifest, load_solver, preview_run, refine, refine_run
from tests.app.conftest import KS, PROMPT, ROOT, SMALL, TOY

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_previews_and_finals_are_the_cli_ones_bit_for_bit(service, app_solver, tmp_path):
    """The app (shared backend, after other prompts grew the toy's bank) against what
    tools/preview.py runs: preview_run and refine_run building their own backend and solver."""
    service.preview("a red circle on the left", [0, 1], 3)  # a prompt outside the set: the shared bank grows
    run = service.preview(PROMPT, list(range(8)), 4, compare=["ddim"])
    cli = preview_run(TOY, str(app_solver), [PROMPT], list(range(8)), 4, str(tmp_path / "cli"), overrides=SMALL,
                      compare=["ddim"], final=False)
    assert np.array_equal(np.load(run.directory / "preview_latents.npy"), np.load(tmp_path / "cli" / "preview_latents.npy"))
    for e in cli["entries"]:
        assert (run.directory / e["preview"]).read_bytes() == (tmp_path / "cli" / e["preview"]).read_bytes()
    ddim = cli["previews"].compare["DDIM"]
    assert all(np.array_equal(_png(p), to_uint8_hwc(ddim[b:b + 1])[0]) for b, p in enumerate(run.rows["DDIM"]))
    result = service.refine(run, 5)
    cli_refine = refine_run(str(tmp_path / "cli" / "manifest.json"), [5])  # tools/preview.py refine --seeds 5
    cfg = load_config(TOY, SMALL)
    fresh = refine(cfg, [PROMPT], [5])
    app_latent = np.load(run.directory / "finals" / "p0_seed5.npy")
    assert np.array_equal(app_latent, np.load(tmp_path / "cli" / "finals" / "p0_seed5.npy"))
    assert np.array_equal(app_latent, fresh.latents[0].numpy())
    assert result.final_png.read_bytes() == (tmp_path / "cli" / "finals" / "p0_seed5.png").read_bytes()
    assert result.reward == pytest.approx(cli_refine["entries"][0]["reward"], abs=0)


def test_the_run_folder_continues_from_the_cli(service, capsys):
    """tools/preview.py refine on a run folder the app wrote."""
    run = service.preview(PROMPT, [3, 4], 3)
    manifest = load_manifest(str(run.manifest_path))
    assert manifest["seeds"] == [3, 4] and manifest["num_steps"] == 3 and manifest["overrides"] == SMALL
    assert Path(manifest["solver"]) == Path(service.choice.path).resolve()
    cli = runpy.run_path(str(ROOT / "tools" / "preview.py"))
    cli["main"](["refine", "--manifest", str(run.manifest_path), "--seeds", "4", "--no-progress"])
    assert "wrote" in capsys.readouterr().out
    assert (run.directory / "finals" / "p0_seed4.png").is_file()
    assert load_manifest(str(run.manifest_path))["entries"][1]["final"] == "finals/p0_seed4.png"


@pytest.mark.parametrize("count,seed_range,message", [
    (0, "", "number of seeds must be a whole number from 1 to 64"),
    (65, "", "number of seeds must be a whole number from 1 to 64, got 65"),
    (2.5, "", "got 2.5"),
    ("x", None, "got 'x'"),
    (None, None, "got None"),
    (8, "0-64", "seed range '0-64' has 65 seeds; at most 64 per request"),
    (8, "3-x", "seed range '3-x' does not parse"),
])
def test_bad_seeds_are_refused(service, count, seed_range, message):
    with pytest.raises(AppError, match=message.replace("(", r"\(").replace(")", r"\)")):
        service.check_seeds(count, seed_range)


def test_seeds_count_or_range(service):
    assert service.check_seeds(16, "") == list(range(16)) and service.check_seeds(8.0, None) == list(range(8))
    assert service.check_seeds(16, "100-103,7") == [100, 101, 102, 103, 7]


@pytest.mark.parametrize("K", [2, 6, 4.5, "four", None])
def test_k_is_limited_to_the_solvers(service, K):
    with pytest.raises(AppError, match=f"K={K!r} is not available: the solver serves K in 3, 4, 5"):
        service.check_num_steps(K)


@pytest.mark.parametrize("prompt,message", [
    ("", "type a prompt"),
    ("   ", "type a prompt"),
    ("a red circle " * 30, "the prompt has 389 characters; at most 300"),
    ("a plaid circle on the left", "plaid"),
])
def test_bad_prompts_are_refused(service, prompt, message):
    with pytest.raises(AppError, match=message):
        service.check_prompt(prompt)


def test_a_refused_request_writes_nothing(service):
    before = sorted((service.out / "runs").glob("*")) if (service.out / "runs").is_dir() else []
    for args in [(PROMPT, 0, "", 4), (PROMPT, 8, "", 7), ("", 8, "", 4)]:
        with pytest.raises(AppError):
            handlers.on_preview(service, Session(), *args)
    with pytest.raises(AppError, match="unknown compare solver 'dpm'; valid: ddim, dpmsolver"):
        handlers.on_preview(service, Session(), PROMPT, 2, "", 4, ["dpm"])
    after = sorted((service.out / "runs").glob("*")) if (service.out / "runs").is_dir() else []
    assert after == before


def test_gallery_is_labelled_rows_of_seeds(service):
    session = Session()
    out = handlers.on_preview(service, session, PROMPT, 10, "", 4, ["ddim", "dpmsolver++"])
    tiles = out["gallery"]
    assert len(tiles) == 30 and out["columns"] == 5  # 10 seeds: two rows of 5 per solver
    assert [c.split(" · ")[0] for _, c in tiles[:10]] == [f"seed {s}" for s in range(10)]
    assert all(c.startswith(f"DDIM · seed {s} · ") and c.endswith(" ms") for s, (_, c) in zip(range(10), tiles[10:20]))
    assert all(c.startswith("DPM-Solver++ 2M · seed ") for _, c in tiles[20:])
    for path, _ in tiles:  # every image is a file the service wrote under its output folder
        assert Path(path).is_file() and Path(path).resolve().is_relative_to(service.out)
    assert [Path(f).name for f in out["files"]] == ["manifest.json", "contact_sheet.png"]
    assert "10 previews of" in out["status"] and "tools/preview.py refine --manifest" in out["status"]
    assert session.current is not None and len(session.current) == 10


def test_refine_a_tile_of_any_row_and_the_session_numbers(service):
    session = Session()
    with pytest.raises(AppError, match="preview first"):
        handlers.on_refine(service, session, seed=0)
    handlers.on_preview(service, session, PROMPT, 4, "", 3, ["ddim"])
    a = handlers.on_refine(service, session, tile=6)  # second row: DDIM, seed 2
    assert session.picks[-1].row == "DDIM" and session.picks[-1].seed == 2
    assert a["preview"].endswith("compare/ddim/p0_seed2.png") and a["final"].endswith("finals/p0_seed2.png")
    b = handlers.on_refine(service, session, seed=1)
    assert session.picks[-1].row == LEARNED and session.picks[-1].seed == 1
    with pytest.raises(AppError, match="seed 9 is not in this preview run; it has seeds 0-3"):
        handlers.on_refine(service, session, seed=9)
    with pytest.raises(AppError, match="tile 8 does not exist: this run has 8 tiles"):
        handlers.on_refine(service, session, tile=8)
    assert "pixel_psnr" in b["reward"] and "seed 1" in b["reward"]
    lines = b["history"].splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 2 | ") and "| DDIM K=3 |" in lines[3]  # newest first
    t = session.totals()
    assert t["previews"] == 4 and t["finals"] == 2 and t["nfe_session"] == 4 * 3 + 2 * 6 and t["nfe_refine_all"] == 4 * 6
    assert t["refine_all_s"] == pytest.approx(4 * t["final_s"] / 2)
    assert "refining all 4 previewed seeds" in b["running"] and "24 vs 24 model evaluations (1.0x)" in b["running"]


def test_running_line_before_and_after_a_pick():
    session = Session()
    assert session.running_line() == "No previews yet in this session."
    run = PreviewRun("r", Path("."), Path("m.json"), "p", None, list(range(16)), 4, [], {LEARNED: []}, {LEARNED: 0.05})
    session.runs += [run, run]
    assert "32 previews (0.10 s)" in session.running_line() and "Click a tile" in session.running_line()
    session.picks.append(RefineResult("r", "p", 3, LEARNED, 4, 40, Path("a"), Path("b"), Path("m"), {"x": 1.0}, 0.2))
    line = session.running_line()
    assert "= **0.30 s**" in line and "refining all 32 previewed seeds: 6.40 s" in line and "21.3x" in line
    assert "168 vs 1280 model evaluations (7.6x)" in line


def test_solver_choice_main_job_else_base(tmp_path, app_solver):
    from consolver.backends import build_backend

    cfg = load_config(TOY, [*SMALL, f"output_dir={tmp_path / 'run'}"])
    backend = build_backend(cfg.backend)
    base = choose_solver(None, cfg, backend, tmp_path / "out")
    assert base.source == "base" and "base solver (ddim, untrained)" in base.description
    solver = load_solver(base.path)
    assert solver.available_num_steps == [] and allowed_num_steps(solver, cfg) == [3, 4, 5, 6, 7, 8]
    import shutil

    shutil.copytree(app_solver, tmp_path / "run" / "scheduler")
    main = choose_solver(None, cfg, backend, tmp_path / "out")
    assert main.source == "main job" and main.path == tmp_path / "run" / "scheduler"
    given = choose_solver(str(app_solver), cfg, backend, tmp_path / "out")
    assert given.source == "given" and allowed_num_steps(load_solver(given.path), cfg) == list(KS)


def test_page_says_which_solver_and_lists_prompts(service):
    text = handlers.solver_markdown(service)
    assert f"solver {service.choice.path}" in text and "**K:** 3-5" in text and "6-step dpmsolver++" in text
    choices = service.prompt_choices()
    assert (PROMPT, PROMPT) in choices and sum(label.endswith("(held-out)") for label, _ in choices) == 1


def test_uploads_are_stored_by_content_under_the_output_folder(service, monkeypatch):
    image = np.zeros((32, 32, 3), np.uint8)
    a, b = service.save_upload(image), service.save_upload(Image.fromarray(image))
    assert a == b and Path(a).parent == service.out / "uploads"
    monkeypatch.setattr(service, "limits", Limits(max_image_pixels=16))
    with pytest.raises(AppError, match="the reference image has 32x32 pixels; at most 16 pixels"):
        service.save_upload(image)
    with pytest.raises(AppError, match="upload a reference image"):
        service.save_upload(None)


def test_progress_adapter_reports_steps():
    calls = []
    advance = handlers.progress_adapter(lambda value, desc=None: calls.append((value, desc)))("finals", 3)
    advance(1)
    advance(5)
    assert calls == [((0, 3), "finals"), ((1, 3), "finals"), ((3, 3), "finals")]
    assert handlers.progress_adapter(None) is None


@pytest.mark.parametrize("n,columns", [(1, 1), (8, 8), (16, 8), (10, 5), (12, 6), (64, 8), (13, 8)])
def test_gallery_columns(n, columns):
    assert handlers.gallery_columns(n) == columns


def test_help_is_fast_and_imports_neither_torch_nor_gradio():
    code = ("import runpy, sys; sys.argv = ['app.py', '--help']\n"
            "try:\n    runpy.run_path('tools/app.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'gradio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "--solver" in out.stdout and "127.0.0.1" in out.stdout and "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_only_the_page_module_imports_gradio():
    """The core install needs no gradio: only consolver/app/ui.py imports it, inside functions."""
    import ast

    for path in sorted((ROOT / "consolver").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name.split(".")[0] for n in top for a in n.names} | {
            (n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
        assert "gradio" not in names, f"{path} imports gradio at module level"
        if path.name != "ui.py":
            assert "import gradio" not in path.read_text(encoding="utf-8"), path


def test_editing_backend_takes_a_reference_image(tmp_path):
    """toy_edit: the configured edits fill the instruction and the reference image; the upload is
    saved under the output folder and is what the previews edit."""
    edit = PreviewService(str(ROOT / "conf" / "toy_edit_dino.yaml"),
                          ["backend.toy.renders_per_prompt=4", "backend.toy.num_train_prompts=2",
                           "backend.toy.num_heldout_prompts=1", "reference.num_steps=4", "rewards=[{name: pixel_psnr}]"],
                          out=str(tmp_path))
    assert edit.editing and edit.choice.source == "base"
    key = edit.prompt_choices()[0][1]
    image, instruction = edit.reference_for(key)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and instruction == key.split(" | ", 1)[1]
    session = Session()
    with pytest.raises(AppError, match="upload a reference image"):
        handlers.on_preview(edit, session, instruction, 2, "", edit.num_steps[0])
    out = handlers.on_preview(edit, session, instruction, 2, "", edit.num_steps[0], image=image)
    assert len(out["gallery"]) == 2 and session.current.ref_image.startswith(str(tmp_path / "uploads"))
    assert np.array_equal(_png(session.current.ref_image), image)
    assert "pixel_psnr" in handlers.on_refine(edit, session, seed=1)["reward"]
