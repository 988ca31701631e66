"""Learned step grids: the stick-breaking parametrisation, rounding, the continuous VP
schedule the gradient comes from, and grid-table validation."""

import numpy as np
import pytest
import torch

from consolver.schedules import VPSchedule
from consolver.solvers.grid import grid_from_logits, grid_units, logits_from_grid, parse_step_grids

EXTREMES = [0.0, 1.0, -1.0, 30.0, -30.0, 1e4, -1e4, 1e30, -1e30, float("inf"), float("-inf")]


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("K", [2, 3, 4, 8, 15])
def test_grid_is_strictly_decreasing_and_in_range_for_any_logits(kind, K):
    end, gap, integer = grid_units(kind, 1000)
    start = 999.0 if kind == "vp" else 1.0
    g = torch.Generator().manual_seed(K)
    random = torch.randn(64, K - 1, generator=g) * torch.logspace(-2, 3, 64)[:, None]
    extreme = torch.tensor(EXTREMES)[torch.randint(len(EXTREMES), (256, K - 1), generator=g)]
    grids = grid_from_logits(torch.cat([random, extreme]), start, end, gap, integer)
    assert grids.shape == (320, K + 1)
    assert torch.isfinite(grids).all()
    assert (grids[:, 0] == start).all() and (grids[:, -1] == end).all()
    steps = grids[:, :-1] - grids[:, 1:]
    assert (steps >= gap * (1 - 1e-9)).all(), steps.min()
    if integer:
        assert (grids == grids.round()).all()


def test_logits_of_the_trailing_grid_give_it_back_exactly_after_rounding():
    sched = VPSchedule.sd15()
    for K in range(2, 16):
        positions = np.append(sched.timesteps(K, "trailing"), -1).astype(np.float64)
        back = grid_from_logits(logits_from_grid(positions, 1.0), positions[0], -1.0, 1.0, integer=True)
        assert back.tolist() == positions.tolist(), K


def test_the_grid_is_differentiable_in_its_logits():
    z = torch.zeros(3, requires_grad=True)
    grid_from_logits(z, 1.0, 0.0, 1e-3)[1:-1].sum().backward()
    assert torch.isfinite(z.grad).all() and (z.grad != 0).all()
    z = torch.zeros(3, requires_grad=True)  # VP: straight through the rounding
    grid_from_logits(z, 999.0, -1.0, 1.0, integer=True)[1:-1].sum().backward()
    assert (z.grad != 0).all()


def test_continuous_vp_schedule_equals_the_discrete_one_at_integers_and_has_a_slope():
    sched = VPSchedule.sd15()
    t = torch.tensor([-1.0, 0.0, 1.0, 26.0, 500.0, 998.0, 999.0], dtype=torch.float64, requires_grad=True)
    a, s = sched.alpha_sigma_continuous(t)
    a_ref, s_ref = sched.alpha_sigma(t.detach().long())
    torch.testing.assert_close(a.detach(), a_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.detach(), s_ref, rtol=1e-12, atol=0)
    a[1:].sum().backward()  # not through the final point, where s = 0 has an infinite slope
    assert (t.grad[1:] < 0).all()  # noise grows with t: a falls


def test_parse_step_grids_refuses_bad_tables_naming_k():
    assert parse_step_grids({"4": [999, 800, 500, 20]}, "vp", 1000)[4].tolist() == [999, 800, 500, 20]
    with pytest.raises(ValueError, match=r"K=4 has 3 values, not 4"):
        parse_step_grids({"4": [999, 500, 20]}, "vp", 1000)
    with pytest.raises(ValueError, match=r"K=3 must be strictly descending"):
        parse_step_grids({"3": [999, 999, 20]}, "vp", 1000)
    with pytest.raises(ValueError, match=r"integer timesteps in \[0, 1000\)"):
        parse_step_grids({"2": [999.5, 20]}, "vp", 1000)
    with pytest.raises(ValueError, match=r"unshifted sigmas in \(0, 1\]"):
        parse_step_grids({"2": [1.5, 0.2]}, "flow", 1000)
    with pytest.raises(ValueError, match=r"K=2 must be strictly descending finite"):
        parse_step_grids({"2": [1.0, float("nan")]}, "flow", 1000)


@pytest.mark.parametrize("K", [2, 3, 4, 8])
def test_last_max_keeps_the_last_evaluation_at_or_below_it_for_any_logits(K):
    g = torch.Generator().manual_seed(K)
    logits = torch.cat([torch.randn(64, K - 1, generator=g) * 10,
                        torch.tensor(EXTREMES)[torch.randint(len(EXTREMES), (64, K - 1), generator=g)]])
    grids = grid_from_logits(logits, 999.0, -1.0, 1.0, integer=True, last_max=30.0)
    assert (grids[:, -2] <= 30).all() and (grids[:, :-1] - grids[:, 1:] >= 1).all()
    free = grid_from_logits(logits, 999.0, -1.0, 1.0, integer=True)
    assert (free[:, -2] > 30).any()  # without it, last evaluations above 30 are reachable


def test_last_max_moves_only_the_last_evaluation_of_the_trailing_grid_and_round_trips():
    positions = np.append(VPSchedule.sd15().timesteps(8, "trailing"), -1).astype(np.float64)
    logits = logits_from_grid(positions, 1.0, 30.0)
    capped = grid_from_logits(logits, 999.0, -1.0, 1.0, True, 30.0).tolist()
    assert capped == positions[:-2].tolist() + [29.0, -1.0]  # just below the cap, where training starts
    assert -4 < float(logits[-1]) < -2  # not the sigmoid's flat end: exploration still moves it
    back = grid_from_logits(logits_from_grid(capped, 1.0, 30.0), 999.0, -1.0, 1.0, True, 30.0)
    assert back.tolist() == capped
