"""An embedded trained diffusion model for the toy world: a small class-conditional diffusers
``UNet2DModel`` on 3x32x32 toy scenes (pixel space, [-1, 1]), SD1.5's noise schedule,
epsilon prediction, a null class for classifier-free guidance.

- :mod:`.model`: the class list, the UNet and scheduler, the pipeline directory (save / load).
- :mod:`.training`: batches of fresh renders, the loss, EMA, the training loop.
- :mod:`.sampling`: classifier-free-guided sampling with a diffusers scheduler.
- :mod:`.quality`: sample quality against the prompt's labels (toy segmentation network).

``tools/train_toy_diffusion.py`` trains and writes ``data/toy_unet/``.
"""

from consolver.toy_diffusion.model import (DEFAULT_MODEL_DIR, SD15_SCHEDULE, ToyUNetSpec, build_scheduler,
                                           build_unet, default_class_prompts, load_pipeline, null_class_id,
                                           save_pipeline)

__all__ = ["DEFAULT_MODEL_DIR", "SD15_SCHEDULE", "ToyUNetSpec", "build_scheduler", "build_unet",
           "default_class_prompts", "load_pipeline", "null_class_id", "save_pipeline"]
