"""tl_degeneracy: degeneracy in transformer circuits, on TransformerLens models.

The data flow reads in one direction: model → adapter → batches → accumulators → analyses.
"METHODS §N" in docstrings refers to docs/methods.md §N, the maths the package implements.
"""

from .counts import degeneracy_counts
from .data import Batch, PaddingWarning, TokenBatches, token_batches
from .numerics import DataLimitedWarning, HalfPrecisionWarning, SampleLimitedWarning
from .errors import DataError, MissingHookError, NumericalError, TLDegeneracyError, UnsupportedArchitectureError
from .gauge import canonicalize_heads, random_gauge
from . import theory
from .interaction import InteractionBasis, Modules, find_modules, interaction_basis
from .invariants import ov_invariants, qk_invariants
from .llc import (
    DEFAULT_NBETA,
    ConvergenceWarning,
    LLCResult,
    SamplerConfig,
    behavioral_llc,
    llc_by_component,
    llc_sweep,
    plot_llc_sweep,
)
from .memory import MemoryBudgetError, memory_limit
from .models import ModelAdapter, adapt, load_model
from .models.chains import VmapFallbackWarning
from .models.config import ModelConfig
from .models.selection import ParameterSelection, select_parameters
from .models.toys.data import toy_data
from .plots import plot_spectra
from .report import Report, degeneracy_report
from .report.compare import ReportComparison, compare_reports
from .stats import ActivationStats, JacobianStats, activation_stats, jacobian_stats
from .sparsify import SparsifyResult, sparsify
from .synchronization import HeadSyncResult, NeuronSyncResult, head_synchronization, neuron_synchronization

__all__ = [
    "DEFAULT_NBETA",
    "ConvergenceWarning",
    "VmapFallbackWarning",
    "MemoryBudgetError",
    "memory_limit",
    "SamplerConfig",
    "LLCResult",
    "behavioral_llc",
    "llc_by_component",
    "llc_sweep",
    "plot_llc_sweep",
    "theory",
    "ActivationStats",
    "Batch",
    "DataError",
    "DataLimitedWarning",
    "HalfPrecisionWarning",
    "HeadSyncResult",
    "InteractionBasis",
    "JacobianStats",
    "MissingHookError",
    "SampleLimitedWarning",
    "ModelAdapter",
    "ModelConfig",
    "Modules",
    "NeuronSyncResult",
    "NumericalError",
    "PaddingWarning",
    "ParameterSelection",
    "Report",
    "ReportComparison",
    "TLDegeneracyError",
    "UnsupportedArchitectureError",
    "TokenBatches",
    "activation_stats",
    "adapt",
    "canonicalize_heads",
    "compare_reports",
    "degeneracy_counts",
    "degeneracy_report",
    "find_modules",
    "head_synchronization",
    "interaction_basis",
    "jacobian_stats",
    "load_model",
    "neuron_synchronization",
    "sparsify",
    "SparsifyResult",
    "ov_invariants",
    "plot_spectra",
    "qk_invariants",
    "random_gauge",
    "select_parameters",
    "token_batches",
    "toy_data",
]
__version__ = "0.4.17"
