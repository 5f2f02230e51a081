"""Behavioral local learning coefficient (METHODS §1).

``estimate.py`` (``behavioral_llc``) runs the method; ``targets.py`` (θ*, batches, behavioral loss),
``layout.py`` (sampled coordinates), ``stepsize.py`` (η), ``sampler.py`` (vectorised SGLD),
``checkpoint.py``, ``llc_result.py`` (λ̂ and ``LLCResult``), ``convergence.py`` (the convergence
verdict and ``ConvergenceWarning``), ``config.py`` (``SamplerConfig``) and ``sweep.py`` (loss-scale
sweeps, per-component LLCs) hold its steps.
"""

from .config import SamplerConfig
from .convergence import Convergence, ConvergenceWarning, assess_convergence
from .estimate import DEFAULT_NBETA, behavioral_llc
from .llc_result import LLCResult
from .sweep import llc_by_component, llc_sweep, plot_llc_sweep

__all__ = ["DEFAULT_NBETA", "Convergence", "ConvergenceWarning", "LLCResult", "SamplerConfig", "assess_convergence",
           "behavioral_llc", "llc_by_component", "llc_sweep", "plot_llc_sweep"]
