import numpy as np
import pytest
import torch

from consolver.solvers import (
    adams_bashforth_coefficients,
    adams_bashforth_table,
    combine_history,
    ddim_table,
    fixed_table,
    ipndm_table,
    parse_tables,
    validate_table,
    vp_transfer,
)

CLASSICAL = {
    2: [3 / 2, -1 / 2],
    3: [23 / 12, -16 / 12, 5 / 12],
    4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
}


@pytest.mark.parametrize("order", [2, 3, 4])
def test_variable_step_ab_on_uniform_grid_is_classical(order):
    current = 3.0
    history_times = current + 0.5 * np.arange(order)  # newest first; rho decreases as we solve
    np.testing.assert_allclose(adams_bashforth_coefficients(history_times, current - 0.5), CLASSICAL[order], rtol=1e-12)


def test_ab_is_exact_for_polynomials_of_its_degree():
    rng = np.random.default_rng(0)
    nodes = np.sort(rng.uniform(1, 3, 4))  # newest first: the current time is the smallest
    target = nodes[0] - 0.7
    for degree in range(4):
        coef = rng.normal(size=degree + 1)
        f = np.polynomial.polynomial.Polynomial(coef)
        exact = (f.integ()(target) - f.integ()(nodes[0])) / (target - nodes[0])
        assert np.dot(adams_bashforth_coefficients(nodes, target), f(nodes)) == pytest.approx(exact, rel=1e-10)


def test_tables_shapes_and_warm_start():
    grid = np.linspace(10, 0, 7)
    assert np.array_equal(ddim_table(6, 3), np.tile([1.0, 0.0, 0.0], (6, 1)))
    ab = adams_bashforth_table(grid, 3)
    assert ab.shape == (6, 3)
    np.testing.assert_allclose(ab.sum(1), 1.0)
    assert ab[0].tolist() == [1.0, 0.0, 0.0] and ab[1, 2] == 0.0
    np.testing.assert_allclose(ab[2:], np.tile(CLASSICAL[3], (4, 1)), rtol=1e-12)  # uniform grid
    ip = ipndm_table(6, 4, width=5)
    assert ip.shape == (6, 5) and ip[3, :4].tolist() == CLASSICAL[4]
    with pytest.raises(ValueError, match="ddim, adams_bashforth, ipndm"):
        fixed_table("heun", grid)
    with pytest.raises(ValueError, match="order"):
        ipndm_table(4, 5)
    with pytest.raises(ValueError, match="width 2 is less than the solver order 3"):
        adams_bashforth_table(grid, 3, width=2)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_ipndm_tables_are_the_constant_step_ab_weights(order):
    """Row i of iPNDM of ``order`` is AB of order min(i + 1, order), whatever the grid: the
    literal constants, so a wrong weight (e.g. 5/12 of order 3) fails here."""
    table = ipndm_table(6, order)
    expected = [[1.0] + [0.0] * (order - 1)]
    for p in range(2, order + 1):
        expected.append(CLASSICAL[p] + [0.0] * (order - p))
    expected += [CLASSICAL[order]] * (6 - order)
    np.testing.assert_allclose(table, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(fixed_table("ipndm", np.linspace(10, 0, 7) ** 2, order), table, rtol=0, atol=0)


def test_tables_with_bad_entries_name_their_K():
    with pytest.raises(ValueError, match=r"table for K=3 has non-finite entries \(NaN or inf\) in rows \[1, 2\]"):
        validate_table(np.array([[1.0, 0.0], [np.nan, 1.0], [0.5, np.inf]]), 3, 2)
    with pytest.raises(ValueError, match=r"table for K=2 is ragged \(row lengths \[2, 1\]"):
        parse_tables({"2": [[1.0, 0.0], [1.0]]}, 2)
    with pytest.raises(ValueError, match=r"table for K=2 has an entry that is not a number"):
        parse_tables({"2": [[1.0, 0.0], ["1.5x", -0.5]]}, 2)
    for key in ("four", "2.5", "0", True):
        with pytest.raises(ValueError, match=rf"table key {key!r} is not a number of steps K"):
            parse_tables({key: [[1.0, 0.0]]}, 2)
    assert list(parse_tables({"2": [[1.0, 0.0], [1.5, -0.5]], 3: np.zeros((3, 2)) + [1, 0]}, 2)) == [2, 3]


# --- convergence order on a Gaussian, whose PF-ODE solution is closed-form ----------------
# data x0 ~ N(mu, c^2 I): x_t = a mu + sqrt(a^2 c^2 + s^2) z for a fixed z, eps = s (x - a mu)/(a^2 c^2 + s^2).
MU, C = 0.5, 1.0
Z = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _exact(a, s):
    return a * MU + (a * a * C * C + s * s) ** 0.5 * Z


def _eps(x, a, s):
    return s * (x - a * MU) / (a * a * C * C + s * s)


def _solve_error(name: str, order: int, K: int) -> float:
    """Relative final error of a K-step solve uniform in rho from SD1.5's t=999 (rho=14.6) to
    rho=0.5, started from exact values so that the table's own order is measured."""
    rho = np.linspace(14.6, 0.5, K + 1)
    a, s = 1 / np.sqrt(1 + rho**2), rho / np.sqrt(1 + rho**2)
    table = fixed_table(name, rho, order, order)
    start = order - 1
    x = _exact(a[start], s[start])
    history = [_eps(_exact(a[j], s[j]), a[j], s[j]) for j in reversed(range(start + 1))]
    for i in range(start, K):
        if i > start:
            history = [_eps(x, a[i], s[i])] + history[: order - 1]
        x = vp_transfer(x, combine_history(history, table[i].tolist()), a[i], s[i], a[i + 1], s[i + 1])
    exact = _exact(a[K], s[K])
    return float((x - exact).norm() / exact.norm())


@pytest.mark.parametrize("name,order", [("ddim", 1), ("adams_bashforth", 2), ("adams_bashforth", 3)])
def test_convergence_order(name, order):
    Ks = np.array([64, 91, 128, 181, 256])
    errors = np.array([_solve_error(name, order, K) for K in Ks])
    slope = -np.polyfit(np.log(Ks), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.3, (slope, errors)
