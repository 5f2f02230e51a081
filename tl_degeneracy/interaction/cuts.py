"""Whether each node of the interaction basis is a cut of the model's graph (METHODS §5).

LIB gives node l only the Jacobian of node l+1's coordinates, and edges join adjacent nodes only:
both describe the model only where everything downstream reads node l through node l+1. A skip
connection around node l+1 (a residual MLP with its hook points as nodes) breaks that: the
directions of node l that the outputs read through the skip would count as degenerate, and the
edge graph would lack the skip. This module measures, on the first batch, how much of the
gradient of a random projection of the target with respect to node l passes around node l+1 (node
l+1 held at its value, so that no gradient flows through it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..autograd import ordinary
from ..stats.passes import run_until
from .runner import Runner

__all__ = ["Bypass", "find_bypasses"]


@dataclass(frozen=True)
class Bypass:
    """Node ``node`` reaches the target around ``skipped``: ``share`` = ‖∂⟨u, y⟩/∂f with ``skipped``
    held fixed‖ / ‖∂⟨u, y⟩/∂f‖ (f: ``node``'s activations, y: the target, u: a product of Gaussian
    vectors, one per axis of y)."""

    node: str
    skipped: str
    share: float


def _gradient(runner: Runner, tokens: Tensor, node: str, held: str | None, final: str | None, seed: int) -> Tensor:
    """∂⟨u, y⟩/∂f at ``node`` on ``tokens``, with ``held`` (if any) cut from the graph; y is the
    activation at ``final``, or the model's output when ``final`` is None."""
    store: dict[str, Tensor] = {}

    def leaf(act, hook=None):  # an input made under inference_mode cannot require grad: a copy can
        store["f"] = ordinary(act.detach()).requires_grad_(True)
        return store["f"]

    def hold(act, hook=None):
        return act.detach()

    def read(act, hook=None):
        store["y"] = act

    hooks = [(node, leaf)] + ([(held, hold)] if held is not None else []) + ([(final, read)] if final is not None else [])
    with torch.enable_grad():
        out = run_until(runner.engine, tokens, hooks, stop_after=final)
        y = store["y"] if final is not None else out
        if not y.requires_grad:
            return torch.zeros_like(store["f"])
        # ⟨u, y⟩ with u = g_0 ⊗ g_1 ⊗ …, one Gaussian vector per axis: a generic projection at the
        # memory of its factors (a full Gaussian u of a [pos, vocab] output would be the logits' size).
        g = torch.Generator().manual_seed(seed)
        projection = y
        for size in y.shape:
            factor = torch.randn(size, generator=g, dtype=torch.float64).to(y)
            projection = torch.tensordot(projection, factor, dims=([0], [0]))
        (grad,) = torch.autograd.grad(projection, store["f"], allow_unused=True)
    return torch.zeros_like(store["f"]) if grad is None else grad


#: The share of the gradient around a node above which it is not a cut. Where the graph has no path
#: around the held node autograd gives exactly 0 (every backend and dtype, review 33), so this only
#: sets how small a bypass may pass unnoticed: one under 10⁻⁶ of the gradient gives a direction that
#: only it reads at most ~10⁻¹² of M's scale, under float32's rank cut-off (a float64 model's rule
#: could count it, as it would count any real dependence of that size).
BYPASS_TOL = 1e-6


def find_bypasses(runner: Runner, final: str | None, seed: int = 0) -> list[Bypass]:
    """The adjacent node pairs (a, b) of ``runner`` whose target — node ``final``, or the model's
    output when None — reads a by more than :data:`BYPASS_TOL` of its gradient around b
    (:class:`Bypass`), on the first sequence of the data (whether a path exists does not depend on
    the data). A node pair whose b is ``final`` itself is a cut by definition and is not checked."""
    names = runner.names
    tokens = runner.batches.batch(0, device=runner.device).tokens[:1]
    found = []
    with runner.engine.eval_mode():
        for a, b in zip(names, names[1:]):
            if b == final:
                continue
            full = _gradient(runner, tokens, a, None, final, seed).double().norm()
            around = _gradient(runner, tokens, a, b, final, seed).double().norm()
            share = float(around / full) if full > 0 else (math.inf if around > 0 else 0.0)
            if share > BYPASS_TOL:
                found.append(Bypass(a, b, share))
    return found
