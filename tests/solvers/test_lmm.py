import pytest
import torch

from consolver.solvers import combine_history, constrained_coefficients, flow_transfer, vp_transfer


def _history(n, B=3):
    g = torch.Generator().manual_seed(n)
    return [torch.randn(B, 2, 4, 4, generator=g) for _ in range(n)]


def test_combine_history_float_row_tensor_row_and_per_sample_agree():
    hist = _history(3)
    row = [1.5, -0.75, 0.25, 9.0]  # the 4th weight has no history: ignored
    expected = 1.5 * hist[0] - 0.75 * hist[1] + 0.25 * hist[2]
    torch.testing.assert_close(combine_history(hist, row), expected)
    torch.testing.assert_close(combine_history(hist, torch.tensor(row)), expected)
    per_sample = torch.tensor([row, [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    out = combine_history(hist, per_sample)
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1], hist[0][1])
    torch.testing.assert_close(out[2], hist[1][2])


def test_combine_history_rejects_short_rows():
    with pytest.raises(ValueError, match="2 coefficients for 3 history"):
        combine_history(_history(3), [1.0, 0.0])


def test_vp_transfer_is_ddim_and_exact_on_constant_eps():
    x0, eps = _history(2)
    a, s, a2, s2 = 0.3, (1 - 0.09) ** 0.5, 0.8, 0.6
    x = a * x0 + s * eps
    torch.testing.assert_close(vp_transfer(x, eps, a, s, a2, s2), a2 * x0 + s2 * eps)
    # per-sample times broadcast over the sample dims
    B = x.shape[0]
    out = vp_transfer(x, eps, torch.full((B,), a), torch.full((B,), s), torch.full((B,), a2), torch.full((B,), s2))
    torch.testing.assert_close(out, a2 * x0 + s2 * eps)


def test_flow_transfer_is_exact_on_straight_paths():
    x0, eps = _history(2)
    v = eps - x0
    x = (1 - 0.9) * x0 + 0.9 * eps
    torch.testing.assert_close(flow_transfer(x, v, 0.9, 0.2), 0.8 * x0 + 0.2 * eps)
    B = x.shape[0]
    torch.testing.assert_close(flow_transfer(x, v, torch.full((B,), 0.9), torch.full((B,), 0.2)), 0.8 * x0 + 0.2 * eps)


@pytest.mark.parametrize("available", [1, 2, 3, 4])
def test_constrained_coefficients_sum_to_one_over_available_history(available):
    free = torch.tensor([[2.0, -1.5, 0.25], [1.0, 0.5, -0.5]])
    w = constrained_coefficients(free, available)
    assert w.shape == (2, 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    assert torch.all(w[:, available:] == 0)
    torch.testing.assert_close(w[:, : available - 1], free[:, : available - 1])
    # a constant history is reproduced whatever the free values
    d = torch.randn(2, 5)
    torch.testing.assert_close(combine_history([d] * available, w), d)
    with pytest.raises(ValueError):
        constrained_coefficients(free, 5)


@pytest.mark.parametrize("implied", ["oldest", "newest"])
@pytest.mark.parametrize("available", [1, 2, 3, 4])
def test_free_coefficients_invert_constrained_coefficients(implied, available):
    from consolver.solvers import free_coefficients

    free = torch.randn(5, 3)
    free[:, available - 1:] = 0
    w = constrained_coefficients(free, available, implied)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    assert torch.all(w[:, available:] == 0)
    torch.testing.assert_close(free_coefficients(w, available, implied), free)
    implied_column = 0 if implied == "newest" else available - 1
    torch.testing.assert_close(w[:, implied_column], 1 - free[:, : available - 1].sum(-1))
