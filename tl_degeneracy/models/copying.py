"""Independent copies of a model (``random_gauge``, ``canonicalize_heads``, ``sparsify`` return one)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["copy_model"]


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares nothing with it.

    Tensors that a forward pass left on modules with an autograd history (TransformerBridge keeps the
    last attention ``_pattern``) cannot be deep-copied; they are copied detached, which is what they
    are for a model at rest. TransformerLens 4's bridge blocks install forward hooks whose closures
    reference the block's own submodules (the split-QKV residual capture, ``hook_mlp_in``);
    ``deepcopy`` shares those closures, so the copy's forward would write into the original's
    attention modules and run the original's ``hook_mlp_in`` (hooks added to the copy's would never
    fire). They are installed afresh on the copy.
    """
    with torch.inference_mode(False):  # the copy is an ordinary model even when made under inference_mode
        return _copy(model)


def _copy(model: nn.Module) -> nn.Module:
    memo = {}
    for module in model.modules():
        for value in vars(module).values():
            items = value.values() if isinstance(value, dict) else [value]
            for t in items:
                if isinstance(t, Tensor) and not isinstance(t, torch.nn.Parameter) and t.grad_fn is not None:
                    memo[id(t)] = t.detach().clone()
    copied = copy.deepcopy(model, memo)
    for module in copied.modules():
        # TransformerLens 4 BlockBridge's own remove/install pair (private there, no public one).
        teardown = getattr(module, "_teardown_capture_hooks", None)
        install = getattr(module, "_maybe_wire_capture_hooks", None)
        if teardown is not None and install is not None:
            teardown()
            install()
    return copied
