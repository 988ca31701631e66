import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from consolver.policy import TimeMLPPolicy
from consolver.scheduler import ConsistencySolverScheduler
from consolver.solvers import fixed_table

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _toy_model(seed=0):
    """A smooth nonlinear stand-in for a denoiser: d = tanh(conv(x)) + t-dependent bias."""
    weight = torch.randn(4, 4, 1, 1, generator=torch.Generator().manual_seed(seed)) * 0.5

    def model(x, t):
        return torch.tanh(torch.nn.functional.conv2d(x, weight)) + float(t) / 1000.0

    return model


def _loop(scheduler, model, x, **set_kwargs):
    scheduler.set_timesteps(**set_kwargs)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# K divides T = 1000: diffusers' DDIM steps from t to t - T // K, which is the next trailing
# timestep only then (for K = 3, 6, 7 it steps to a time off its own grid; ours follows the grid).
@pytest.mark.parametrize("K", [1, 4, 5, 10, 20])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_table_reproduces_diffusers_ddim_over_a_whole_loop(K, set_alpha_to_one, prediction_type):
    ref = DDIMScheduler(**SD15, timestep_spacing="trailing", set_alpha_to_one=set_alpha_to_one, clip_sample=False,
                        prediction_type=prediction_type)
    ours = ConsistencySolverScheduler.from_config(ref.config)
    assert ours.config.prediction_type == prediction_type
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(K))
    out_ref = _loop(ref, _toy_model(), x, num_inference_steps=K)
    out = _loop(ours, _toy_model(), x, num_inference_steps=K)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert _rel(out, out_ref) <= 1e-5


@pytest.mark.parametrize("shift,K", [(1.0, 4), (3.0, 8)])
def test_euler_table_reproduces_flow_match_euler(shift, K):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ours = ConsistencySolverScheduler.from_config(ref.config)
    assert ours.config.schedule == "flow"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out_ref = _loop(ref, _toy_model(), x, num_inference_steps=K)
    out = _loop(ours, _toy_model(), x, num_inference_steps=K)
    torch.testing.assert_close(ours.timesteps, ref.timesteps)
    assert _rel(out, out_ref) <= 1e-5


def test_flux_style_sigmas_and_mu():
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    ours = ConsistencySolverScheduler.from_config(ref.config)
    sigmas = np.linspace(1.0, 1 / 5, 5)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    out_ref = _loop(ref, _toy_model(), x, sigmas=sigmas, mu=0.8)
    out = _loop(ours, _toy_model(), x, sigmas=sigmas, mu=0.8)
    assert _rel(out, out_ref) <= 1e-5
    with pytest.raises(ValueError, match="mu"):
        ours.set_timesteps(5)


def test_fp16_inputs_use_fp32_math_and_keep_dtype():
    half, full = (ConsistencySolverScheduler(solver_order=3, base_solver="adams_bashforth") for _ in range(2))
    half.set_timesteps(4)
    full.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7)).half()
    model = _toy_model()
    for t in half.timesteps:  # a whole loop: the multistep history is kept in fp32 too
        d = model(x.float(), t).half()
        out = half.step(d, t, x).prev_sample
        assert out.dtype == torch.float16
        # the same inputs in fp32 give the same step: fp32 math inside, one cast at the end
        assert torch.equal(out, full.step(d.float(), t, x.float()).prev_sample.half())
        x = out


def _tables_scheduler(**kwargs):
    sched = ConsistencySolverScheduler(solver_order=3, **kwargs)
    tables = {K: fixed_table("adams_bashforth", np.linspace(10, 0, K + 1), 3, 3) * 0.9 + 0.1 * fixed_table("ddim", np.zeros(K + 1), 1, 3)
              for K in (4, 6)}
    sched.set_coefficient_tables(tables)
    return sched, tables


def test_learned_tables_are_used_and_round_trip(tmp_path):
    sched, tables = _tables_scheduler()
    sched.save_pretrained(tmp_path)
    loaded = ConsistencySolverScheduler.from_pretrained(tmp_path)
    assert loaded.available_num_steps == [4, 6]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for K in (4, 6):
        assert torch.equal(_loop(sched, _toy_model(), x, num_inference_steps=K), _loop(loaded, _toy_model(), x, num_inference_steps=K))
    # the table really drives the step: it differs from the base solver
    base = ConsistencySolverScheduler(solver_order=3)
    assert not torch.allclose(_loop(base, _toy_model(), x, num_inference_steps=4), _loop(sched, _toy_model(), x, num_inference_steps=4))


def test_missing_K_lists_available_tables():
    sched, _ = _tables_scheduler()
    with pytest.raises(ValueError, match=r"K in \[4, 6\]"):
        sched.set_timesteps(5)


