"""Interaction basis (METHODS §5): global and local (LIB) bases with edges, and modules (METHODS §6).

- :func:`interaction_basis` → :class:`InteractionBasis` (``.basis``, ``.eigenvalues``, ``.dims``,
  ``.edges``, ``.transform``, ``.inverse_transform``, plots).
- :func:`find_modules` → :class:`Modules`: communities of the log-normalised edge graph.
"""

from .compute import interaction_basis
from .modules import Modules, find_modules
from .basis_result import InteractionBasis, NodeSpectrum

__all__ = ["InteractionBasis", "Modules", "NodeSpectrum", "find_modules", "interaction_basis"]
