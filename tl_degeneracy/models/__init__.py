"""Models: loading, adapters over every supported backend, bundled toys."""

from .adapt import adapt
from .adapter import ModelAdapter
from .loading import load_model

__all__ = ["ModelAdapter", "adapt", "load_model"]
