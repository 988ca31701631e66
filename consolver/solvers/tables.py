"""Fixed coefficient tables: DDIM/Euler, variable-step Adams-Bashforth, iPNDM.

A table for K steps and width m is a float64 array ``[K, m]``; row i holds the weights of
``d_i, d_{i-1}, ...`` for the step ``t_i -> t_{i+1}`` (zeros where history does not exist).
Adams-Bashforth is computed on the ODE's own time grid: ``rho = s/a`` for VP (DDIM is Euler
in rho) and sigma for flow matching, so tables are the classical variable-step methods.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import numpy as np
from numpy.polynomial import polynomial as P

FIXED_SOLVERS = ("ddim", "adams_bashforth", "ipndm")

# Constant-step Adams-Bashforth weights, newest first (iPNDM uses them on any grid).
_IPNDM_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def adams_bashforth_coefficients(nodes: Sequence[float], target: float) -> np.ndarray:
    """Variable-step Adams-Bashforth weights for one step from ``nodes[0]`` to ``target``.

    Args:
        nodes: ODE times of the history, newest first (``nodes[0]`` is the current time),
            distinct values.
        target: the ODE time to step to.
    Returns:
        float64 ``[len(nodes)]`` with ``sum = 1``: ``(1/h) int_{t_i}^{target} L_j(r) dr`` for
        the Lagrange basis ``L_j`` through ``nodes`` (``h = target - nodes[0]``).
    """
    nodes = np.asarray(nodes, dtype=np.float64)
    h = float(target) - nodes[0]
    if h == 0.0:
        raise ValueError("step of zero length")
    u = (nodes - nodes[0]) / h  # normalized: current node at 0, target at 1
    if len(np.unique(u)) != len(u):
        raise ValueError(f"history times must be distinct, got {nodes.tolist()}")
    weights = np.empty(len(u))
    for j in range(len(u)):
        others = np.delete(u, j)
        basis = P.polyfromroots(others) / np.prod(u[j] - others)
        integral = P.polyint(basis)
        weights[j] = P.polyval(1.0, integral) - P.polyval(0.0, integral)
    return weights


def ddim_table(num_steps: int, width: int = 1) -> np.ndarray:
    """DDIM (VP) / Euler (flow): ``w = (1, 0, ...)`` at every step, ``[K, width]``."""
    table = np.zeros((num_steps, width))
    table[:, 0] = 1.0
    return table


def adams_bashforth_table(grid: Sequence[float], order: int, width: int | None = None) -> np.ndarray:
    """Variable-step AB of ``order`` (1..4) on ``grid`` (``[K + 1]`` ODE times), ``[K, width]``.

    Step i uses order ``min(i + 1, order)`` (lower-order start).
    """
    grid = np.asarray(grid, dtype=np.float64)
    _check_order(order, width)
    K = len(grid) - 1
    table = np.zeros((K, width or order))
    for i in range(K):
        p = min(i + 1, order)
        table[i, :p] = adams_bashforth_coefficients(grid[i - p + 1 : i + 1][::-1], grid[i + 1])
    return table


def ipndm_table(num_steps: int, order: int, width: int | None = None) -> np.ndarray:
    """iPNDM: constant-step AB weights of order ``min(i + 1, order)`` at step i, ``[K, width]``."""
    _check_order(order, width)
    table = np.zeros((num_steps, width or order))
    for i in range(num_steps):
        w = _IPNDM_WEIGHTS[min(i + 1, order)]
        table[i, : len(w)] = w
    return table


def fixed_table(name: str, grid: Sequence[float], order: int = 1, width: int | None = None) -> np.ndarray:
    """Table of a fixed solver by name (``FIXED_SOLVERS``) for the ODE-time grid ``[K + 1]``."""
    K = len(grid) - 1
    if name == "ddim":
        return ddim_table(K, width or 1)
    if name == "adams_bashforth":
        return adams_bashforth_table(grid, order, width)
    if name == "ipndm":
        return ipndm_table(K, order, width)
    raise ValueError(f"unknown fixed solver {name!r}; valid values: {', '.join(FIXED_SOLVERS)}")


def _check_order(order: int, width: int | None = None) -> None:
    if order not in _IPNDM_WEIGHTS:
        raise ValueError(f"solver order must be in 1..4, got {order}")
    if width is not None and width < order:
        raise ValueError(f"table width {width} is less than the solver order {order}; use width >= order")


def validate_table(table: np.ndarray, num_steps: int, width: int) -> np.ndarray:
    """Check a learned table ``[K, width]``: right shape, finite, no weight on history that does
    not exist yet (row i may use entries ``0..i``). Returns the table; raises ``ValueError``."""
    if table.shape != (num_steps, width):
        raise ValueError(f"coefficient table for K={num_steps} must have shape ({num_steps}, {width}), got {table.shape}")
    bad = sorted({int(i) for i in np.argwhere(~np.isfinite(table))[:, 0]})
    if bad:
        raise ValueError(f"coefficient table for K={num_steps} has non-finite entries (NaN or inf) in rows {bad}")
    for i in range(min(num_steps, width)):
        if np.any(table[i, i + 1:] != 0):
            raise ValueError(f"table K={num_steps} row {i} weights history that does not exist yet: {table[i].tolist()}")
    return table


def table_key(key: Any) -> int:
    """A table's K from its key: an int, or a string of digits as JSON stores it; ``K >= 1``."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        K = int(key)
    elif isinstance(key, str) and key.strip().isdigit():
        K = int(key)
    else:
        raise ValueError(f"coefficient table key {key!r} is not a number of steps K (a positive integer)")
    if K < 1:
        raise ValueError(f"coefficient table key {key!r} is not a number of steps K (a positive integer)")
    return K


def parse_tables(tables: Mapping[Any, Any], width: int) -> Dict[int, np.ndarray]:
    """Learned tables ``{K: [[w_0..w_{width-1}] x K]}`` (lists or arrays; keys ints or digit
    strings) as validated float64 arrays ``{K: [K, width]}``. ``ValueError`` naming the K for a
    bad key, a ragged table, a non-numeric or non-finite entry, or a wrong shape."""
    out: Dict[int, np.ndarray] = {}
    for key, rows in tables.items():
        K = table_key(key)
        if K in out:
            raise ValueError(f"two coefficient tables for K={K}")
        try:
            table = np.asarray(rows, dtype=np.float64)
        except (TypeError, ValueError) as err:
            lengths = [len(r) if isinstance(r, (list, tuple, np.ndarray)) else None for r in rows] \
                if isinstance(rows, (list, tuple)) else None
            if lengths and len(set(lengths)) > 1:
                problem = f"is ragged (row lengths {lengths}; every row has {width} entries)"
            else:
                problem = f"has an entry that is not a number ({str(err).splitlines()[0]})"
            raise ValueError(f"coefficient table for K={K} {problem}") from None
        out[K] = validate_table(table, K, width)
    return out
