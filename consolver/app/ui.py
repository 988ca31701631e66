"""The Diffusion Preview page: Gradio Blocks over :mod:`consolver.app.handlers`.

gradio is imported inside :func:`build_app` (an optional extra: ``pip install -e ".[app]"``).
Every model call runs through one queue with ``concurrency`` slots shared by previews and
refines (``concurrency_id="model"``), on the one :class:`~consolver.app.service.PreviewService`.
Endpoints for ``gradio_client``: ``/preview`` (prompt, [image], number of seeds, seed range, K,
compare) and ``/refine`` (seed), each in the caller's session. Refused requests show their
message in the page (``gr.Error``), never a traceback.
"""

import functools
import logging
import os
from types import SimpleNamespace
from typing import Callable

from consolver.app import handlers
from consolver.app.service import PAGE_COMPARE, PreviewService
from consolver.app.session import Session
from consolver.preview.core import COMPARE_NAMES, format_seeds

logger = logging.getLogger(__name__)

#: Small images (the toy's 32x32) stay crisp when the browser scales them up.
CSS = """
#gallery img, #picked-preview img, #final img { image-rendering: pixelated; }
#picked-preview img, #final img { min-width: 192px; min-height: 192px; object-fit: contain; }
#gallery .fixed-height { height: auto !important; min-height: 0 !important; max-height: none !important; }
#gallery .caption-label { max-width: 96%; white-space: normal; overflow: visible; line-height: 1.15; opacity: .85; }
#reward { text-align: center; }
"""
#: Concurrency group of every event that runs the model.
MODEL = "model"


def _page_errors(fn: Callable) -> Callable:
    """Run a handler; a refused request (``ValueError``, ``OSError``) becomes ``gr.Error`` with its
    message, any other failure a ``gr.Error`` naming it (the traceback goes to the server log)."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, OSError) as err:
            raise gr.Error(str(err), title="Cannot do that", print_exception=False) from None
        except Exception as err:  # noqa: BLE001 - shown in the page, logged in full here
            logger.exception("request failed")
            raise gr.Error(f"internal error ({type(err).__name__}: {err}); see the server log",
                           print_exception=False) from None
    return wrapper


def build_app(service: PreviewService):
    """The page (a ``gr.Blocks``) for ``service``; launch it with :func:`launch`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    with gr.Blocks(title="Diffusion Preview", analytics_enabled=False, fill_width=True) as demo:
        page = _layout(gr, service)
        _preview_events(gr, service, page)
        _refine_events(gr, service, page)
    return demo


def _layout(gr, service: PreviewService) -> SimpleNamespace:
    """The page's components, top to bottom (``elem_id`` s are what the browser test finds)."""
    ks, limits = service.num_steps, service.limits
    c = SimpleNamespace(session=gr.State(Session()), pick=None, image=None)
    gr.Markdown("# Diffusion Preview\nPreview many seeds in a few steps, click the one you like, get its "
                "full-step final from the same noise.")
    gr.Markdown(handlers.solver_markdown(service), elem_id="solver")
    with gr.Row():
        with gr.Column(scale=2):
            choices = service.prompt_choices()
            if choices:
                label = ("Configured edits" if service.editing else "Configured prompts") + (
                    " (held-out ones marked)" if service.cfg.backend.name == "toy" else "")
                c.pick = gr.Dropdown(choices=choices, value=None, label=label, elem_id="configured")
            if service.editing:
                c.image = gr.Image(type="numpy", label="Reference image", sources=["upload", "clipboard"],
                                   format="png", elem_id="reference", height=220)
            c.prompt = gr.Textbox(label="Edit instruction" if service.editing else "Prompt", lines=2,
                                  max_length=limits.max_prompt_chars, elem_id="prompt",
                                  placeholder="type a prompt, or pick one above")
        with gr.Column(scale=1):
            c.num_seeds = gr.Number(value=16, precision=0, label=f"Number of seeds (1-{limits.max_seeds})",
                                    elem_id="num-seeds")
            c.seed_range = gr.Textbox(label="or a seed range", placeholder="e.g. 100-115 (overrides the number)",
                                      elem_id="seed-range")
            c.steps = gr.Number(value=4 if 4 in ks else ks[0], precision=0, elem_id="steps",
                                label=f"K preview steps (this solver: {format_seeds(ks).replace(',', ', ')})")
            c.compare = gr.CheckboxGroup(choices=[(COMPARE_NAMES[n], n) for n in PAGE_COMPARE],
                                         label="Compare with (adds rows)", elem_id="compare")
            c.run = gr.Button("Preview", variant="primary", elem_id="preview-button")
    c.status = gr.Markdown(elem_id="status")
    c.gallery = gr.Gallery(label="Previews: click one to refine it", columns=8, allow_preview=False,
                           object_fit="contain", format="png", elem_id="gallery")
    with gr.Row(equal_height=True):
        c.picked = gr.Image(label="Picked preview", type="filepath", format="png", interactive=False,
                            elem_id="picked-preview", height=256)
        c.reward = gr.Markdown(elem_id="reward")
        c.final = gr.Image(label="Final (full steps, same noise)", type="filepath", format="png",
                           interactive=False, elem_id="final", height=256)
    with gr.Row():
        c.refine_seed = gr.Number(value=None, precision=0, label="Refine seed", elem_id="refine-seed", scale=1)
        c.refine = gr.Button("Refine this seed", elem_id="refine-button", scale=1)
        c.files = gr.File(label="Downloads (final PNG, manifest.json for tools/preview.py refine)",
                          file_count="multiple", interactive=False, elem_id="downloads", scale=3)
    c.running = gr.Markdown("No previews yet in this session.", elem_id="running")
    c.history = gr.Markdown("No picks yet: click a preview tile to refine it.", elem_id="history")
    return c


