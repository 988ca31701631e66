from setuptools import find_packages, setup

K_DIFFUSION = "k-diffusion>=0.0.16,<0.1"

setup(
    name="consolver",
    version="0.1.0",
    description=(
        "ConsistencySolver: a learnable multistep ODE solver for pretrained diffusion "
        "models, trained with reinforcement learning for faithful few-step previews."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["consolver", "consolver.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "lightning>=2.1",
        "torchrl",
        "tensordict",
        "diffusers>=0.30",
        "accelerate",  # diffusers loads large models with less memory through it
        "transformers>=4.40",
        "webdataset>=0.2.86",
        "omegaconf>=2.3",
        "tensorboard",
        "segmentation-models-pytorch>=0.3",
        "safetensors",
        "tqdm",
        "matplotlib",
        "numpy",
        "pillow",
    ],
    extras_require={
        "parquet": ["pyarrow"],
        # FID/KID in tools/evaluate.py (consolver.evaluation.fid); weights from a local file only
        "fid": ["torchmetrics>=1.4", "torch-fidelity>=0.3"],
        # k-diffusion itself, to run a solver through its samplers (consolver.integrations.k_diffusion
        # needs none of it); 0.1.x depends on dctorch, which pins numpy<2
        "k-diffusion": [K_DIFFUSION],
        # the Diffusion Preview web app (tools/app.py, consolver.app.ui)
        "app": ["gradio>=6,<7"],
        # the app's tests drive Debian's chromium (apt-get install chromium) with Playwright; never `playwright install`
        "test": ["pytest>=7", "pytest-timeout", "pyarrow", "torchmetrics>=1.4", "torch-fidelity>=0.3", K_DIFFUSION,
                 "gradio>=6,<7", "gradio_client", "playwright"],
    },
)
