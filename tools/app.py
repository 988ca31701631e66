"""Diffusion Preview in the browser: type a prompt, see many K-step previews, click one, get its final.

    python tools/app.py                                   # the main job's solver (else the base solver)
    python tools/app.py --solver outputs/toy_depth/scheduler --config conf/toy_depth.yaml
    python tools/app.py --config conf/sd15_depth.yaml --solver outputs/sd15_depth/scheduler --port 7861

A local web page (Gradio; pip install -e ".[app]") bound to 127.0.0.1 by default. With no
--solver it serves the main job's output (the config's <output_dir>/scheduler) if it exists, else
the base solver, and the page says which. One model instance serves every request, through a
queue of --concurrency slots; requests above the limits (--max-seeds, prompt length, the K values
the solver was trained for) are refused with a message in the page. Everything is written under
--out (default: app/ beside the solver directory, or <output_dir>/app), gradio's file cache
included: each preview run is a folder that `tools/preview.py refine --manifest
<run>/manifest.json` continues. Previews and
finals are bit for bit those of tools/preview.py for the same prompt, seeds and K on the same
machine. Positional key=value arguments override the config.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

# Only the standard library at import time: `--help` must answer at once. torch, gradio and
# consolver.app are imported after the arguments parse.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "toy_depth.yaml"
log = logging.getLogger("app")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. guidance=3")
    p.add_argument("--solver", default=None, help="trained scheduler directory (default: the main job's "
                                                  "<output_dir>/scheduler if it exists, else the base solver)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: conf/toy_depth.yaml)")
    p.add_argument("--out", default=None, help="output folder (default: app/ beside the solver directory, or "
                                               "<output_dir>/app)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--concurrency", type=int, default=1, help="model calls at once (default 1: one GPU's memory)")
    p.add_argument("--queue-size", type=int, default=32, help="requests that may wait (default 32)")
    p.add_argument("--max-seeds", type=int, default=64, help="seeds per request at most (default 64)")
    p.add_argument("--max-prompt-chars", type=int, default=300, help="prompt length at most (default 300)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--verbose", action="store_true", help="show every library's log lines and warnings")
    return p


def main(argv=None) -> None:
    args = parser().parse_intermixed_args(argv)
    start = time.perf_counter()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from consolver.console import setup_console

    setup_console("app", args.verbose)
    import importlib.util
    import threading

    if importlib.util.find_spec("gradio") is None:
        sys.exit('app: error: the app needs gradio: pip install -e ".[app]"')
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from consolver.app import Limits, PreviewService
    from consolver.app.ui import build_app, launch

    service = PreviewService(args.config, args.overrides, solver=args.solver, out=args.out,
                             limits=Limits(max_seeds=args.max_seeds, max_prompt_chars=args.max_prompt_chars))
    log.info("serving %s", service.choice.description)
    # gradio's own copies of served files go under the output folder too (read when gradio is imported)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(service.out / "gradio-cache"))
    demo = build_app(service)
    url = launch(demo, args.host, args.port, args.concurrency, args.queue_size, allowed=(str(service.out),), block=False)
    log.info("Diffusion Preview at %s (ready %.1f s after start; Ctrl+C stops it)", url, time.perf_counter() - start)
    threading.Thread(target=service.warm_up, name="warm-up", daemon=True).start()  # the reward network
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # bad paths, config, solver: one line, no traceback
        sys.exit(f"app: error: {err}")
