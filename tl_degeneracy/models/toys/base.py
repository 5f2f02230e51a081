"""What every bundled toy provides so that one adapter serves them all."""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor
from transformer_lens import HookedRootModule  # TL 4 removed it from hook_points; the top level has it in 3.9 and 4.x

from ..config import ModelConfig


class ToyModel(HookedRootModule, abc.ABC):
    """A toy transformer with TransformerLens hook points and TL-named weights.

    Subclasses set ``HOOK_TEMPLATES`` (hook kind → name template with ``{layer}``) and
    ``MISSING_HOOKS`` (hook kind → why the architecture lacks it), expose ``cfg`` as a
    :class:`ModelConfig`, return logits [batch, pos, vocab] from ``forward(tokens)``, and implement
    the three weight readers in TL layout (see ``ModelAdapter._layer_attention`` & co.).
    ``init_kwargs()`` returns what ``__init__`` needs to rebuild the model, so checkpoints are
    self-describing.
    """

    HOOK_TEMPLATES: ClassVar[dict[str, str]] = {}
    MISSING_HOOKS: ClassVar[dict[str, str]] = {}

    @property
    @abc.abstractmethod
    def cfg(self) -> ModelConfig:
        """Architecture numbers."""

    @abc.abstractmethod
    def init_kwargs(self) -> dict:
        """Constructor arguments that rebuild this model."""

    @abc.abstractmethod
    def layer_attention(self, layer: int) -> dict[str, Tensor | None]:
        """TL-layout attention tensors of one layer (see ``ModelAdapter._layer_attention``)."""

    @abc.abstractmethod
    def layer_mlp(self, layer: int) -> dict[str, Tensor | None]:
        """TL-layout MLP tensors of one layer (see ``ModelAdapter._layer_mlp``)."""

    @abc.abstractmethod
    def embedding(self) -> dict[str, Tensor | None]:
        """W_E, W_pos, W_U, b_U (see ``ModelAdapter._embedding``)."""

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """Write weights, constructor arguments and metadata (how it was trained) to one file."""
        torch.save(
            {
                "class": type(self).__name__,
                "init_kwargs": self.init_kwargs(),
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
                "metadata": json.loads(json.dumps(metadata or {})),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """Rebuild a model saved with :meth:`save`; returns it in eval mode with ``.metadata`` set."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt["class"] != cls.__name__:
            raise ValueError(f"{path} holds a {ckpt['class']}, not a {cls.__name__}")
        model = cls(**ckpt["init_kwargs"])
        model.load_state_dict(ckpt["state_dict"])
        model.metadata = ckpt.get("metadata", {})
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        return model.eval()
