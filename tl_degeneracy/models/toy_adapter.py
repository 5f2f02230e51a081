"""Adapter for the bundled toys: they describe themselves, the adapter only forwards."""

from __future__ import annotations

from ..errors import MissingHookError
from .adapter import ModelAdapter
from .config import ModelConfig
from .toys.base import ToyModel


class ToyAdapter(ModelAdapter):
    backend = "toy"
    model: ToyModel

    def _read_config(self) -> ModelConfig:
        return self.model.cfg

    def _hook_template(self, kind: str) -> str:
        if kind in self.model.MISSING_HOOKS:
            raise MissingHookError(
                f"{type(self.model).__name__} has no {kind!r} hook: {self.model.MISSING_HOOKS[kind]}"
            )
        return self.model.HOOK_TEMPLATES[kind]

    def _layer_attention(self, layer: int):
        return self.model.layer_attention(layer)

    def _layer_mlp(self, layer: int):
        return self.model.layer_mlp(layer)

    def _embedding(self):
        return self.model.embedding()
