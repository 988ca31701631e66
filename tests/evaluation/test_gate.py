"""The validation gate at export: a K that loses to a training-free solver is refused or falls back."""

import numpy as np
import pytest

from consolver.backends import build_backend
from consolver.config import ConfigError, load_config
from consolver.evaluation.gate import VALIDATION_SEED_OFFSET, validate_scheduler
from consolver.scheduler import ConsistencySolverScheduler

CORRUPT_K3 = np.array([[1.0, 0.0], [3.0, -2.0], [1.0, 0.0]])  # its middle step overshoots: far behind
DDIM_K4 = np.array([[1.0, 0.0]] * 4)
GOOD_GRID_K4 = [999, 882, 647, 26]  # DDIM on this grid beats UniPC on the trailing one (RL_NOTES)


def _cfg(gate):
    return load_config("conf/toy_depth.yaml", [f"validation.gate={gate}", "validation.num_samples=16",
                                               "reference.num_steps=12", "backend.toy.num_train_prompts=4",
                                               "backend.toy.num_heldout_prompts=2", "backend.toy.renders_per_prompt=16"])


@pytest.fixture(scope="module")
def backend():
    return build_backend(_cfg("fallback").backend)


def _solver():
    scheduler = ConsistencySolverScheduler(solver_order=2)
    scheduler.set_coefficient_tables({3: CORRUPT_K3, 4: DDIM_K4})
    scheduler.set_step_grids({4: GOOD_GRID_K4})
    return scheduler


@pytest.mark.slow
def test_fallback_gives_a_losing_k_the_base_table_and_records_the_scores(backend, tmp_path):
    scheduler = _solver()
    with pytest.warns(UserWarning, match=r"K=\[3\] lost .* exported with the base solver's table"):
        record = validate_scheduler(_cfg("fallback"), scheduler, backend=backend)
    assert record["num_steps"]["3"]["verdict"] == "base solver" and record["num_steps"]["3"]["loses"]
    assert record["num_steps"]["4"]["verdict"] == "kept" and not record["num_steps"]["4"]["loses"]
    psnr3 = record["num_steps"]["3"]["pixel_psnr"]
    assert psnr3["gap"] < -psnr3["gap_se"] and psnr3["best"] in record["rivals"]
    assert record["metrics"] == ["mode_agreement", "pixel_psnr"] and record["num_samples"] == 16
    assert record["seed"] == VALIDATION_SEED_OFFSET and record["world"] == "heldout"
    tables = scheduler.learned_tables
    np.testing.assert_array_equal(tables[3], [[1.0, 0.0]] * 3)  # DDIM, the base solver
    np.testing.assert_array_equal(tables[4], DDIM_K4)
    assert list(scheduler.step_grids) == [4]  # K=3 solves on the configured spacing again
    scheduler.save_pretrained(tmp_path)
    loaded = ConsistencySolverScheduler.from_pretrained(tmp_path)
    assert loaded.config.validation == record
    np.testing.assert_array_equal(loaded.learned_tables[3], tables[3])


@pytest.mark.slow
def test_drop_refuses_the_losing_k_and_report_keeps_it(backend):
    dropped = _solver()
    with pytest.warns(UserWarning, match="not exported"):
        validate_scheduler(_cfg("drop"), dropped, backend=backend)
    assert dropped.available_num_steps == [4]
    with pytest.raises(ValueError, match=r"\[4\]"):
        dropped.set_timesteps(3)
    kept = _solver()
    with pytest.warns(UserWarning, match="kept anyway"):
        record = validate_scheduler(_cfg("report"), kept, backend=backend)
    np.testing.assert_array_equal(kept.learned_tables[3], CORRUPT_K3)
    assert record["num_steps"]["3"]["verdict"] == "kept" and record["num_steps"]["3"]["loses"]


def test_gate_config_is_checked():
    with pytest.raises(ConfigError, match="validation.gate='fall' is not valid; choose one of: off, report, fallback, drop"):
        load_config("conf/toy_depth.yaml", ["validation.gate=fall"])
    with pytest.raises(ConfigError, match="validation.world='nowhere' is not valid"):
        load_config("conf/toy_depth.yaml", ["validation.world=nowhere"])


def test_gate_off_reads_as_off_in_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("validation:\n  gate: off\n")
    assert load_config(path).validation.gate == "off"
    assert load_config("conf/toy_depth.yaml", ["validation.gate=off"]).validation.gate == "off"


def test_fallback_never_trades_a_k_for_a_base_solver_behind_it():
    from consolver.evaluation.gate import gate_verdicts

    scores = {3: {"loses": True, "base_not_behind": True}, 4: {"loses": True, "base_not_behind": False},
              5: {"loses": False, "base_not_behind": True}}
    assert gate_verdicts(scores, "fallback") == {3: "base solver", 4: "kept: base behind", 5: "kept"}
    assert gate_verdicts(scores, "drop") == {3: "dropped", 4: "dropped", 5: "kept"}
    assert gate_verdicts(scores, "report") == {3: "kept", 4: "kept", 5: "kept"}


@pytest.mark.slow
def test_a_k_below_the_k_before_it_is_recorded_and_warned_about(backend):
    scheduler = ConsistencySolverScheduler(solver_order=2)
    scheduler.set_coefficient_tables({3: np.array([[1.0, 0.0]] * 3), 4: np.array([[1.0, 0.0], [6.0, -5.0], [6.0, -5.0],
                                                                                  [1.0, 0.0]])})
    with pytest.warns(UserWarning, match=r"quality falls with K on heldout \(K=4 below K=3 on mode_agreement"):
        record = validate_scheduler(_cfg("report"), scheduler, backend=backend)
    assert [(f["K"], f["metric"]) for f in record["falls"]] == [(4, "mode_agreement"), (4, "pixel_psnr")]
    assert record["falls"][0]["drop"] > record["falls"][0]["se"] > 0
