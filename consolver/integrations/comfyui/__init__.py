"""ComfyUI custom nodes for a trained consolver solver (ComfyUI loads this folder from
``custom_nodes/``; consolver must be installed in ComfyUI's Python).

- ``ConsistencySolverSampler`` -> ``SAMPLER``: the solver's coefficient tables as a k-diffusion
  sampler (:func:`consolver.integrations.k_diffusion.load_sampler`), for ``SamplerCustom``.
- ``ConsistencySolverSigmas`` -> ``SIGMAS``: the solver's learned K-step grid at the model's own
  noise levels (:func:`consolver.integrations.k_diffusion.load_sigmas`).

Link it under a name other than ``consolver`` (ComfyUI imports a node folder by its name)::

    ln -s "$(python -c 'import consolver.integrations.comfyui as m, os; print(os.path.dirname(m.__file__))')" \\
        ComfyUI/custom_nodes/consolver_nodes
"""

from consolver.integrations.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
