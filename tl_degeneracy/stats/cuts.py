"""Whether the gradients an analysis takes at a hook reach the outputs the way it assumes (METHODS §4, §5).

Two questions, one measurement: with node ``held`` fixed at its value (so that no gradient flows
through it), how much of the gradient of a random projection of a target with respect to an
earlier node still arrives? Where the graph has no path around ``held`` autograd gives exactly 0.

- Interaction bases (METHODS §5): LIB gives node l only the Jacobian of node l+1's coordinates and
  edges join adjacent nodes only; both describe the model only where everything downstream reads
  node l through node l+1 (:func:`find_bypasses`). A skip connection around node l+1 (a residual
  MLP with its hook points as nodes) breaks that.
- Residual-stream hooks (resid_pre/resid_mid/resid_post, METHODS §4): a gradient taken there is the
  stream's only where an edit at the hook reaches everything that reads the stream, i.e. where the
  hook is a cut between the embedding and the outputs (:func:`refuse_off_stream`). A
  TransformerBridge's ``hook_resid_mid`` is the MLP's input (``ln2.hook_in``): an edit there skips
  the residual path, and the Jacobian read there is the MLP branch's alone (audit 13a: its trace
  170× below resid_post's on a GPT-2 bridge, where the true one is larger).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..autograd import gradients_enabled, ordinary
from ..errors import MissingHookError
from .passes import HookTarget, run_until

__all__ = ["BYPASS_TOL", "CHECK_POSITIONS", "RESIDUAL_KINDS", "Bypass", "find_bypasses", "gradient_share_around",
           "refuse_off_stream"]

#: Hook kinds that name the residual stream itself.
RESIDUAL_KINDS = ("resid_pre", "resid_mid", "resid_post")

#: The share of the gradient around a node above which it is not a cut. Where the graph has no path
#: around the held node autograd gives exactly 0 (every backend and dtype, review 33), so this only
#: sets how small a bypass may pass unnoticed: one under 10⁻⁶ of the gradient gives a direction that
#: only it reads at most ~10⁻¹² of M's scale, under float32's rank cut-off (a float64 model's rule
#: could count it, as it would count any real dependence of that size).
BYPASS_TOL = 1e-6

#: Positions of each sequence the checks run on: a transformer's paths do not depend on the position
#: (the stream check reads one sequence); a plain module's may depend on the data through its gates
#: (a ReLU branch), so the bypass check reads a sample of rows spread over the data (audit 15a).
CHECK_POSITIONS = 16


@dataclass(frozen=True)
class Bypass:
    """Node ``node`` reaches the target around ``skipped``: ``share`` = ‖∂⟨u, y⟩/∂f with ``skipped``
    held fixed‖ / ‖∂⟨u, y⟩/∂f‖ (f: ``node``'s activations, y: the target, u: a product of Gaussian
    vectors, one per axis of y)."""

    node: str
    skipped: str
    share: float


def _gradient(engine, tokens: Tensor, node: str, held: str | None, final: str | None, seed: int) -> Tensor:
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
        out = run_until(engine, tokens, hooks, stop_after=final)
        if "f" not in store:  # ``node`` comes after ``final``: the target does not read it
            return torch.zeros((), device=tokens.device)
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


def _share(around: Tensor, full: Tensor) -> float:
    around, full = around.double().norm(), full.double().norm()
    return float(around / full) if full > 0 else (math.inf if around > 0 else 0.0)


def gradient_share_around(engine, tokens: Tensor | Sequence[Tensor], node: str, held: str, final: str | None = None,
                          seed: int = 0) -> float:
    """‖∂⟨u, y⟩/∂f with ``held`` fixed‖ / ‖∂⟨u, y⟩/∂f‖ (:class:`Bypass`) on ``tokens`` (one input
    batch, or several: the norms then run over all of them): 0 where everything from ``node`` to
    the target passes through ``held`` on every row; 0 too where the target does not depend on
    ``node`` at all."""
    samples = [tokens] if isinstance(tokens, Tensor) else list(tokens)
    with engine.eval_mode(), gradients_enabled(engine.model):  # refuses weights made under inference_mode
        around, full = (torch.stack([_gradient(engine, t, node, cut, final, seed).double().norm() for t in samples])
                        for cut in (held, None))
    return _share(around, full)


def find_bypasses(engine, tokens: Tensor | Sequence[Tensor], names: Sequence[str], final: str | None,
                  seed: int = 0) -> list[Bypass]:
    """The adjacent node pairs (a, b) of ``names`` whose target — node ``final``, or the model's
    output when None — reads a by more than :data:`BYPASS_TOL` of its gradient around b
    (:class:`Bypass`), on ``tokens`` (an input batch or several, :func:`gradient_share_around`): a
    path through a gate is seen where any of their rows opens it. A node pair whose b is ``final``
    itself is a cut by definition and is not checked."""
    found = []
    for a, b in zip(names, names[1:]):
        if b == final:
            continue
        share = gradient_share_around(engine, tokens, a, b, final, seed)
        if share > BYPASS_TOL:
            found.append(Bypass(a, b, share))
    return found


def refuse_off_stream(engine, tokens: Tensor, targets: Sequence[HookTarget], what: str,
                      final: str | None = None) -> None:
    """ValueError where a residual-stream hook of ``targets`` (:data:`RESIDUAL_KINDS`) is not a cut
    between the embedding and the target (the activation at hook ``final``, or the outputs), measured
    on the first sequence of ``tokens`` (module docstring): gradients taken there would not be the
    stream's. Models without an embedding hook kind (plain modules) are not checked."""
    residual = [t for t in targets if t.kind in RESIDUAL_KINDS]
    if not residual or not hasattr(engine, "hook_name"):
        return
    try:
        embed = engine.hook_name("embed")
    except MissingHookError:
        return
    sample = tokens[:1, :CHECK_POSITIONS] if tokens.ndim >= 2 else tokens[:1]
    with engine.eval_mode(), gradients_enabled(engine.model):
        full = _gradient(engine, sample, embed, None, final, 0)  # one for every hook
        # A hook the target does not read at all (downstream of an output_hook) has gradient 0 there,
        # which is right; only a hook the target reads in part is off the stream.
        read = [t for t in residual if _gradient(engine, sample, t.name, None, final, 0).abs().max() > 0]
        shares = {t.name: _share(_gradient(engine, sample, embed, t.name, final, 0), full) for t in read}
    for t in read:
        share = shares[t.name]
        if share > BYPASS_TOL:
            raise ValueError(
                f"{what}: gradients at {t.name!r} would not be the residual stream's: a share {share:.2g} of the "
                f"gradient of the {final or 'outputs'} with respect to the embedding goes around that hook, so an edit there "
                f"reaches only part of what reads the stream (a TransformerBridge's hook_resid_mid is the MLP's "
                f"input, ln2.hook_in). Take gradients at resid_pre or resid_post; forward statistics "
                f"(activation_stats) read the right values at {t.name!r}"
            )
