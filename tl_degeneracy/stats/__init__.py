"""Streaming statistics over data: activation Grams and Jacobian-probe Grams (METHODS §0, §4).

- :func:`activation_stats` — float64 mean, second moment and covariance per hook point.
- :func:`jacobian_stats` — K = (1/n) Σ_t E[g_t g_tᵀ] by random probes (``kl``/``mse``) or exactly.
- :class:`MomentAccumulator`, :class:`SecondMomentAccumulator` — the float64 accumulators, with
  ``update`` / ``merge`` / ``all_reduce``, for analyses that build their own passes.
- :func:`numerical_rank` — the package's one rank rule (:mod:`tl_degeneracy.numerics`), re-exported.
"""

from .accumulators import MomentAccumulator, SecondMomentAccumulator, descending_eigvalsh
from .activations import activation_stats
from ..distributed import DistributedContext, all_reduce_sum_, distributed_context
from .jacobian import jacobian_stats
from ..numerics import numerical_rank
from .gram_stats import ActivationStats, HookStats, JacobianHookStats, JacobianStats
from .samples import SampleIndex

__all__ = [
    "ActivationStats",
    "DistributedContext",
    "HookStats",
    "JacobianHookStats",
    "JacobianStats",
    "MomentAccumulator",
    "SampleIndex",
    "SecondMomentAccumulator",
    "activation_stats",
    "all_reduce_sum_",
    "descending_eigvalsh",
    "distributed_context",
    "jacobian_stats",
    "numerical_rank",
]
