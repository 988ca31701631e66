"""Every shipped conf/*.yaml loads and validates without building a model; the SD1.5 configs
describe the paper's run."""

from __future__ import annotations

from pathlib import Path

import pytest

from consolver.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "conf").glob("*.yaml"))
SD15_REWARDS = {"sd15_depth": "depth", "sd15_seg": "segformer", "sd15_clip": "clip", "sd15_dino": "dino"}


def test_the_sd15_configs_are_shipped():
    assert set(SD15_REWARDS) <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_validates(path):
    from consolver.rewards import registered_rewards

    from consolver.backends import BACKENDS

    cfg = load_config(path)  # validate() runs inside; no backend or reward is built
    assert cfg.backend.name in BACKENDS
    assert {r.name for r in cfg.rewards} <= set(registered_rewards())
    if cfg.data.prompts is not None and cfg.data.prompts.startswith("data/"):  # shipped lists exist; others are the user's
        assert (ROOT / cfg.data.prompts).is_file(), cfg.data.prompts


@pytest.mark.parametrize("name", sorted(SD15_REWARDS))
def test_sd15_config_is_the_papers_run(name):
    cfg = load_config(ROOT / "conf" / f"{name}.yaml")
    assert cfg.backend.name == "sd15" and cfg.backend.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.backend.resolution == 512 and cfg.backend.dtype == "float16" and cfg.backend.device == "auto"
    assert cfg.solver.order == 4 and list(cfg.solver.num_steps) == list(range(2, 16))
    assert cfg.solver.timestep_spacing == "trailing" and cfg.guidance == 3.0
    assert (cfg.reference.solver, cfg.reference.num_steps) == ("dpmsolver++", 40)
    assert [r.name for r in cfg.rewards] == [SD15_REWARDS[name]] and cfg.rewards[0].model
    prompts = (ROOT / cfg.data.prompts).read_text(encoding="utf-8").splitlines()
    assert 100 <= len([p for p in prompts if p.strip()]) <= 200 and len(set(prompts)) == len(prompts)


@pytest.mark.parametrize("override,message", [
    ("backend.decode_chunk=0", r"backend.decode_chunk must be >= 1, got 0"),
    ("backend.resolution=500", r"backend.resolution=500 must be a multiple of 8 for the sd15 backend"),
])
def test_sd15_memory_and_shape_keys_are_checked(override, message):
    from consolver.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "conf" / "sd15_depth.yaml", [override])
