"""A trained solver in other runtimes than diffusers.

:mod:`consolver.integrations.k_diffusion`: k-diffusion's sampler contract, the one ComfyUI
(``KSAMPLER``, ``SIGMAS``) and A1111/Forge run their samplers through::

    from consolver.integrations.k_diffusion import load_sampler, load_sigmas
    sample = load_sampler("outputs/toy_depth/scheduler")
    sigmas = load_sigmas("outputs/toy_depth/scheduler", 4)
    x0 = sample(denoiser, noise * (1 + sigmas[0] ** 2) ** 0.5, sigmas)
"""
