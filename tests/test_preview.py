"""The Diffusion Preview workflow (consolver.preview, tools/preview.py): seeds, bit-exact finals
against shard targets, the contact sheet's tiles and labels, clear errors, the tool end to end."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from consolver.config import load_config
from consolver.data.format import _load_npy, parse_meta
from consolver.data.writer import make_noise
from consolver.preview import (Finals, SheetBlock, check_num_steps, draw_sheet, format_seeds, interaction_times,
                               load_solver, make_previews, parse_seeds, preview_run, refine, refine_run, report_lines,
                               shorten, tile_pixels)
from consolver.scheduler import ConsistencySolverScheduler

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "conf" / "toy_depth.yaml")
SMALL = ["backend.toy.renders_per_prompt=4", "backend.toy.num_train_prompts=2", "backend.toy.num_heldout_prompts=1",
         "reference.num_steps=6", "data.solve_batch_size=4", "rewards=[{name: pixel_psnr}]"]
PROMPT = "a green circle on the left"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def solver_dir(tmp_path_factory) -> Path:
    """A learned-looking solver with tables for K = 3 and 5 only (AB2-like rows)."""
    scheduler = ConsistencySolverScheduler(solver_order=2)
    scheduler.set_coefficient_tables({K: [[1.0, 0.0]] + [[1.4, -0.4]] * (K - 1) for K in (3, 5)})
    path = tmp_path_factory.mktemp("solver") / "scheduler"
    scheduler.save_pretrained(path)
    return path


# ------------------------------------------------------------------ seeds

@pytest.mark.parametrize("text,seeds", [("0-15", list(range(16))), ("3,7", [3, 7]), ("0-3,9", [0, 1, 2, 3, 9]),
                                        (" 5 , 2-3 ,5", [5, 2, 3])])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds
    assert parse_seeds(format_seeds(seeds)) == seeds


@pytest.mark.parametrize("text", ["", "0-x", "7-3", "1,,2", "-1", "3.5", "0-15;"])
def test_bad_seed_range_is_a_clear_error(text):
    with pytest.raises(ValueError, match="use e.g. 0-15, 3,7 or 0-3,9|must be increasing"):
        parse_seeds(text)


# ------------------------------------------------------------------ finals = shard targets, bit for bit

def _shard_samples(path: Path):
    members: dict = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, name = m.name.partition(".")
            members.setdefault(key, {})[name] = tar.extractfile(m).read()
    for key in sorted(members):
        raw = members[key]
        yield (raw["prompt.txt"].decode(), parse_meta(raw["meta.json"])["noise_seed"], _load_npy(raw["noise.npy"]),
               _load_npy(raw["target.npy"]))


def test_refine_reproduces_make_shards_targets_bit_for_bit(tmp_path):
    """Bit for bit only against shards this process made: same machine, BLAS, threads, torch."""
    from consolver.backends import build_backend
    from consolver.data.writer import make_shards

    cfg = load_config(ROOT / "conf" / "toy_shards_tiny.yaml",
                      [f"data.shard_dir={tmp_path}", "data.num_samples=8", "rewards=[]"])
    backend = build_backend(cfg.backend)
    make_shards(cfg, 0, 1, backend=backend)
    samples = list(_shard_samples(next(tmp_path.glob("*.tar"))))
    prompts, seeds = [s[0] for s in samples], [s[1] for s in samples]
    for _, seed, noise, _ in samples:  # a seed means exactly the shard's noise
        assert torch.equal(make_noise([seed], noise.shape)[0], noise)
    finals = refine(cfg, prompts, seeds, backend=backend, exact=True)
    assert finals.exact and finals.chunk == cfg.data.solve_batch_size
    for b, (_, _, _, target) in enumerate(samples):
        assert torch.equal(finals.latents[b], target), f"sample {b}: max |diff| {(finals.latents[b] - target).abs().max()}"
    two = refine(cfg, [prompts[6], prompts[2]], [seeds[6], seeds[2]], backend=backend, exact=True)  # a user's pick of two seeds
    assert torch.equal(two.latents[0], samples[6][3]) and torch.equal(two.latents[1], samples[2][3])


#: Shipped shards were made on another machine and torch version: float32 solves agree to
#: rounding (1.2e-7 seen across CPUs), never bit for bit.
SHIPPED_ATOL = 1e-4


def test_refine_matches_the_shipped_shards_to_rounding():
    cfg = load_config(ROOT / "conf" / "toy_shards_tiny.yaml")  # the config that made data/toy_shards
    samples = list(_shard_samples(ROOT / "data" / "toy_shards" / "shard-000001.tar"))
    finals = refine(cfg, [s[0] for s in samples], [s[1] for s in samples], exact=True)
    for b, (_, _, _, target) in enumerate(samples):
        torch.testing.assert_close(finals.latents[b], target, rtol=0, atol=SHIPPED_ATOL)


def test_refine_is_not_exact_by_default_and_says_so():
    cfg = load_config(TOY, SMALL)
    finals = refine(cfg, [PROMPT, PROMPT], [0, 1])
    assert not finals.exact and finals.chunk == 2 != cfg.data.solve_batch_size  # one solve of the 2 seeds, unpadded
    doc = " ".join(refine.__doc__.split())
    assert "Off by default, on every device" in doc and "default on" not in doc
    assert "off by default" in " ".join(refine_run.__doc__.split())


# ------------------------------------------------------------------ contact sheet

def test_sheet_has_one_labelled_tile_per_seed(tmp_path):
    seeds = list(range(11))
    g = torch.Generator().manual_seed(0)
    rows = {"ConsistencySolver\nK=4": torch.rand(11, 3, 32, 32, generator=g), "DDIM\nK=4": torch.rand(11, 3, 32, 32, generator=g)}
    sheet, layout = draw_sheet([SheetBlock('"a prompt"', [f"seed {s}" for s in seeds], rows)], "title", columns=4)
    sheet.save(tmp_path / "sheet.png")
    with Image.open(tmp_path / "sheet.png") as png:
        assert png.size == layout.size == sheet.size
        pixels = np.asarray(png.convert("RGB"))
    assert layout.tile_size == 128  # 32 px upscaled x4 (nearest)
    tiles = layout.row("ConsistencySolver\nK=4")
    assert [t.label for t in tiles] == [f"seed {s}" for s in seeds]
    assert len(layout.tiles) == 2 * len(seeds)
    boxes = [t.box for t in layout.tiles]
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        assert 0 <= x0 < x1 <= layout.size[0] and 0 <= y0 < y1 <= layout.size[1] and x1 - x0 == y1 - y0 == 128
        for bx0, by0, bx1, by1 in boxes[i + 1:]:
            assert x1 <= bx0 or bx1 <= x0 or y1 <= by0 or by1 <= y0, "tiles overlap"
    expected = tile_pixels(rows["ConsistencySolver\nK=4"], 128)
    for tile, image in zip(tiles, expected):  # each tile shows its own seed's image, and its label is drawn
        x0, y0, x1, y1 = tile.box
        assert np.array_equal(pixels[y0:y1, x0:x1], np.asarray(image))
        lx0, ly0, lx1, ly1 = tile.label_box
        assert ly1 <= y0 and (pixels[ly0:ly1, lx0:lx1] < 128).any()
    assert tiles[4].box[1] > tiles[3].box[1]  # 4 columns: seed 4 starts the second band


# ------------------------------------------------------------------ refine's report

@pytest.mark.parametrize("text,width,expected", [
    ("a purple circle on the left and an orange circle at the bottom", 40, "a purple circle on the left and an\u2026"),
    ("a red circle on the left", 40, "a red circle on the left"),
    ("a  red\ncircle", 40, "a red circle"),
    ("a red circle on the left", 14, "a red circle\u2026"),
    ("a red circle, on the left", 14, "a red circle\u2026"),
    ("supercalifragilistic", 8, "superca\u2026"),
])
def test_shorten_cuts_at_a_word_boundary(text, width, expected):
    assert shorten(text, width) == expected and len(shorten(text, width)) <= width


def test_refine_report_counts_the_refined_seeds_and_keeps_words_whole():
    prompt = "a purple circle on the left and an orange circle at the bottom"
    manifest = {"num_steps": 4, "timings": {"previews": 16, "preview_seconds": 0.032, "seconds_per_preview": 0.002}}
    finals = Finals([], [3, 7], torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), "dpmsolver++", 40, 0.134, 2, 1, False)
    timings = interaction_times(manifest, finals)
    assert timings["refined"] == 2 and timings["nfe_preview_and_refine"] == 16 * 4 + 2 * 40
    assert timings["preview_and_refine_s"] == pytest.approx(0.032 + 0.134)
    entries = [{"seed": s, "prompt": prompt, "final": f"finals/p0_seed{s}.png", "reward": {"pixel_psnr": 20.0}}
               for s in (3, 7)]
    lines = report_lines({"timings": timings, "entries": entries})
    assert any(line.startswith("preview 16 + refine 2: 0.166 s (144 NFE)") for line in lines), lines
    seed_lines = [line for line in lines if line.startswith("  seed ")]
    assert len(seed_lines) == 2 and all("(a purple circle on the left and an\u2026)" in line for line in seed_lines)


# ------------------------------------------------------------------ errors

def test_missing_solver_and_missing_k(tmp_path, solver_dir):
    with pytest.raises(FileNotFoundError, match="solver directory .*nope.* not found"):
        load_solver(tmp_path / "nope")
    solver = load_solver(solver_dir)
    with pytest.raises(ValueError, match="no coefficient table for K=4; it has tables for K in 3, 5"):
        check_num_steps(solver, 4)
    with pytest.raises(ValueError, match="it has tables for K in 3, 5"):
        make_previews(load_config(TOY, SMALL), solver, [PROMPT], [0], 4)


def test_unwritable_output_and_bad_compare(tmp_path, solver_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="output path .* is not writable"):
        preview_run(TOY, str(solver_dir), [PROMPT], [0], 3, str(blocker / "out"), overrides=SMALL)
    with pytest.raises(ValueError, match="unknown --compare solver 'dpm'; valid: ddim, dpmsolver"):
        preview_run(TOY, str(solver_dir), [PROMPT], [0], 3, str(tmp_path / "out"), overrides=SMALL, compare=["dpm"])


@pytest.mark.parametrize("args,message", [
    (["--seeds", "0-x"], "preview: error: seed range '0-x' does not parse; use e.g. 0-15, 3,7 or 0-3,9 (non-negative integers)"),
    (["--steps", "4"], "preview: error: solver '{solver}' has no coefficient table for K=4; it has tables for K in 3, 5"),
])
def test_tool_errors_are_one_line(monkeypatch, solver_dir, args, message):
    argv = ["preview.py", "--solver", str(solver_dir), "--config", TOY, "--prompt", PROMPT, *SMALL, *args]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "tools" / "preview.py"), run_name="__main__")
    assert str(exit_info.value.code) == message.format(solver=solver_dir)


# ------------------------------------------------------------------ the tool end to end

@pytest.mark.slow
def test_tool_preview_then_refine(tmp_path, solver_dir, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "tools" / "preview.py"), "--solver", str(solver_dir), "--config", TOY,
           "--prompt", PROMPT, "--seeds", "0-5", "--steps", "3", "--compare", "ddim,dpmsolver++", "--out", str(out),
           "--columns", "4", "--no-progress", "--threads", "1", "--no-final", *SMALL]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 previews at K=3" in result.stdout and "ms per preview" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_steps"] == 3 and manifest["overrides"] == SMALL and manifest["prompts"] == [PROMPT]
    assert not manifest["final"] and "final row" not in result.stdout and not (out / "finals").exists()
    assert [r["kind"] for r in manifest["sheet_rows"]] == ["preview"] * 3
    assert [e["seed"] for e in manifest["entries"]] == list(range(6))
    with Image.open(out / manifest["sheet"]) as sheet:
        assert sheet.size[0] > 4 * 128
        for e in manifest["entries"]:  # the recorded tile is the preview, upscaled
            x0, y0, x1, y1 = e["tile"]
            with Image.open(out / e["preview"]) as preview:
                expected = np.asarray(preview.convert("RGB").resize((128, 128), Image.NEAREST))
            assert np.array_equal(np.asarray(sheet.convert("RGB"))[y0:y1, x0:x1], expected)
    latents = np.load(out / manifest["latents"])
    assert latents.shape == (6, 3, 32, 32)
    hint = next(line for line in result.stdout.splitlines() if line.startswith("refine with:"))
    assert f"--manifest {out / 'manifest.json'}" in hint
    assert set(parse_seeds(hint.split("--seeds ")[1])) <= set(range(6)), "the hint must name seeds of this run"

    # refine needs only the manifest and the seeds (in-process: the tool's main, as the CLI calls it)
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import preview as tool
    finally:
        sys.path.remove(str(ROOT / "tools"))
    refined = tool.main(["refine", "--manifest", str(out / "manifest.json"), "--seeds", "4,1", "--no-progress", "-q"])
    printed = capsys.readouterr().out
    assert "per final" in printed and "refine all 6" in printed and "seed 4" in printed and "pixel_psnr" in printed
    assert [e["seed"] for e in refined["entries"]] == [4, 1]
    cfg = load_config(TOY, SMALL)
    again = refine(cfg, [PROMPT, PROMPT], [4, 1])  # the same finals, from seeds alone
    manifest = json.loads((out / "manifest.json").read_text())
    finals = {e["seed"]: e for e in manifest["entries"] if "final" in e}
    assert sorted(finals) == [1, 4] and (out / "refine_sheet.png").is_file()
    for b, seed in enumerate([4, 1]):
        assert np.array_equal(np.load(out / finals[seed]["final_latent"]), again.latents[b].numpy())
        assert finals[seed]["final_steps"] == 6 and "pixel_psnr" in finals[seed]["reward"]
    with pytest.raises(ValueError, match="seed\\(s\\) 9 are not in .*; it has seeds 0-5"):
        refine_run(str(out / "manifest.json"), [9])


# ------------------------------------------------------------------ where a preview run writes

def test_default_out_is_beside_the_solver(tmp_path, solver_dir):
    import shutil

    solver = tmp_path / "run_a" / "scheduler"
    shutil.copytree(solver_dir, solver)
    config_out = tmp_path / "config_output_dir"
    with pytest.warns(UserWarning, match="outside the configured set"):  # PROMPT is not among SMALL's 3 prompts
        manifest = preview_run(TOY, str(solver), [PROMPT], [0, 1], 3, overrides=[*SMALL, f"output_dir={config_out}"])
    assert Path(manifest["manifest_path"]) == tmp_path / "run_a" / "preview" / "manifest.json"
    assert (tmp_path / "run_a" / "preview" / "contact_sheet.png").is_file()
    assert not (config_out / "preview").exists(), "a preview of this solver must not land in the config's output_dir"
    assert manifest["final"] and manifest["sheet_rows"][-1]["kind"] == "final"  # the toy default: a final row


def test_contact_sheet_final_row_and_reward_captions(tmp_path, solver_dir):
    from consolver.backends import build_backend
    from consolver.preview import default_final
    from consolver.rewards.pixel import psnr

    seeds = [0, 2, 5]
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="outside the configured set"):
        manifest = preview_run(TOY, str(solver_dir), [PROMPT], seeds, 3, str(out), overrides=SMALL, compare=["ddim"],
                               final=True)
    layout, cfg = manifest["layout"], load_config(TOY, SMALL)
    rows = manifest["sheet_rows"]
    assert [r["kind"] for r in rows] == ["preview", "preview", "final"] and rows[-1]["num_steps"] == 6
    final_tiles = layout.row(rows[-1]["name"])
    assert [t.label for t in final_tiles] == [f"seed {s}" for s in seeds]
    backend = build_backend(cfg.backend)
    again = refine(cfg, [PROMPT] * 3, seeds, backend=backend)  # the final row is the refine of those seeds
    with Image.open(out / manifest["sheet"]) as png:
        pixels = np.asarray(png.convert("RGB"))
    for tile, image, e in zip(final_tiles, tile_pixels(again.images, layout.tile_size), manifest["entries"]):
        x0, y0, x1, y1 = tile.box
        assert np.array_equal(pixels[y0:y1, x0:x1], np.asarray(image))
        assert list(tile.box) == e["final_tile"] and (out / e["final"]).is_file()
        assert np.array_equal(np.load(out / e["final_latent"]), again.latents[e["row"]].numpy())
    previews = backend.decode(torch.from_numpy(np.load(out / manifest["latents"])))
    want = psnr(previews, again.images)  # the configured reward (pixel_psnr) of each preview against its final
    learned, ddim = layout.row(rows[0]["name"]), layout.row(rows[1]["name"])
    for b, e in enumerate(manifest["entries"]):
        assert e["reward"]["pixel_psnr"] == pytest.approx(float(want[b]), abs=1e-4)
        assert learned[b].caption == f"pixel_psnr {e['reward']['pixel_psnr']:.2f}"
        assert ddim[b].caption == f"pixel_psnr {e['compare_reward']['DDIM']['pixel_psnr']:.2f}"
        y1 = learned[b].box[3]  # the caption is drawn under the tile
        assert (pixels[y1 + 2:y1 + 14, learned[b].box[0]:learned[b].box[2]] < 160).any()
    assert all(t.caption is None for t in final_tiles)
    assert json.loads((out / "manifest.json").read_text())["sheet_rows"] == rows
    assert default_final(cfg) and not default_final(load_config(ROOT / "conf" / "sd15_depth.yaml"))


# ------------------------------------------------------------------ the tool's --help

def _tool():
    """tools/preview.py as a module (cheap: it imports only the standard library)."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import preview as tool
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return tool