def test_invalid_tables_are_rejected():
    sched = ConsistencySolverScheduler(solver_order=2)
    with pytest.raises(ValueError, match="shape"):
        sched.set_coefficient_tables({3: np.ones((3, 3))})
    with pytest.raises(ValueError, match="does not exist"):
        sched.set_coefficient_tables({2: [[0.5, 0.5], [1.0, 0.0]]})
    # tables arriving through a config (from_pretrained / from_config) are checked as well
    with pytest.raises(ValueError, match="does not exist"):
        ConsistencySolverScheduler(solver_order=2, coefficient_tables={"2": [[0.5, 0.5], [1.0, 0.0]]})
    with pytest.raises(ValueError, match="shape"):
        ConsistencySolverScheduler(solver_order=3, coefficient_tables={"2": [[1.0, 0.0], [1.5, -0.5]]})


def test_policy_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    policy = TimeMLPPolicy(order=3, hidden=16)
    for p in policy.parameters():
        torch.nn.init.normal_(p, std=0.3)  # away from the zero init, so weights matter
    sched = ConsistencySolverScheduler(solver_order=3)
    sched.attach_policy(policy)
    sched.save_pretrained(tmp_path)
    assert (tmp_path / "policy.safetensors").is_file()
    loaded = ConsistencySolverScheduler.from_pretrained(tmp_path)
    for name, value in policy.state_dict().items():
        assert torch.equal(loaded.policy_module.state_dict()[name], value)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    a = _loop(sched, _toy_model(), x, num_inference_steps=5)
    b = _loop(loaded, _toy_model(), x, num_inference_steps=5)
    assert torch.equal(a, b)
    assert not torch.allclose(a, _loop(ConsistencySolverScheduler(solver_order=3), _toy_model(), x, num_inference_steps=5))
    # a sample-independent policy compiles into tables that give the same solve
    compiled = ConsistencySolverScheduler(solver_order=3)
    compiled.set_coefficient_tables(sched.compile_policy([5]))
    torch.testing.assert_close(_loop(compiled, _toy_model(), x, num_inference_steps=5), a, rtol=1e-5, atol=1e-6)


def test_policy_weights_missing_is_a_clear_error(tmp_path):
    sched = ConsistencySolverScheduler(solver_order=2)
    sched.attach_policy(TimeMLPPolicy(order=2))
    sched.save_pretrained(tmp_path)
    (tmp_path / "policy.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="policy.safetensors"):
        ConsistencySolverScheduler.from_pretrained(tmp_path)


def test_step_before_set_timesteps_and_past_the_end():
    sched = ConsistencySolverScheduler()
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 999, x)
    sched.set_timesteps(1)
    sched.step(x, sched.timesteps[0], x)
    with pytest.raises(ValueError, match="all 1 steps"):
        sched.step(x, sched.timesteps[0], x)


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="trailing, leading, linspace"):
        ConsistencySolverScheduler(timestep_spacing="uniform").set_timesteps(4)
    with pytest.raises(ValueError, match="vp, flow"):
        ConsistencySolverScheduler(schedule="edm")
    with pytest.raises(ValueError, match="linear, scaled_linear"):
        ConsistencySolverScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match="ddim, adams_bashforth, ipndm"):
        ConsistencySolverScheduler(base_solver="heun")
    with pytest.raises(ValueError, match="not `sigmas`"):
        ConsistencySolverScheduler().set_timesteps(sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="not both"):
        ConsistencySolverScheduler(schedule="flow").set_timesteps(timesteps=[1000.0, 500.0], sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="descending"):
        ConsistencySolverScheduler(schedule="flow").set_timesteps(timesteps=[500.0, 800.0])


@pytest.mark.parametrize("option", [{"rescale_betas_zero_snr": True}, {"use_karras_sigmas": True},
                                    {"shift_terminal": 0.1}, {"time_shift_type": "linear"}])
def test_configs_with_unsupported_noise_options_are_refused(option):
    cls = FlowMatchEulerDiscreteScheduler if "shift" in next(iter(option)) else DDIMScheduler
    config = dict(cls().config, **option)
    with pytest.raises(ValueError, match=next(iter(option))):
        ConsistencySolverScheduler.from_config(config)
    plain = dict(cls().config, **{k: None if k == "time_shift_type" else False for k in option})
    ConsistencySolverScheduler.from_config(plain)  # the same options switched off are fine


def test_flow_custom_timesteps_are_kept_exactly():
    sched = ConsistencySolverScheduler(schedule="flow")
    timesteps = [1000.0, 570.0, 290.0, 57.0]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    out = _loop(sched, _toy_model(), x, timesteps=timesteps)
    assert sched.timesteps.tolist() == timesteps and sched.step_index == 4
    torch.testing.assert_close(sched.sigmas, torch.tensor([1.0, 0.57, 0.29, 0.057, 0.0]))
    ref = FlowMatchEulerDiscreteScheduler()  # shift 1: its sigmas from timesteps are unshifted too
    torch.testing.assert_close(out, _loop(ref, _toy_model(), x, timesteps=timesteps), rtol=1e-5, atol=1e-6)


