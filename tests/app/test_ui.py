"""The page's API through gradio_client (consolver.app.ui): /preview and /refine in one session,
finals equal to consolver.preview.refine, refused requests as messages, one queue for the model,
no file path accepted from the browser. The page is served from this process (tests/app/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from consolver.config import load_config
from consolver.data.format import to_uint8_hwc
from consolver.preview import make_previews, refine
from tests.app.conftest import PROMPT, SMALL, TOY, require

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def client(app):
    require("gradio_client")
    from gradio_client import Client

    return Client(app[0], verbose=False, download_files=True)


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_preview_then_refine_through_the_api(client, service):
    gallery, status, running, files, *_ = client.predict(PROMPT, 6, "", 4, ["ddim"], api_name="/preview")
    tiles = gallery["value"]
    assert len(tiles) == 12 and [t["caption"].split(" · ")[0] for t in tiles[:6]] == [f"seed {s}" for s in range(6)]
    assert all(t["caption"].startswith("DDIM · seed") for t in tiles[6:])
    cfg = load_config(TOY, SMALL)
    expected = make_previews(cfg, service.solver, [PROMPT], range(6), 4)
    for b, tile in enumerate(tiles[:6]):  # the previews the library makes for the same seeds, pixel for pixel
        assert np.array_equal(_png(tile["image"]), to_uint8_hwc(expected.images[b:b + 1])[0])
    assert "6 previews of" in status and sorted(Path(f).name for f in files) == ["contact_sheet.png", "manifest.json"]
    picked, final, reward, downloads, history, running, *_ = client.predict(4, api_name="/refine")
    finals = refine(cfg, [PROMPT], [4])
    assert np.array_equal(_png(final), to_uint8_hwc(finals.images)[0])
    assert np.array_equal(_png(picked), _png(tiles[4]["image"]))
    assert "`pixel_psnr`" in reward and "| 1 | an orange circle on the right | 4 |" in history
    assert "refining all 6 previewed seeds" in running
    assert sorted(Path(f).suffix for f in downloads) == [".json", ".png"]


@pytest.mark.parametrize("args,message", [
    ((PROMPT, 8, "", 9, []), "K=9 is not available: the solver serves K in 3, 4, 5"),
    ((PROMPT, 500, "", 4, []), "number of seeds must be a whole number from 1 to 64, got 500"),
    (("a plaid circle", 8, "", 4, []), "plaid"),
    ((PROMPT, 8, "", 4, ["heun"]), "'heun' .* is not in the list of choices: \\['ddim', 'dpmsolver\\+\\+'\\]"),
])
def test_refused_requests_say_why(client, args, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message) as err:
        client.predict(*args, api_name="/preview")
    assert "Traceback" not in str(err.value)


def test_one_queue_for_the_model_and_no_paths_from_the_browser(app, client, service):
    import gradio as gr

    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(api) == {"/preview", "/refine"}
    assert [p["parameter_name"] for p in api["/preview"]["parameters"]] == [
        "prompt", "num_seeds", "seed_range", "num_steps", "compare"]
    demo = app[1]
    model = [fn for fn in demo.fns.values() if fn.concurrency_id == "model"]
    assert {fn.name for fn in model} == {"preview", "refine_tile", "refine_by_seed"}
    queue = demo._queue.event_queue_per_concurrency_id["model"]  # one queue: previews and refines together
    assert queue.concurrency_limit == 1 and not service.lock.locked()
    for fn in demo.fns.values():  # inputs are text, numbers, choices and state: never a path or a file
        assert not any(isinstance(c, (gr.File, gr.UploadButton)) for c in fn.inputs)
        assert all(getattr(c, "type", None) != "filepath" for c in fn.inputs)
