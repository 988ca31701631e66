from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "conf" / "toy_depth.yaml"  # rewards: [{name: toy_depth, weight: 1.0}]


def test_index_overrides_into_lists():
    cfg = load_config(TOY, ["rewards.0.name=toy_seg", "rewards[0].weight=2", "solver.num_steps.0=8"])
    assert [(r.name, r.weight) for r in cfg.rewards] == [("toy_seg", 2.0)] and list(cfg.solver.num_steps) == [8, 4, 5, 6, 7, 8]
    # an index that is not there: the message shows the list syntax, with the current list
    with pytest.raises(ConfigError, match=r"rewards has no entry '1' \(it has 1: rewards\[0\]\).*"
                                          r"list syntax, e.g. 'rewards=\[\{name: toy_depth, weight: 1.0\}\]'"):
        load_config(TOY, ["rewards.1.name=toy_seg"])
    with pytest.raises(ConfigError, match=r"rewards has no entry '0' \(it is empty\).*'rewards=\[\{name: \.\.\.\}\]'"):
        load_config(None, ["rewards.0.name=toy_seg"])
    with pytest.raises(ConfigError, match=r"unknown config key 'rewards\[0\].nme' \(did you mean 'name'\?\)"):
        load_config(TOY, ["rewards.0.nme=toy_seg"])


def test_keys_inside_lists_are_named_by_their_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rewards:\n  - name: toy_depth\n  - nme: toy_seg\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'rewards\[1\].nme' \(did you mean 'name'\?\); "
                                          r"valid keys in RewardConfig"):
        load_config(path)
    path.write_text("rewards:\n  - name: toy_depth\n    weight: 1.0\n  - name: toy_seg\n    weight: heavy\n")
    with pytest.raises(ConfigError, match=r"invalid config value for 'rewards\[1\].weight'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown config key 'rewards\[0\].wieght'"):
        load_config(None, ["rewards=[{name: toy_depth, wieght: 2}]"])


@pytest.mark.parametrize("text,message", [
    ("solver:\n  order: [3,\nguidance: 2\n",
     r"line 4, column 1: invalid YAML: did not find expected ',' or '\]' \(while parsing a flow sequence started at line 2\)"),
    ("solver:\n  order: 3\nsolver:\n  order: 4\n", r"line 3, column 1: invalid YAML: found duplicate key solver"),
    ("- solver\n- data\n", r"must be a mapping of config keys .* at its top level, not a list"),
    ("rewards:\n  name: toy_depth\n", r"'rewards' has the wrong shape .* lists are written as '- item' lines"),
])
def test_yaml_errors_are_one_line_naming_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"config file '{path}'.*{message}") as err:
        load_config(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override,key", [("guidance=nan", "guidance"), ("guidance=-inf", "guidance"),
                                          ("rewards=[{name: toy_depth, weight: .nan}]", r"rewards\[0\].weight"),
                                          ("backend.toy.component_std=inf", "backend.toy.component_std")])
def test_non_finite_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}=-?(nan|inf) is not a finite number"):
        load_config(None, [override])


def test_non_finite_check_covers_sections_added_later():
    from omegaconf import OmegaConf

    from consolver.config import validate

    cfg = load_config(None)
    OmegaConf.set_struct(cfg, False)
    cfg.experimental = {"optim": [{"lr": float("nan")}]}
    with pytest.raises(ConfigError, match=r"experimental.optim\[0\].lr=nan is not a finite number"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"algo.clip_epsilon=nan is not a finite number"):
        load_config(None, ["algo.clip_epsilon=nan"])


def test_cuda_device_without_a_gpu_names_the_key(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"backend.device='cuda' but no CUDA GPU is available.*backend.device=cpu"):
        load_config(None, ["backend.device=cuda"])
    with pytest.raises(ConfigError, match=r"backend.device='gpu' is not valid; choose one of: auto, cpu, cuda, cuda:N"):
        load_config(None, ["backend.device=gpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert load_config(None, ["backend.device=cuda:0"]).backend.device == "cuda:0"
    with pytest.raises(ConfigError, match=r"backend.device='cuda:1' but this machine has 1 CUDA device\(s\)"):
        load_config(None, ["backend.device=cuda:1"])


def test_registered_pretrained_backend_without_model_names_backend_model(monkeypatch):
    from consolver import backends

    monkeypatch.setitem(backends.BACKENDS, "sd15", "consolver.backends.sd15:SD15Backend")
    # the toy-only dtype check must not pre-empt it
    with pytest.raises(ConfigError, match=r"backend.model must name a hub id or local directory for backend 'sd15'"):
        load_config(None, ["backend.name=sd15", "backend.dtype=float16"])


@pytest.mark.parametrize("override,message", [
    ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
    ("data.shuffle_buffer=-5", "data.shuffle_buffer must be >= 0, got -5"),
    ("backend.dtype=float16", r"backend.dtype='float16' has no effect on the toy backend .* set backend.dtype=float32"),
])
def test_meaningless_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("policy.name=mlp", r"solver.learn_timesteps=true needs policy.name=table and policy.distribution=gaussian \(got mlp, gaussian\)"),
    ("policy.distribution=bins", r"\(got table, bins\)"),
])
def test_learned_grids_need_the_gaussian_table_policy(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["solver.learn_timesteps=true", override])
    load_config(None, ["solver.learn_timesteps=false", override])  # fine without learned grids


def test_distill_coef_is_for_the_rl_algorithms():
    with pytest.raises(ConfigError, match=r"algo.distill_coef=0.5 must be >= 0 and is for ppo/grpo/rloo"):
        load_config(None, ["algo.name=distill", "algo.distill_coef=0.5"])
    assert load_config(None, ["algo.distill_coef=0.5"]).algo.distill_coef == 0.5
