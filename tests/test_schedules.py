import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from consolver.schedules import FlowMatchingSchedule, VPSchedule, flux_mu, make_betas, vp_timesteps


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_match_diffusers(name):
    ref = DDIMScheduler(beta_schedule=name, beta_start=0.00085, beta_end=0.012)
    ours = make_betas(name, 0.00085, 0.012, 1000)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours.float(), ref.betas, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("K", [1, 4, 5, 7, 40])
def test_timestep_spacings_match_diffusers(spacing, K):
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref.set_timesteps(K)
    ours = vp_timesteps(K, 1000, spacing, steps_offset=1 if spacing == "leading" else 0)
    assert ours.tolist() == ref.timesteps.tolist()


def test_sd15_schedule_values():
    sched = VPSchedule.sd15()
    a, s = sched.alpha_sigma(torch.tensor([0, 999, -1]))
    torch.testing.assert_close(a**2 + s**2, torch.ones(3, dtype=torch.float64))
    assert abs(float(a[0] ** 2) - (1 - 0.00085)) < 1e-12
    assert float(s[2]) == 0.0 and float(a[2]) == 1.0  # final step lands on x0
    assert float(sched.rho(torch.tensor([999]))) == pytest.approx(14.6, rel=0.01)
    assert VPSchedule.sd15(set_alpha_to_one=False).final_alphas_cumprod == float(sched.alphas_cumprod[0])
    lam = sched.lambdas(torch.arange(999, -1, -1))
    assert torch.all(torch.diff(lam) > 0)  # half log-SNR increases towards the data


def test_unknown_names_list_valid_values():
    with pytest.raises(ValueError, match="trailing, leading, linspace"):
        vp_timesteps(4, 1000, "uniform")
    with pytest.raises(ValueError, match="linear, scaled_linear, squaredcos_cap_v2"):
        make_betas("cosine")
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        vp_timesteps(0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sigmas_match_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(8)
    ours = FlowMatchingSchedule(shift=shift).sigmas(8)
    assert ours[-1] == 0.0 and ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref.sigmas.double().numpy(), rtol=1e-6, atol=1e-7)


def test_flow_dynamic_shift_matches_diffusers():
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mu = flux_mu(4096)
    assert mu == pytest.approx(1.15)
    sigmas = np.linspace(1.0, 1 / 6, 6)
    ref.set_timesteps(sigmas=sigmas, mu=mu)
    ours = FlowMatchingSchedule(use_dynamic_shifting=True).sigmas(sigmas=sigmas, mu=mu)
    np.testing.assert_allclose(ours, ref.sigmas.double().numpy(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="mu"):
        FlowMatchingSchedule(use_dynamic_shifting=True).sigmas(6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(beta_end=-0.01), r"beta_end must be a number in \[0, 1\), got -0.01"),
    (dict(beta_start=float("nan")), "beta_start must be a finite number, got nan"),
    (dict(beta_end=float("inf")), "beta_end must be a finite number, got inf"),
    (dict(num_train_timesteps=0), "num_train_timesteps must be a positive integer, got 0"),
])
def test_bad_beta_parameters_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VPSchedule.from_betas(**kwargs)


def test_trained_betas_are_checked():
    good = make_betas("scaled_linear", 0.00085, 0.012, 1000)
    assert torch.equal(VPSchedule.from_betas(trained_betas=good.tolist()).alphas_cumprod, VPSchedule.sd15().alphas_cumprod)
    with pytest.raises(ValueError, match=r"trained_betas has 999 values but num_train_timesteps=1000"):
        VPSchedule.from_betas(trained_betas=good[:999].tolist())
    with pytest.raises(ValueError, match=r"trained_betas has non-finite values \(NaN or inf\) at indices \[3\]"):
        VPSchedule.from_betas(trained_betas=[0.01, 0.01, 0.01, float("nan")], num_train_timesteps=4)
    with pytest.raises(ValueError, match=r"trained_betas must lie in \[0, 1\); index 1 is 1.5"):
        VPSchedule.from_betas(trained_betas=[0.01, 1.5], num_train_timesteps=2)
    with pytest.raises(ValueError, match="trained_betas must be a flat"):
        VPSchedule.from_betas(trained_betas=[[0.01, 0.02]], num_train_timesteps=2)


@pytest.mark.parametrize("shift,message", [(0.0, "shift must be > 0, got 0.0"), (-2.0, "shift must be > 0, got -2.0"),
                                           (float("nan"), "shift must be a finite number, got nan")])
def test_flow_shift_must_be_positive_and_finite(shift, message):
    with pytest.raises(ValueError, match=message):
        FlowMatchingSchedule(shift=shift)