@pytest.mark.parametrize("seeds,suggested", [([0, 1, 2, 3], [0, 1]), ([12], [12]), ([40, 7, 9], [40, 7])])
def test_refine_hint_names_seeds_of_the_manifest(seeds, suggested):
    hint = _tool().refine_hint({"seeds": seeds, "manifest_path": "/x/preview/manifest.json"})
    assert hint.startswith("refine with: python tools/preview.py refine --manifest /x/preview/manifest.json --seeds ")
    assert parse_seeds(hint.split("--seeds ")[1]) == suggested


def test_list_prompts_toy(capsys):
    from consolver.backends.toy_scenes import prompt_list

    listing = _tool().main(["--list-prompts", "--config", TOY, *SMALL])  # no --solver needed
    printed = capsys.readouterr().out.splitlines()
    assert listing["train"] == prompt_list("train", 2) and listing["heldout"] == prompt_list("heldout", 1)
    assert printed[0] == "toy: 2 configured prompts (train split):"
    assert printed[1:3] == [f"  {p}" for p in prompt_list("train", 2)]
    assert printed[3].startswith("toy: 1 held-out prompts") and printed[4] == f"  {prompt_list('heldout', 1)[0]}"


def test_list_prompts_other_backends(tmp_path, capsys):
    sd15 = str(ROOT / "conf" / "sd15_depth.yaml")
    listing = _tool().main(["--list-prompts", "--config", sd15, "data.prompts=null"])
    assert "train" not in listing and "has no prompt list of its own" in capsys.readouterr().out
    prompt_file = tmp_path / "mine.txt"
    prompt_file.write_text("a lighthouse at dusk\n\na teapot\n")
    listing = _tool().main(["--list-prompts", "--config", sd15, f"data.prompts={prompt_file}"])
    printed = capsys.readouterr().out
    assert listing["prompts"] == ["a lighthouse at dusk", "a teapot"]
    assert f"prompt file {prompt_file} (data.prompts): 2 prompts" in printed and "  a teapot" in printed


