"""The bundled models, by spec name. Each entry: a loader returning the trained toy in eval mode."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources

import torch

WEIGHTS = resources.files("tl_degeneracy.models.toys") / "weights"


def _bundled(module: str, cls: str, filename: str) -> Callable:
    def load(device=None, dtype=None):
        import importlib

        klass = getattr(importlib.import_module(f"tl_degeneracy.models.toys.{module}"), cls)
        with resources.as_file(WEIGHTS / filename) as path:
            return klass.load(path, device=device, dtype=dtype)

    return load


#: spec → (loader, one-line description)
BUNDLED: dict[str, tuple[Callable[..., torch.nn.Module], str]] = {}


def register(spec: str, module: str, cls: str, filename: str, description: str) -> None:
    BUNDLED[spec] = (_bundled(module, cls, filename), description)
