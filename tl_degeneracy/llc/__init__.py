"""Behavioral local learning coefficient (METHODS §1): losses, vectorised SGLD, step size, estimates."""

from .api import DEFAULT_NBETA, behavioral_llc
from .result import LLCResult
from .sweep import llc_by_component, llc_sweep, plot_llc_sweep

__all__ = ["DEFAULT_NBETA", "LLCResult", "behavioral_llc", "llc_by_component", "llc_sweep", "plot_llc_sweep"]