def test_prompt_outside_the_toy_set_warns_with_examples_and_the_list_command():
    import warnings

    from consolver.backends import build_backend
    from consolver.preview.prompts import warn_unconfigured

    backend = build_backend(load_config(TOY, SMALL).backend)
    configured = backend.prompts()
    with pytest.warns(UserWarning) as caught:
        outside = warn_unconfigured(backend, [PROMPT, configured[0]], TOY)
    assert outside == [PROMPT] and len(caught) == 1
    message = str(caught[0].message)
    assert repr(PROMPT) in message and f"python tools/preview.py --list-prompts --config {TOY}" in message
    assert all(repr(p) in message for p in configured), "the warning names valid prompts"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_unconfigured(backend, [p.upper() + "." for p in configured], TOY) == []  # canonical forms match


def test_solver_is_required_without_list_prompts(capsys):
    with pytest.raises(SystemExit):
        _tool().main(["--config", TOY, "--prompt", PROMPT])
    assert "required: --solver (or --list-prompts)" in capsys.readouterr().err


def test_help_states_the_defaults():
    tool = _tool()
    helps = {a.dest: a.help for a in tool.preview_parser()._actions}
    assert "default 4" in helps["steps"] and tool.preview_parser().get_default("steps") == 4
    assert "default 0-15" in helps["seeds"]
    assert "beside the solver" in helps["out"]

