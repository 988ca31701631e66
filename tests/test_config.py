import pytest

from consolver.config import ConfigError, load_config, save_config


def test_defaults_file_and_overrides_layer(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("solver:\n  order: 3\nguidance: 5.0\n")
    cfg = load_config(path, ["guidance=2.5", "solver.num_steps=[4,8]"])
    assert cfg.solver.order == 3 and cfg.guidance == 2.5 and list(cfg.solver.num_steps) == [4, 8]
    assert cfg.backend.name == "toy"  # schema default
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize(
    "override,message",
    [
        ("solver.ordr=3", r"unknown config key 'solver.ordr' \(did you mean 'order'\?\); valid keys in SolverConfig: order, num_steps"),
        ("bogus=1", "valid keys in Config: backend, guidance"),
        ("rewards=[{name: depth, wieght: 2}]", r"did you mean 'weight'.*valid keys in RewardConfig"),
        ("solver.order=abc", "solver.order"),
        ("backend.name=sdxl", "backend.name='sdxl' is not valid; choose one of: toy"),
        ("solver.base_solver=heun", "ddim, adams_bashforth, ipndm"),
        ("reference.solver=dpm", "reference.solver='dpm' is not valid; choose one of: dpmsolver\\+\\+, unipc"),
        ("data.split=test", "data.split='test' is not valid; choose one of: train, heldout"),
        ("data.solve_batch_size=0", "data.solve_batch_size must be >= 1"),
    ],
)
def test_bad_keys_and_values_name_what_is_valid(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("does/not/exist.yaml")


def test_fixed_solver_orders_are_checked_at_load_time():
    with pytest.raises(ConfigError, match=r"orders 1..4.*solver.order=5.*solver.base_solver=ddim"):
        load_config(None, ["solver.base_solver=ipndm", "solver.order=5"])
    assert load_config(None, ["solver.base_solver=ddim", "solver.order=6"]).solver.order == 6
