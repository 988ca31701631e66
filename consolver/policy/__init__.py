"""Coefficient policies.

- :mod:`.base`: :class:`CoefficientPolicy`, the deterministic policy a scheduler can carry
  (acts by its mode), its registry, and :func:`step_observation`.
- :mod:`.actor`: the RL actors (``table`` | ``mlp`` x ``bins`` | ``gaussian``) and the critic.
- :mod:`.distributions`: masked action distributions over the free coefficients.
"""

from consolver.policy.base import (
    OBSERVATION_DIM,
    CoefficientPolicy,
    TimeMLPPolicy,
    build_policy,
    history_similarity,
    register_policy,
    step_observation,
)

__all__ = ["OBSERVATION_DIM", "CoefficientPolicy", "TimeMLPPolicy", "build_policy", "history_similarity", "register_policy",
           "step_observation"]
