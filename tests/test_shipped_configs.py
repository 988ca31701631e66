"""Every shipped config validates (and names its backend's registry entry)."""

import pytest

from consolver.backends import BACKENDS
from consolver.config import load_config
from tests.training import ROOT

CONFIGS = sorted((ROOT / "conf").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.backend.name in BACKENDS
