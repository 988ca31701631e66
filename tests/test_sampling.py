import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from tensordict import TensorDict

from consolver.backends.base import Backend, apply_guidance
from consolver.sampling import make_scheduler, sample
from consolver.scheduler import ConsistencySolverScheduler
from consolver.schedules import FlowMatchingSchedule, VPSchedule

MU, C = 0.5, 0.5


class GaussianBackend(Backend):
    """Data N(MU * sign, C^2) per 'prompt' sign; exact epsilon / velocity in closed form."""

    name = "gaussian"
    latent_shape = (2, 4, 4)
    resolution = 4

    def __init__(self, schedule):
        self.schedule = schedule

    def encode(self, prompts, ref_images=None):
        sign = torch.tensor([1.0 if p == "plus" else -1.0 for p in prompts])
        return TensorDict({"sign": sign}, batch_size=[len(prompts)])

    def _a_s(self, t):
        if self.schedule.kind == "vp":
            a, s = self.schedule.alpha_sigma(torch.as_tensor(t).long())
        else:
            a, s = self.schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float64) / 1000)
        return a.float(), s.float()

    def predict(self, x, t, cond, guidance):
        a, s = self._a_s(t)
        var = a * a * C * C + s * s

        def x0_hat(mean):  # posterior mean E[x0 | x] of N(mean, C^2) data
            return mean + a * C * C * (x - a * mean) / var

        x0 = apply_guidance(x0_hat(torch.zeros_like(x)), x0_hat(MU * cond["sign"].reshape(-1, 1, 1, 1)), guidance)
        if self.schedule.kind == "vp":
            return (x - a * x0) / s  # epsilon
        return (x - (a + s) * x0) / s  # velocity eps - x0, finite at sigma = 1

    def decode(self, latents):
        return (latents[:, :1].expand(-1, 3, -1, -1) + 1) / 2


@pytest.mark.parametrize("schedule", [VPSchedule.sd15(), FlowMatchingSchedule(shift=3.0)], ids=["vp", "flow"])
def test_reference_solve_reaches_the_exact_pf_ode_solution(schedule):
    backend = GaussianBackend(schedule)
    cond = backend.encode(["plus", "minus"])
    noise = torch.randn(2, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    a_T, s_T = backend._a_s(999 if schedule.kind == "vp" else 1000)
    sign = cond["sign"].reshape(-1, 1, 1, 1)
    exact = MU * sign + C * (noise - a_T * MU * sign) / (a_T**2 * C**2 + s_T**2).sqrt()

    def error(name, K, order=2):
        x = sample(backend, make_scheduler(name, schedule, order=order), noise, cond, 1.0, K)
        return float((x - exact).norm() / exact.norm())

    assert error("adams_bashforth", 200, order=3) < 1e-3
    # iPNDM (constant-step AB weights on any grid) and UniPC (diffusers) as whole sampling loops
    assert error("ipndm", 200, order=3) < 1e-2
    assert error("ipndm", 10, order=3) < 0.5 * error("ddim", 10)
    assert error("unipc", 40) < 0.05 and error("unipc", 40) < 0.3 * error("unipc", 10) < 0.3 * error("ddim", 10)
    # DPM-Solver++ (targets): its last step jumps to x0 by a first-order step, so it is a
    # few percent off at 40 steps, still far better than a 4-step DDIM preview
    assert error("dpmsolver++", 40) < 0.05
    assert error("ddim", 4) > 3 * error("dpmsolver++", 40)


def test_make_scheduler_builds_the_named_solvers():
    schedule = VPSchedule.sd15(set_alpha_to_one=False)
    dpm = make_scheduler("dpmsolver++", schedule)
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.timestep_spacing == "trailing"
    torch.testing.assert_close(dpm.alphas_cumprod, schedule.alphas_cumprod.float())
    ab = make_scheduler("adams_bashforth", schedule, order=3)
    assert isinstance(ab, ConsistencySolverScheduler) and ab.config.solver_order == 3
    assert ab.config.set_alpha_to_one is False
    with pytest.raises(ValueError, match="dpmsolver\\+\\+, unipc, ddim"):
        make_scheduler("heun", schedule)
