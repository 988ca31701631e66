"""The two ComfyUI nodes: thin wrappers over :mod:`consolver.integrations.k_diffusion`. ComfyUI's
own modules are imported when a node runs, so importing this module needs no ComfyUI."""

from __future__ import annotations

from consolver.integrations.k_diffusion import load_sampler, load_sigmas

SOLVER_DIR = ("STRING", {"default": "outputs/toy_depth/scheduler", "multiline": False,
                         "tooltip": "the exported solver directory (training writes <output_dir>/scheduler/)"})


class ConsistencySolverSampler:
    """``SAMPLER`` that solves with the solver's coefficient tables (K = len(sigmas) - 1)."""

    CATEGORY = "sampling/custom_sampling/samplers"
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"solver_dir": SOLVER_DIR}}

    def get_sampler(self, solver_dir: str):
        from comfy.samplers import KSAMPLER

        return (KSAMPLER(load_sampler(solver_dir)),)


class ConsistencySolverSigmas:
    """``SIGMAS`` of the solver's learned K-step grid at the model's noise levels."""

    CATEGORY = "sampling/custom_sampling/schedulers"
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "solver_dir": SOLVER_DIR,
                             "steps": ("INT", {"default": 4, "min": 1, "max": 1000})}}

    def get_sigmas(self, model, solver_dir: str, steps: int):
        return (load_sigmas(solver_dir, steps, model_sampling=model.get_model_object("model_sampling")),)


NODE_CLASS_MAPPINGS = {"ConsistencySolverSampler": ConsistencySolverSampler,
                       "ConsistencySolverSigmas": ConsistencySolverSigmas}
NODE_DISPLAY_NAME_MAPPINGS = {"ConsistencySolverSampler": "ConsistencySolver sampler",
                              "ConsistencySolverSigmas": "ConsistencySolver sigmas"}