@pytest.mark.parametrize("sub", [[], ["refine"]])
def test_help_imports_no_heavy_library(sub):
    """`--help` answers at once: torch, tqdm, diffusers and consolver.preview load only after parsing."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['preview.py', *{sub!r}, '--help']\n"
            "try:\n"
            f"    runpy.run_path({str(ROOT / 'tools' / 'preview.py')!r}, run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "heavy = [m for m in ('torch', 'tqdm', 'diffusers', 'consolver.preview', 'numpy') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: preview.py" in result.stdout and "HEAVY []" in result.stdout, result.stdout[-500:]


def test_a_solver_of_another_schedule_is_refused_before_any_preview(tmp_path):
    """A flow-matching (toy_edit-like) solver with the VP toy_depth config: one clear error."""
    flow = ConsistencySolverScheduler(schedule="flow", use_dynamic_shifting=True, solver_order=2)
    flow.set_coefficient_tables({3: [[1.0, 0.0]] * 3})
    flow.save_pretrained(tmp_path / "scheduler")
    with pytest.raises(ValueError, match="different schedules"):
        preview_run(TOY, str(tmp_path / "scheduler"), [PROMPT], [0], 3, str(tmp_path / "out"), overrides=SMALL)
    assert not (tmp_path / "out" / "manifest.json").exists()
