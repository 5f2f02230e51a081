"""``load_model(spec)``: bundled toys, local Hugging Face directories, .gguf files, hub names."""

from __future__ import annotations

import torch
from torch import nn

from .toys.registry import BUNDLED


def load_model(spec: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model by spec (see API.md). Returns the model in eval mode."""
    if spec in BUNDLED:
        return BUNDLED[spec][0](device=device, dtype=dtype)
    raise ValueError(f"unknown model spec {spec!r}; bundled: {sorted(BUNDLED)}")
