"""Diffusion Preview: many cheap previews, a contact sheet, then full-step finals of the chosen seeds.

    python tools/preview.py --solver outputs/toy_depth/scheduler --config conf/toy_depth.yaml \\
        --prompt "a red triangle on the left" --seeds 0-15 --steps 4 --compare ddim,dpmsolver++
    python tools/preview.py refine --manifest outputs/toy_depth/preview/manifest.json --seeds 3,7
    python tools/preview.py --list-prompts --config conf/toy_depth.yaml

preview (the default subcommand): one K-step preview per seed (and prompt) with the trained
solver, batched; writes contact_sheet.png, previews/*.png, preview_latents.npy and manifest.json
into --out (default: preview/ beside the solver directory, e.g. outputs/toy_depth/preview for
--solver outputs/toy_depth/scheduler, so previews of different solvers never overwrite each
other). --compare adds rows of training-free solvers at the same K. --final (default on the toy
backends, where the full-step solve is cheap) adds a last row of full-step finals and captions
every preview with its configured reward against its final. Positional key=value arguments
override the config. Editing backends: --image and --instruction.

refine: the full-step reference solve (reference.solver, reference.num_steps, as make_shards makes
its targets) from the same noise and condition for the chosen seeds; writes finals/*.png (+ .npy)
and refine_sheet.png (preview | final), prints the timings and the configured reward between each
preview and its final. Seed s always means the noise make_noise([s], latent_shape).

--list-prompts: the prompts the config knows. On the toy worlds only the configured prompts
(train, and the held-out ones) preview well: they make the unconditional mixture that guidance
pushes away from. Other backends: the config's prompt file (data.prompts), if any.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Only the standard library at import time: `--help` must answer at once. torch, tqdm and
# consolver.preview are imported inside the commands, after the arguments parse.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "toy_depth.yaml"
log = logging.getLogger("preview")


def preview_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="preview.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. guidance=3")
    p.add_argument("--solver", default=None, help="trained scheduler directory (e.g. outputs/toy_depth/scheduler); required "
                                                  "unless --list-prompts")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: conf/toy_depth.yaml)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line")
    p.add_argument("--list-prompts", action="store_true",
                   help="list the prompts the config knows and exit: a toy world's configured (train) and held-out "
                        "prompts, else the config's prompt file (data.prompts)")
    p.add_argument("--image", default=None, help="editing backends: the reference image")
    p.add_argument("--instruction", default=None, help="editing backends: the edit instruction (the prompt)")
    p.add_argument("--seeds", default="0-15", help="noise seeds, e.g. 0-15, 3,7 or 0-3,9 (default 0-15)")
    p.add_argument("--steps", type=int, default=4,
                   help="K preview steps (= NFE; default 4); the solver needs a table for it")
    p.add_argument("--compare", default="", help="training-free solvers at the same K, e.g. ddim,dpmsolver++")
    p.add_argument("--out", default=None, help="output folder (default: preview/ beside the solver directory, i.e. <solver>/../preview)")
    p.add_argument("--columns", type=int, default=8, help="tiles per row of the contact sheet (default 8)")
    p.add_argument("--batch-size", type=int, default=None, help="previews per batched solve (default: all)")
    p.add_argument("--refine-all", action="store_true", help="also refine every seed (timings, reward of every preview)")
    p.add_argument("--final", action=argparse.BooleanOptionalAction, default=None,
                   help="add a last sheet row of full-step finals (the reference solve) and caption every preview with "
                        "its configured reward against its final (default: on for the toy backends, where the "
                        "reference solve is cheap; off elsewhere)")
    _common(p)
    return p


def refine_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="preview.py refine", description="Refine chosen seeds of a preview run.")
    p.add_argument("--manifest", required=True, help="manifest.json written by the preview step")
    p.add_argument("--seeds", required=True, help="seeds to refine, e.g. 3,7")
    p.add_argument("--steps", type=int, default=None, help="reference steps (default: the config's reference.num_steps)")
    p.add_argument("--prompt-index", type=int, default=None, help="only this prompt of the manifest (default: all)")
    p.add_argument("--exact", action="store_true",
                   help="solve in the make_shards batch shape, so finals equal the shard targets bit for bit on the "
                        "CPU (slower: a whole writer batch per solve); without it they agree to float rounding")
    _common(p)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings in the log")
    p.add_argument("--verbose", action="store_true", help="show every library's log lines and warnings")


class Bars:
    """Progress-bar factory for the library (``progress(desc, total) -> advance``)."""

    def __init__(self, disable: bool):
        self.disable, self.bars = disable, []

    def __call__(self, desc: str, total: int):
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="step", disable=self.disable, dynamic_ncols=True, leave=False)
        self.bars.append(bar)

        def advance(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()
        return advance

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


def _read_prompts(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompts {path!r} cannot be read ({err})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path!r} holds no prompt")
    return prompts


def _setup(args) -> Bars:
    from consolver.console import setup_console

    setup_console("preview", getattr(args, "verbose", False))
    if args.quiet:
        logging.getLogger("consolver").setLevel(logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return Bars(args.no_progress)


def run_preview(argv) -> dict:
    parser = preview_parser()
    args = parser.parse_intermixed_args(argv)
    if args.list_prompts:
        return list_prompts(args.config, args.overrides)
    if not args.solver:
        parser.error("the following arguments are required: --solver (or --list-prompts)")
    from tqdm.contrib.logging import logging_redirect_tqdm

    from consolver.preview import parse_seeds, preview_run

    seeds = parse_seeds(args.seeds)
    prompts = list(args.prompt) + (_read_prompts(args.prompts) if args.prompts else [])
    if args.instruction:
        prompts.append(args.instruction)
    compare = [c.strip() for c in args.compare.split(",") if c.strip()]
    bars = _setup(args)
    try:
        with logging_redirect_tqdm():
            manifest = preview_run(args.config, args.solver, prompts, seeds, args.steps, args.out,
                                   overrides=args.overrides, compare=compare, ref_image=args.image, columns=args.columns,
                                   batch_size=args.batch_size, refine_all=args.refine_all, final=args.final,
                                   progress=bars)
    finally:
        bars.close()
    t = manifest["timings"]
    out = Path(manifest["manifest_path"]).parent
    print(f"{t['previews']} previews at K={manifest['num_steps']} in {t['preview_seconds']:.3f} s "
          f"({1e3 * t['seconds_per_preview']:.1f} ms per preview, batched)")
    for name, seconds in t["compare_seconds"].items():
        print(f"  {name} at K={manifest['num_steps']}: {seconds:.3f} s")
    if manifest["final"]:
        rows = manifest["sheet_rows"]
        final_row = rows[-1]
        print(f"final row: {t['previews']} finals ({final_row['num_steps']}-step {final_row['solver']}) in "
              f"{t['final_row_seconds']:.3f} s")
        entries = manifest["entries"]
        key = next(iter(entries[0]["reward"]))
        for row in rows[:-1]:
            values = [e["reward"][key] if row["solver"] == rows[0]["solver"] else e["compare_reward"][row["solver"]][key]
                      for e in entries]
            print(f"  {row['solver']} K={manifest['num_steps']} vs final {key}: mean {sum(values) / len(values):.2f}, "
                  f"min {min(values):.2f}, max {max(values):.2f}")
    if "refine_all" in t:
        r = t["refine_all"]
        print(f"{r['refined']} finals at {r['final_steps']} steps in {r['refine_seconds']:.3f} s "
              f"({1e3 * r['seconds_per_final']:.1f} ms per final)")
        rewards = [e["reward"] for e in manifest["entries"]]
        for key in rewards[0]:
            values = [r[key] for r in rewards]
            print(f"  preview vs final {key}: mean {sum(values) / len(values):.2f}, min {min(values):.2f}, "
                  f"max {max(values):.2f}")
    print(f"wrote {out / manifest['sheet']} and {manifest['manifest_path']}")
    print(refine_hint(manifest))
    return manifest


def refine_hint(manifest: dict) -> str:
    """The refine command to try next, with (up to two) seeds that the manifest has."""
    seeds = ",".join(str(s) for s in manifest["seeds"][:2])
    return f"refine with: python tools/preview.py refine --manifest {manifest['manifest_path']} --seeds {seeds}"


def list_prompts(config: str, overrides) -> dict:
    """Print the prompts ``config`` knows (``--list-prompts``); returns the listing."""
    from consolver.config import load_config
    from consolver.preview.prompts import listing_lines, prompt_listing

    listing = prompt_listing(load_config(config, list(overrides)))
    for line in listing_lines(listing):
        print(line)
    return listing


def run_refine(argv) -> dict:
    args = refine_parser().parse_args(argv)
    from tqdm.contrib.logging import logging_redirect_tqdm

    from consolver.preview import parse_seeds, refine_run, report_lines

    seeds = parse_seeds(args.seeds)
    bars = _setup(args)
    try:
        with logging_redirect_tqdm():
            result = refine_run(args.manifest, seeds, num_steps=args.steps, prompt_index=args.prompt_index,
                                exact=args.exact, progress=bars)
    finally:
        bars.close()
    for line in report_lines(result):
        print(line)
    print(f"wrote {result['sheet']} and {len(result['entries'])} finals")
    return result


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "refine":
        return run_refine(argv[1:])
    if argv and argv[0] == "preview":
        argv = argv[1:]
    return run_preview(argv)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # bad paths, seeds, K or config (ConfigError): one line, no traceback
        sys.exit(f"preview: error: {err}")