def test_set_timesteps_resets_state_and_custom_timesteps():
    sched = ConsistencySolverScheduler(solver_order=2, base_solver="adams_bashforth")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    first = _loop(sched, _toy_model(), x, timesteps=[999, 700, 400, 100])
    assert sched.timesteps.tolist() == [999, 700, 400, 100] and sched.step_index == 4
    assert torch.equal(first, _loop(sched, _toy_model(), x, timesteps=[999, 700, 400, 100]))
    with pytest.raises(ValueError, match="descending"):
        sched.set_timesteps(timesteps=[100, 400])


def test_multistep_beats_ddim_on_a_gaussian_with_real_timesteps():
    """Data N(mu, c^2): exact PF-ODE; AB3 on SD1.5 trailing timesteps is far closer than DDIM."""
    mu, c = 0.5, 0.5
    z = torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ref = ConsistencySolverScheduler()
    abar = ref.vp_schedule.alphas_cumprod

    def eps(x, t):
        a2 = abar[int(t)]
        return (1 - a2).sqrt() * (x - a2.sqrt() * mu) / (a2 * c * c + 1 - a2)

    x_T = abar[999].sqrt() * mu + (abar[999] * c * c + 1 - abar[999]).sqrt() * z
    exact = mu + c * z  # set_alpha_to_one: the final step lands on x0
    errors = {}
    for name, order in (("ddim", 1), ("adams_bashforth", 3)):
        sched = ConsistencySolverScheduler(solver_order=order, base_solver=name)
        errors[name] = _rel(_loop(sched, eps, x_T.float(), num_inference_steps=10).double(), exact)
    assert errors["adams_bashforth"] < 0.5 * errors["ddim"], errors


def test_add_noise_vp_and_flow():
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    vp = ConsistencySolverScheduler()
    abar = vp.alphas_cumprod[500]
    torch.testing.assert_close(vp.add_noise(x0, noise, torch.tensor([500, 500])), abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    flow = ConsistencySolverScheduler(schedule="flow")
    flow.set_timesteps(4)
    s = float(flow.sigmas[1])
    torch.testing.assert_close(flow.scale_noise(x0, flow.timesteps[1:2], noise), (1 - s) * x0 + s * noise)


def _edit_config(directory, **changes):
    import json

    path = directory / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))  # json writes NaN/Infinity as they arrive from other tools


def test_non_finite_values_in_a_saved_config_are_refused_naming_the_key(tmp_path):
    sched, _ = _tables_scheduler()
    sched.save_pretrained(tmp_path)
    tables = dict(sched.config.coefficient_tables)
    tables["6"] = [row[:] for row in tables["6"]]
    tables["6"][2][1] = float("nan")
    _edit_config(tmp_path, coefficient_tables=tables)
    with pytest.raises(ValueError, match=r"table for K=6 has non-finite entries \(NaN or inf\) in rows \[2\]"):
        ConsistencySolverScheduler.from_pretrained(tmp_path)
    for key, value, message in (("beta_end", float("inf"), "beta_end must be a finite number"),
                                ("trained_betas", [0.01] * 999 + [float("nan")], "trained_betas has non-finite values"),
                                ("trained_betas", [0.01] * 10, "trained_betas has 10 values but num_train_timesteps=1000")):
        ConsistencySolverScheduler(solver_order=3).save_pretrained(tmp_path / key)
        _edit_config(tmp_path / key, **{key: value})
        with pytest.raises(ValueError, match=message):
            ConsistencySolverScheduler.from_pretrained(tmp_path / key)
    with pytest.raises(ValueError, match="flow-matching shift must be > 0"):
        ConsistencySolverScheduler(schedule="flow", shift=0.0)
    with pytest.raises(ValueError, match="scheduler config max_shift=nan is not a finite number"):
        ConsistencySolverScheduler(schedule="flow", use_dynamic_shifting=True, max_shift=float("nan"))


def test_malformed_tables_in_the_constructor_name_their_K():
    with pytest.raises(ValueError, match=r"table for K=2 is ragged"):
        ConsistencySolverScheduler(solver_order=2, coefficient_tables={"2": [[1.0, 0.0], [1.5]]})
    with pytest.raises(ValueError, match=r"table for K=2 has an entry that is not a number"):
        ConsistencySolverScheduler(solver_order=2, coefficient_tables={"2": [[1.0, 0.0], ["a", -0.5]]})
    with pytest.raises(ValueError, match=r"table key 'K4' is not a number of steps K"):
        ConsistencySolverScheduler(solver_order=2, coefficient_tables={"K4": [[1.0, 0.0]] * 4})


def test_policy_order_must_match_solver_order_when_loading(tmp_path):
    sched = ConsistencySolverScheduler(solver_order=2)
    sched.attach_policy(TimeMLPPolicy(order=2))
    sched.save_pretrained(tmp_path)
    _edit_config(tmp_path, solver_order=3)
    with pytest.raises(ValueError, match="policy order 2 != scheduler solver_order 3"):
        ConsistencySolverScheduler.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="policy order 4 != scheduler solver_order 2"):
        ConsistencySolverScheduler(solver_order=2, policy={"name": "time_mlp", "kwargs": {"order": 4}})
