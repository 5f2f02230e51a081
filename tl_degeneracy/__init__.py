"""tl_degeneracy: degeneracy in transformer circuits, on TransformerLens models."""

from .models import ModelAdapter, adapt, load_model

__all__ = ["ModelAdapter", "adapt", "load_model"]
__version__ = "0.1.0"