def _preview_events(gr, service: PreviewService, c: SimpleNamespace) -> None:
    """Preview (button, or Enter in the prompt): a quick check that shows a refusal at once, then
    the previews in the model queue. API: ``/preview``."""
    image = c.image
    inputs = [c.prompt] + ([image] if image is not None else []) + [c.num_seeds, c.seed_range, c.steps, c.compare,
                                                                    c.session]
    outputs = [c.gallery, c.status, c.running, c.files, c.picked, c.final, c.reward, c.session]

    def run(state, text, img, n, rng, K, comp, progress):
        out = handlers.on_preview(service, state, text, n, rng, K, comp or [], image=img,
                                  progress=handlers.progress_adapter(progress))
        return (gr.Gallery(value=out["gallery"], columns=out["columns"], selected_index=None), out["status"],
                out["running"], out["files"], None, None, "", state)

    # named parameters: they are the /preview endpoint's parameter names in gradio_client
    if image is None:
        @_page_errors
        def check(prompt, num_seeds, seed_range, num_steps, compare, state):
            handlers.check_preview(service, prompt, num_seeds, seed_range, num_steps, compare or [])

        @_page_errors
        def preview(prompt, num_seeds, seed_range, num_steps, compare, state, progress=gr.Progress()):
            return run(state, prompt, None, num_seeds, seed_range, num_steps, compare, progress)
    else:
        @_page_errors
        def check(prompt, image, num_seeds, seed_range, num_steps, compare, state):
            handlers.check_preview(service, prompt, num_seeds, seed_range, num_steps, compare or [], image)

        @_page_errors
        def preview(prompt, image, num_seeds, seed_range, num_steps, compare, state, progress=gr.Progress()):
            return run(state, prompt, image, num_seeds, seed_range, num_steps, compare, progress)

    for trigger, api in ((c.run.click, {"api_name": "preview"}), (c.prompt.submit, {"api_visibility": "private"})):
        trigger(check, inputs, None, concurrency_limit=None, api_visibility="private").success(
            preview, inputs, outputs, concurrency_id=MODEL, **api)
    if c.pick is not None:
        def fill(choice):  # a configured prompt (toy_edit: its instruction and reference image)
            ref = service.reference_for(choice)
            if ref is None:
                return (choice or "",) + ((None,) if image is not None else ())
            return (ref[1],) + ((ref[0],) if image is not None else ())
        c.pick.change(fill, [c.pick], [c.prompt] + ([image] if image is not None else []), queue=False,
                      api_visibility="private")


def _refine_events(gr, service: PreviewService, c: SimpleNamespace) -> None:
    """Refine a clicked tile (any row), or a typed seed (API: ``/refine``), in the model queue."""
    outputs = [c.picked, c.final, c.reward, c.files, c.history, c.running, c.session]

    def shown(out):
        return out["preview"], out["final"], out["reward"], out["files"], out["history"], out["running"], out["session"]

    @_page_errors
    def refine_tile(state, evt: gr.SelectData, progress=gr.Progress()):
        return shown(handlers.on_refine(service, state, tile=evt.index, progress=handlers.progress_adapter(progress)))

    @_page_errors
    def refine_by_seed(seed, state, progress=gr.Progress()):
        return shown(handlers.on_refine(service, state, seed=seed, progress=handlers.progress_adapter(progress)))

    c.gallery.select(refine_tile, [c.session], outputs, api_visibility="private", concurrency_id=MODEL)
    c.refine.click(refine_by_seed, [c.refine_seed, c.session], outputs, api_name="refine", concurrency_id=MODEL)


def launch(demo, host: str = "127.0.0.1", port: int | None = None, concurrency: int = 1, queue_size: int = 32,
           allowed: tuple = (), block: bool = True, quiet: bool = True):
    """Queue (``concurrency`` model calls at once, ``queue_size`` waiting) and serve ``demo`` on
    ``host:port``, never shared. ``allowed``: folders the page may download files from (the
    output folder). Returns the local URL; with ``block`` it serves until interrupted."""
    demo.queue(default_concurrency_limit=concurrency, max_size=queue_size)
    _, url, _ = demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, inbrowser=False,
                            prevent_thread_lock=True, show_error=False, quiet=quiet, allowed_paths=list(allowed),
                            css=CSS)
    if block:
        demo.block_thread()
    return url
