"""tl_degeneracy: degeneracy in transformer circuits, on TransformerLens models.

The data flow reads in one direction: model → adapter → batches → accumulators → analyses.
"""

from .data import Batch, TokenBatches, token_batches
from .errors import DataError, MissingHookError, NumericalError, TLDegeneracyError
from .models import ModelAdapter, adapt, load_model
from .models.config import ModelConfig
from .models.selection import ParameterSelection, select_parameters
from .models.toys.data import toy_data
from .stats import ActivationStats, JacobianStats, activation_stats, jacobian_stats

__all__ = [
    "ActivationStats",
    "Batch",
    "DataError",
    "JacobianStats",
    "MissingHookError",
    "ModelAdapter",
    "ModelConfig",
    "NumericalError",
    "ParameterSelection",
    "TLDegeneracyError",
    "TokenBatches",
    "activation_stats",
    "adapt",
    "jacobian_stats",
    "load_model",
    "select_parameters",
    "token_batches",
    "toy_data",
]
__version__ = "0.1.0"
