"""Pure numerics of the generalized linear multistep solver and its fixed tables."""

from consolver.solvers.lmm import (IMPLIED_COLUMNS, combine_history, constrained_coefficients, flow_transfer,
                                   free_coefficients, vp_transfer)
from consolver.solvers.tables import (
    FIXED_SOLVERS,
    adams_bashforth_coefficients,
    adams_bashforth_table,
    ddim_table,
    fixed_table,
    ipndm_table,
    parse_tables,
    table_key,
    validate_table,
)
from consolver.solvers.grid import flow_grid, vp_grid

__all__ = [
    "FIXED_SOLVERS",
    "IMPLIED_COLUMNS",
    "adams_bashforth_coefficients",
    "adams_bashforth_table",
    "combine_history",
    "constrained_coefficients",
    "ddim_table",
    "fixed_table",
    "flow_transfer",
    "free_coefficients",
    "ipndm_table",
    "parse_tables",
    "table_key",
    "validate_table",
    "vp_transfer",
    "flow_grid",
    "vp_grid",
]
