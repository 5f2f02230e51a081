"""Constructive sparsification of the MLP layers (METHODS §8, paper §4).

For each MLP, input x = the vector W_in reads (the normalized residual stream with the norm's gain
and bias applied, or the residual stream in a model without norms), hidden f = act(x W_in + b_in):

1. **Low-rank inputs.** The Gram G¹ = (1/n) Σ x xᵀ, or where W_in has a bias the covariance
   (1/n) Σ (x − μ)(x − μ)ᵀ (METHODS (4.1′)), has rank r < D on the data (the rank rule of
   ``tl_degeneracy.numerics``, as ``degeneracy_counts`` counts it). Its null eigenvectors N
   (D × (D−r)) say x N = 0 (with the bias: (x − μ) N = 0, and b_in absorbs the offset) on the data. Our choice (METHODS §8 leaves it to the transformer): the
   eigenbasis of G¹ *finds* the null space, but the D − r coordinates J that are eliminated are
   coordinates of the model's own input (the paper's choice of "r of the neurons"), picked by
   column-pivoted QR of Nᵀ (the best-conditioned N_J). Then x_J = x_K A (+ a, with the bias) with
   A = −N_K N_J⁻¹ on the data, and W̃_K = W_K + A W_J, W̃_J = 0 (b̃_in = b_in + a W_J) gives (D − r)·F
   exact zeros in the *stored* W_in with x W̃ + b̃_in = x W + b_in on the data. Rotating the input instead would put the zeros in a basis the model
   cannot store: W_in reads the norm's output coordinate by coordinate, so a rotation can only be
   multiplied into W_in, where it leaves no zero. Nothing is folded: the norm is untouched.
2. **Synchronized neurons** (blocks from :func:`~tl_degeneracy.synchronization.neuron_synchronization`
   on the same data; ``tol=0`` for ReLU, i.e. identical firing on every counted sample):
   - neurons whose pre-activations are linear combinations of the block's others on the data
     (p_j = p_I β) are removed: f_j = r·p_j = f_I β inside a block (one firing pattern r), so W_out
     of the kept neurons absorbs β W_out[j] and the removed neuron's W_in column, bias and W_out row
     become 0 (exact for ReLU);
   - for the block's s_a independent neurons I, C = M_R⁻¹ with M = [W̃; b_in] restricted to the
     block's columns and M_R its s_a rows R of best conditioning (pivoted QR; the paper's eq. 26 takes
     the first ones): Ŵ = M C has the identity on rows R, s_a² − s_a zeros, and W_out absorbs
     C⁻¹ = M_R. **Paper eq. 28 (C commutes with ReLU) holds only when every new neuron keeps the
     block's firing pattern on the data** (counterexample: p = (x₁ + x₂, x₁ + 3x₂) fire together at
     x = (1, −0.1), but the new neuron p̂₂ = x₂ does not). So each block's C is checked on the data:
     where it keeps the firing pattern it is written into the model (exact); where it does not, the
     per-neuron activation cannot hold the new hidden basis, and C is kept in ``bases`` only: the
     zeros then exist in the paper's hidden basis f̂ = f C (where ∂f̂/∂x = r·Ŵ, so the §5 edges
     vanish) but not in the stored weights. ``to_frame`` reports both counts.
3. The outputs of the copy are compared with the original's on the data: ``output_drift`` =
   max |Δ logits| / max |logits| and the behavioral loss KL(original ‖ copy) (METHODS §1), after
   each layer is written (cumulative). Step 1 and the removals hold on the data for any activation,
   up to what the rank rule calls zero (``eliminated_scale``, ``removed_residual``); for GELU/SiLU the
   block change of basis is only approximate (METHODS §3), and where a smooth activation makes the
   post-activations of neurons with parallel input weights independent there is none
   (``blocks_without_basis``). The drift and KL measure the whole. Every zero holds on the data the
   copy was built from: ``data_limited`` and ``blocks_changing`` say where half of them disagree.

Which neurons of a block are independent is decided on their correlations (scale-free): ReLU's
per-neuron rescaling (W_in column × c, W_out row ÷ c) changes no count and no removal.

Gated MLPs (post = act(x W_gate) ⊙ x W_in) are refused: the hidden unit is a product of two
pre-activations, so neither the removal nor C passes through it.

Every step (G¹, the synchronized blocks, the firing check, the drift) reads the same samples: every
non-padding position, BOS included (``counts.counted_batches``). Every later position reads the BOS
position through attention, so an input direction or a firing pattern used only at BOS is not free
(a 2-layer float64 ReLU toy with BOS: output drift 1.5·10⁻² with BOS left out, 7·10⁻¹⁵ with it counted).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.linalg
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .counts import block_input_affine, block_input_hook, counted_batches
from .distributed import failing_together, max_over_ranks, warn_once
from .errors import MissingHookError, NumericalError, UnsupportedArchitectureError
from .llc.losses import per_sample_loss, reference_form
from .models.adapt import adapt
from .models.adapter import ModelAdapter
from .models.copying import copy_model
from .numerics import (DataLimitedWarning, activation_precision, covariance_floor, numerical_rank, rank_band,
                       sample_limited, warn_data_limited, warn_half_storage, warn_sample_limited)
from .numerics import rank_rtol as rule_rtol  # sparsify's argument rank_rtol is a number
from .stats.accumulators import MomentAccumulator, descending_eigvalsh
from .stats.stream import Step, stream
from .synchronization import (EXACT_ACTIVATIONS, SyncCountWarning, balanced_values, changing_blocks,
                              neuron_synchronization)

__all__ = ["LayerBasis", "SparsifyResult", "sparsify"]

#: Activations whose value at 0 is 0 (a removed neuron, p ≡ 0, then outputs exactly 0), by cfg.act_fn prefix.
SUPPORTED_ACTIVATIONS = ("relu", "gelu", "silu", "swish")
_MLP_TENSORS = ("W_in", "b_in", "W_out", "b_out")


@dataclass(frozen=True)
class LayerBasis:
    """The change of basis of one MLP layer (METHODS §8).

    Input: the sparsified model reads the same input vector x as the original; the coordinates
    ``eliminated`` (J) have zero weights and equal x_K @ ``relation`` + ``offset`` on the data
    (K = ``kept``; ``offset`` is 0 unless W_in has a bias, which absorbs ``offset`` @ W_J).
    Hidden: on the data, the sparsified model's ``hook_post`` = original ``hook_post`` @
    ``hidden_map`` (block changes of basis written into the model, removed neurons → 0), and the
    paper's hidden basis is f̂ = sparsified ``hook_post`` @ ``hidden_basis`` (the block changes the
    per-neuron activation could not hold; identity elsewhere)."""

    layer: int
    kept: Int[np.ndarray, " r"]
    eliminated: Int[np.ndarray, " n_eliminated"]
    relation: Float[Tensor, "r n_eliminated"] = field(repr=False)
    offset: Float[Tensor, " n_eliminated"] = field(repr=False)
    hidden_map: Float[Tensor, "d_mlp d_mlp"] = field(repr=False)
    hidden_basis: Float[Tensor, "d_mlp d_mlp"] = field(repr=False)

    def map_hidden(self, post: Float[Tensor, "... d_mlp"]) -> Float[Tensor, "... d_mlp"]:
        """The sparsified model's hidden activations from the original's (exact on the data for ReLU)."""
        return post.to(self.hidden_map) @ self.hidden_map

    def paper_hidden(self, post: Float[Tensor, "... d_mlp"]) -> Float[Tensor, "... d_mlp"]:
        """The paper's hidden coordinates f̂ from the sparsified model's hidden activations."""
        return post.to(self.hidden_basis) @ self.hidden_basis


@dataclass(eq=False)
class SparsifyResult:
    """What :func:`sparsify` returns: ``model`` (the re-parametrised deep copy), ``bases`` (one
    :class:`LayerBasis` per layer) and per-layer counts (``to_frame``). ``approximate``: some block's
    change of basis is not exact (``neuron_synchronization``'s: a smooth activation's block of neurons
    that are not copies, or ReLU neurons that disagree about firing at ``tol`` > 0; METHODS §3)."""

    model: object = field(repr=False)
    bases: list[LayerBasis] = field(repr=False)
    rows: list[dict] = field(repr=False)
    act_fn: str | None
    tol: float
    approximate: bool
    n_samples: int
    positions: dict  # which positions counted (``Positions.to_dict()``): every non-padding one
    seconds: float

    def to_frame(self) -> pd.DataFrame:
        """One row per MLP layer: ``layer``, ``input_rank`` (r) and ``input_rank_min`` /
        ``input_rank_max`` (r with the rank rule's cut-off moved ``numerics.CUTOFF_BAND``-fold up /
        down: equal where the input spectrum has a gap, spread where r is the cut-off's choice),
        ``sample_limited`` (r reached the n samples below D, so ``activation_free`` may be the data's
        limit, not the model's: ``numerics.sample_limited``), ``data_limited`` (r is lower on the
        data's even-numbered sequences alone: still growing with the data, so more data would use
        some of the eliminated directions), ``blocks`` (synchronized blocks of ≥ 2
        neurons), ``blocks_changing`` (those of them that the even-numbered sequences alone form
        otherwise, ``neuron_synchronization``'s on_half: their removals and changes of basis hold on
        these data and may not off them), ``free_directions`` = ``activation_free`` + ``sync_free`` (what METHODS §3–§4 count
        for the layer on the same data: (D − r)·F for W_in's low-rank input, and per block of ≥ 2 its
        extra freedom J_apart − J_sync, ``neuron_synchronization``) with ``free_min`` / ``free_max``
        from the band of r, ``sync_exact`` (every block's count is exact; False: some are upper
        estimates or have no closed form and are left out of ``sync_free``), ``zeros_added`` (the entries of
        [W_in; b_in] in the new basis and of removed neurons' W_out rows that the construction sets to
        exactly zero, whether or not they were zero before: the non-interacting input–hidden and
        hidden–output pairs), ``zeros_in_model`` (those of them stored in ``model``'s weights),
        ``zeros_out`` (the hidden–output ones: removed neurons' W_out rows, all stored), ``blocks_in_model`` /
        ``blocks_in_basis`` (block changes of basis written into the model / kept in ``bases`` only),
        ``blocks_without_basis`` (blocks with s ≥ 2 whose independent neurons' input weights span fewer
        than s directions, as a smooth activation allows: no change of basis, no zeros),
        ``removed_neurons`` and ``removed_silent`` (those of them that never fire on the data: removed
        exactly here, they may fire on other inputs, which no half-data check sees; a
        :class:`DataLimitedWarning` says how many), ``eliminated_scale`` (√(largest eliminated G¹ eigenvalue / largest): how
        far the eliminated input directions are from exactly zero on the data, relative, so the size
        of step 1's error; the rank rule lets it reach √(D·eps) at float64), ``removed_residual``
        (the largest relative RMS of f_dep − f_I β over the removed neurons, each on its own scale:
        step 2's error, likewise up to the rank rule's cut-off; where it is below the float64
        Gram's resolution √(F·eps64), which cannot tell it from rounding, that resolution: a bound;
        0 only where no neuron that fires was removed), ``output_drift`` (max |Δ logits| / max |logits| on the data after layers
        0..layer are written) and ``kl`` (mean KL(original ‖ copy) over counted samples, same)."""
        columns = ["layer", "input_rank", "input_rank_min", "input_rank_max", "sample_limited", "data_limited", "blocks",
                   "blocks_changing", "free_directions", "free_min", "free_max", "activation_free", "sync_free",
                   "sync_exact", "zeros_added", "zeros_in_model", "zeros_out", "blocks_in_model", "blocks_in_basis",
                   "blocks_without_basis", "removed_neurons", "removed_silent", "eliminated_scale", "removed_residual",
                   "output_drift", "kl"]
        frame = pd.DataFrame(self.rows, columns=columns)
        frame.attrs.update({"act_fn": self.act_fn, "tol": self.tol, "approximate": self.approximate,
                            "n_samples": self.n_samples, "positions": self.positions, "seconds": self.seconds})
        return frame

    @property
    def output_drift(self) -> float:
        """Drift of the whole sparsified model (the last layer's row)."""
        return float(self.rows[-1]["output_drift"]) if self.rows else 0.0

    @property
    def kl(self) -> float:
        return float(self.rows[-1]["kl"]) if self.rows else 0.0

    def plot(self):
        """Free directions against zeros added per layer, with the output drift (``plots.plot_sparsity``)."""
        from .plots import plot_sparsity

        return plot_sparsity(self.to_frame())


# ---------------------------------------------------------------------------------------------- helpers
def _mlp_input(adapter: ModelAdapter, layer: int) -> tuple[str, Tensor | None, Tensor | None]:
    """The hook carrying the MLP's input and the norm gain/bias still to apply (``counts``'
    ``block_input_hook``/``block_input_affine``), or the residual stream in a model without norms."""
    try:
        return (block_input_hook(adapter, layer, "ln2"), *block_input_affine(adapter, layer, "ln2"))
    except MissingHookError:
        if adapter.cfg.normalization is None:
            return adapter.hook_name("resid_mid", layer), None, None
        raise


def _pivots(matrix: Float[Tensor, "m n"], k: int) -> np.ndarray:
    """The k columns of ``matrix`` of best conditioning (column-pivoted QR), in pivot order."""
    _, _, piv = scipy.linalg.qr(matrix.detach().cpu().numpy(), mode="economic", pivoting=True)
    return piv[:k]


def _check_act(adapter: ModelAdapter) -> str:
    if adapter.d_mlp is None:
        raise MissingHookError(f"sparsify needs MLP layers; this {type(adapter.model).__name__} has none")
    if adapter.cfg.gated_mlp:
        raise UnsupportedArchitectureError("sparsify does not handle gated MLPs (Llama family: post = act(x W_gate) ⊙ (x W_in)): the "
                         "hidden unit is a product of two pre-activations, so neither removing dependent neurons nor "
                         "a block change of basis passes through it (METHODS §8)")
    act = (adapter.cfg.act_fn or "").lower()
    if not act.startswith(SUPPORTED_ACTIVATIONS):
        raise ValueError(f"sparsify supports ReLU, GELU and SiLU MLPs (act(0) = 0); got act_fn={adapter.cfg.act_fn!r}")
    return act


def _live_mlp(model, layer: int) -> dict[str, Tensor | None]:
    """The live MLP tensors of ``layer`` (TransformerLens layout: HookedTransformer, the toys, the bridge's views)."""
    mlp = model.blocks[layer].mlp
    return {name: getattr(mlp, name, None) for name in _MLP_TENSORS}


def _write_mlp(model, layer: int, values: dict[str, Tensor]) -> None:
    """Write ``values`` into the live MLP tensors of ``layer`` and read them back through the adapter."""
    live = _live_mlp(model, layer)
    with torch.no_grad():
        for name, value in values.items():
            if live[name] is None:
                raise ValueError(f"layer {layer} has no {name}; cannot write it")
            live[name].copy_(value.to(live[name]))
    back = adapt(model).mlp_weights()
    for name, value in values.items():
        got = getattr(back, name)[layer]
        if not torch.equal(got, value.to(got)):
            raise TypeError(f"writing {name} of layer {layer} of this {type(model).__name__} did not take effect; "
                            "sparsify needs a model whose MLP weights are its parameters (HookedTransformer, the toys)")


@dataclass
class _Block:
    """One block's change of basis, before the data decide where it goes."""

    neurons: list[int]  # the independent neurons I
    C: Float[Tensor, "s s"]
    rows: np.ndarray  # R: rows of [W̃; b] that become the identity (index D = the bias row)
    violations: Tensor | None = None  # samples on which a new neuron leaves the block's firing pattern


# ---------------------------------------------------------------------------------------------- passes
def _input_grams(adapter: ModelAdapter, batches, progress: bool) -> tuple[list[MomentAccumulator], list[MomentAccumulator]]:
    """Moments (mean and covariance) of every MLP input x (the norm's gain and bias applied), and
    those of the data's even-numbered sequences alone (for ``data_limited``), one pass."""
    L, D = adapter.n_layers, adapter.d_model
    inputs = [_mlp_input(adapter, layer) for layer in range(L)]
    accs = [MomentAccumulator(1, D, device=adapter.device) for _ in range(L)]
    halves = [MomentAccumulator(1, D, device=adapter.device) for _ in range(L)]

    def on_batch(step: Step) -> None:
        if not step.count:
            return
        seen: set[int] = set()

        def hook_for(layer: int):
            name, w, b = inputs[layer]

            def hook(act: Tensor, hook=None) -> None:
                if layer in seen:  # count one firing per forward
                    return
                seen.add(layer)
                unit = step.index.unit(tuple(act.shape), name)
                x = step.index.rows(act.detach(), unit).to(torch.float64)
                if w is not None:
                    x = x * w.to(x)
                if b is not None:
                    x = x + b.to(x)
                step.flags[name] = accs[layer].update(x[:, None])
                halves[layer].update(x[step.index.half(unit), None])

            return hook

        adapter.run_with_hooks(step.batch.tokens, fwd_hooks=[(inputs[l][0], hook_for(l)) for l in range(L)])

    stream(adapter.device, batches, on_batch, reduce=lambda: [*accs, *halves], desc="sparsify: MLP inputs",
           progress=progress)
    return accs, halves


def _check_firing(adapter: ModelAdapter, batches, blocks: dict[int, list[_Block]], progress: bool) -> None:
    """Count, per block, the samples on which the block's kept neurons p_I and the new ones p_I C do
    not all have one sign: where there are none, ReLU(p_I C) = ReLU(p_I) C on the data (paper eq.
    28). (With tol > 0 the kept neurons may disagree: comparing the new ones with p_I[0] alone wrote
    such a block into the model, drift 7·10⁻², audit 10a. The removed neurons are gone from the copy.)"""
    for bl in blocks.values():
        for b in bl:
            b.violations = torch.zeros((), dtype=torch.float64, device=adapter.device)
    names = {layer: adapter.hook_name("mlp_pre", layer) for layer in blocks}

    def on_batch(step: Step) -> None:
        if not step.count:
            return

        def hook_for(layer: int):
            def hook(p: Tensor, hook=None) -> None:
                rows = step.index.rows(p.detach(), step.index.unit(tuple(p.shape), names[layer])).to(torch.float64)
                for b in blocks[layer]:
                    p_I = rows[:, b.neurons]
                    firing = torch.cat([p_I, p_I @ b.C.to(p_I)], 1) > 0  # the kept neurons too (tol > 0)
                    b.violations += (firing != firing[:, :1]).any(1).sum()

            return hook

        adapter.run_with_hooks(step.batch.tokens, fwd_hooks=[(names[l], hook_for(l)) for l in blocks])

    stream(adapter.device, batches, on_batch, reduce=lambda: [b.violations for bl in blocks.values() for b in bl],
           desc="sparsify: firing check", progress=progress)


def _drift(original: ModelAdapter, copy_: ModelAdapter, batches, progress: bool) -> tuple[float, float]:
    """(max |Δ logits| / max |logits|, mean KL(original ‖ copy)) over the counted samples."""
    maxima = torch.zeros(2, dtype=torch.float64, device=original.device)  # max|Δ logits|, max|logits|
    totals = torch.zeros(2, dtype=torch.float64, device=original.device)  # Σ KL, n

    def on_batch(step: Step) -> None:
        if not step.count:
            return
        tokens, index = step.batch.tokens, step.index
        ref, new = original.forward(tokens), copy_.forward(tokens)
        unit = index.unit(tuple(ref.shape), "logits")
        ref, new = index.rows(ref, unit).to(torch.float64), index.rows(new, unit).to(torch.float64)
        kl = per_sample_loss("kl", new[None], reference_form("kl", ref))[0]
        step.flags["logits"] = torch.isfinite(new).all() & torch.isfinite(kl).all()
        maxima[0] = torch.maximum(maxima[0], (new - ref).abs().max())
        maxima[1] = torch.maximum(maxima[1], ref.abs().max())
        totals[0] += kl.sum()
        totals[1] += kl.numel()

    stream(original.device, batches, on_batch, reduce=lambda: [totals], desc="sparsify: drift", progress=progress,
           what="output")
    drift, scale = max_over_ranks(float(maxima[0])), max_over_ranks(float(maxima[1]))
    # KL ≥ 0: a negative mean (−5e-18 on a float64 copy that drifts by rounding only) is rounding, not a number to print
    return drift / max(scale, torch.finfo(torch.float64).tiny), max(0.0, float(totals[0] / totals[1].clamp_min(1)))


# ---------------------------------------------------------------------------------------------- the layer
def _eliminate_inputs(moment: Float[Tensor, "D D"], mean: Float[Tensor, " D"] | None, rank: int,
                      W: Float[Tensor, "D F"]):
    """Step 1: (kept K, eliminated J, A and a with x_J = x_K A + a on the data, W̃ with W̃_J = 0 and
    x W̃ + a W_J = x W). ``moment`` is the uncentred Gram (``mean`` None: a = 0) or, where W_in has a
    bias to absorb a W_J, the covariance with the inputs' ``mean``: (x − μ) N = 0 on the data gives
    x_J = x_K A + μ N N_J⁻¹ with A = −N_K N_J⁻¹."""
    D = moment.shape[0]
    _, vecs = torch.linalg.eigh(moment)
    null = vecs[:, : D - rank]  # eigh is ascending: the D − r smallest eigenvalues
    J = np.sort(_pivots(null.T, D - rank))
    K = np.setdiff1d(np.arange(D), J)
    A = -torch.linalg.solve(null[J].T, null[K].T).T if len(J) else null.new_zeros(rank, 0)  # −N_K N_J⁻¹
    a = null.new_zeros(len(J)) if mean is None or not len(J) else torch.linalg.solve(null[J].T, null.T @ mean)
    W_t = W.clone()
    if len(J):
        W_t[K] += A @ W[J]
        W_t[J] = 0
    return K, J, A, a, W_t


def _block_bases(M: Float[Tensor, "rows F"], value_gram: Float[Tensor, "F F"], s: int, neurons: list[int],
                 allowed_rows: np.ndarray):
    """Step 2 for one block: (independent neurons I, dependent ones, β with f_dep = f_I β on the data,
    the relative residual of that relation (the largest over the dependent neurons: how far they are
    from exact combinations, on their own scale), the block's change of basis as a :class:`_Block`,
    or None when s < 2 or when I's columns of [W̃; b] span fewer than s directions).

    I is chosen on the neurons' correlations (``balanced_values`` with d = 1), so that neither I nor s
    depends on how a ReLU neuron's scale is split between W_in and W_out. A smooth activation can
    make the post-activations of neurons with parallel input weights independent (GELU(p) and
    GELU(2p)): no C then gives M_I C an identity on s rows (eq. 26), and the block keeps its basis."""
    P = value_gram[neurons][:, neurons]
    order = _pivots(balanced_values(P, 1).gram, len(neurons)) if s else np.arange(len(neurons))
    I = [neurons[i] for i in sorted(order[:s])]
    dep = [n for n in neurons if n not in I]
    beta = (torch.linalg.solve(value_gram[I][:, I], value_gram[I][:, dep]) if s and dep
            else value_gram.new_zeros(len(I), len(dep)))
    residual = 0.0
    if dep:  # E(f_dep − f_I β)² = G_dd − G_dI β (the Schur complement), relative to E f_dep²
        own = value_gram[dep, dep]
        left = (own - (value_gram[dep][:, I] * beta.T).sum(1)).clamp_min(0)
        live = own > 0  # a neuron that never fires is exactly 0: no residual
        share = left[live] / own[live]
        # Below the float64 Gram's own resolution (width·eps, the rank rule's floor) the difference
        # is the subtraction's rounding (exact duplicates read 3·10⁻⁸, review 32), so the residual is
        # known only to lie below it: that bound is reported, not 0 (audit 15a: a neuron removed at
        # 2.9·10⁻⁷ of its signal read 0, and its drift of 2.8·10⁻⁷ was called rounding).
        floor = rule_rtol(value_gram.shape[0], torch.float64, gram=True)
        residual = float(share.clamp_min(floor).sqrt().max()) if bool(live.any()) else 0.0
    if s < 2:
        return I, dep, beta, residual, None
    sub = M[allowed_rows][:, I]  # rows of [W̃; b] the block may take as its identity
    if int(numerical_rank(torch.linalg.svdvals(sub), tuple(sub.shape), precision=torch.float64)) < s:
        return I, dep, beta, residual, None
    R = np.sort(allowed_rows[_pivots(sub.T, s)])
    C = torch.linalg.inv(M[R][:, I])
    return I, dep, beta, residual, _Block(neurons=I, C=C, rows=R)


def sparsify(
    model,
    data,
    tol: float | None = None,
    batch_size: int = 16,
    rank_rtol: float | None = None,
    progress: bool = True,
    seq_len: int | None = None,
    skip_bos: bool | None = None,
) -> SparsifyResult:
    """Re-parametrise a copy of ``model`` so that every free direction of METHODS §3–§4 in its MLPs
    becomes a pair of non-interacting nodes (METHODS §8, paper §4; module docstring).

    Args:
        model: a model ``tld.adapt`` takes, with ReLU, GELU or SiLU MLPs whose weights are its
            parameters (HookedTransformer, the bundled toys). Never modified.
        data: anything ``token_batches`` takes; every statistic and the drift use every non-padding
            position, BOS included (module docstring; a ``TokenBatches`` that leaves BOS out is read
            with BOS counted).
        tol: the neurons' distance for synchronized blocks (``neuron_synchronization``: their firing
            patterns and, paper eq. 20, their outputs on swapping patterns). Default 0
            for ReLU (identical firing on every sample: exact) and 0.05 for GELU/SiLU (approximate;
            read ``output_drift`` and ``kl``).
        rank_rtol: relative eigenvalue cut-off for the input and block ranks; default the package's
            rank rule at the forward's precision (as ``degeneracy_counts``).
        progress: tqdm bars over each pass (rank 0 only; the TQDM_DISABLE environment variable turns them off).
        skip_bos: ``None`` or ``False``; ``True`` is refused (BOS must count, module docstring).

    Returns:
        :class:`SparsifyResult` (``model``, ``bases``, ``to_frame()``).

    Raises:
        ValueError: a gated MLP, an unsupported activation, tol outside [0, 1], ``skip_bos=True``.
        MissingHookError: no MLP layers. TypeError: a model ``adapt`` does not take, or whose MLP
        weights cannot be written. DataError: empty data. NumericalError: non-finite outputs of the copy.
    """
    with failing_together("sparsify"):
        t0 = time.perf_counter()
        adapter = adapt(model)
        act = _check_act(adapter)
        exact_act = act in EXACT_ACTIVATIONS
        tol = (0.0 if exact_act else 0.05) if tol is None else float(tol)
        if not 0.0 <= tol <= 1.0 or math.isnan(tol):
            raise ValueError(f"tol must lie in [0, 1] (a neuron-synchronization distance); got {tol}")
        batches = counted_batches(data, adapter, batch_size, seq_len, skip_bos, "sparsify")
        # The blocks' firing patterns on the same samples as G¹ and the firing check, BOS included.
        sync = neuron_synchronization(model, batches, tol=tol, rank_rtol=rank_rtol, progress=progress)
        sync_frame = sync.to_frame()
        grams, half_grams = _input_grams(adapter, batches, progress)
        precision = activation_precision(adapter.dtype)
        weights = adapter.mlp_weights()
        # Gated MLPs are refused above, so W_in has a bias of its own exactly where b_in exists (adapter.map_biases).
        has_bias = adapter.map_biases(0)["W_in"]
        L, D, F = adapter.n_layers, adapter.d_model, adapter.d_mlp

        new_weights, pending, bases, rows = [], {}, [], []
        for layer in range(L):
            # With b_in, a direction on which x is constant is free up to a change of b_in (METHODS §4, §8):
            # the covariance, as degeneracy_counts reads it.
            moment, half_moment = ((g.covariance() if has_bias else g.gram())[0].cpu() for g in (grams[layer], half_grams[layer]))
            # and the rule leaves out a covariance's rounding, which a large mean sets above it (audit 21b F1)
            floor, half_floor = (covariance_floor(precision, g.gram()[0].diagonal()) if has_bias and rank_rtol is None
                                 else 0.0 for g in (grams[layer], half_grams[layer]))
            spectrum = descending_eigvalsh(moment).clamp_min(0)
            r_min, r, r_max = rank_band(spectrum, D, precision=precision, gram=True, rtol=rank_rtol, rounding=floor)
            r_half = int(numerical_rank(descending_eigvalsh(half_moment).clamp_min(0), D, precision=precision, gram=True,
                                        rtol=rank_rtol, atol=half_floor))
            W = weights.W_in[layer].to(torch.float64).cpu()
            b = weights.b_in[layer].to(torch.float64).cpu()
            W_out = weights.W_out[layer].to(torch.float64).cpu().clone()
            K, J, A, a, W_t = _eliminate_inputs(moment, grams[layer].mean[0].cpu() if has_bias else None, r, W)
            if len(J):
                b = b + a @ W[J]
            M = torch.cat([W_t, b[None]]) if has_bias else W_t  # row D: the bias, an input that is always 1
            allowed = np.concatenate([K, [D]]) if has_bias else K
            hidden_map = torch.eye(F, dtype=torch.float64, device="cpu")
            removed, blocks, silent = [], [], 0
            forced = torch.zeros(M.shape, dtype=torch.bool, device="cpu")  # the entries the construction sets to zero
            forced[J] = True
            residual, no_basis = 0.0, 0
            # Blocks of one neuron have nothing to remove, but for one that never fires on the data (f = 0,
            # alone in its firing pattern: audit 15a, one dead neuron stayed where two were removed).
            gram = sync.value_gram[layer]
            for neurons in (n for n in sync.blocks[layer] if len(n) > 1 or not bool(gram[n[0], n[0]] > 0)):
                s_block = sync.block_rank(layer, neurons)
                I, dep, beta, res, block = _block_bases(M, sync.value_gram[layer].to(torch.float64), s_block, neurons, allowed)
                residual = max(residual, res)
                no_basis += int(block is None and s_block > 1)
                if dep:  # f_dep = f_I β inside one firing pattern: W_out of I absorbs it, the neurons go
                    W_out[I] += beta @ W_out[dep]
                    M[:, dep] = 0
                    forced[:, dep] = True
                    W_out[dep] = 0
                    hidden_map[:, dep] = 0
                    removed += dep
                    silent += sum(1 for j in dep if not bool(gram[j, j] > 0))
                if block is not None:
                    blocks.append(block)
            new_weights.append({"M": M, "W_out": W_out, "forced": forced, "removed": removed})
            pending[layer] = blocks
            bases.append(dict(layer=layer, kept=K, eliminated=J, relation=A, offset=a, hidden_map=hidden_map))
            layer_blocks = sync_frame[sync_frame["layer"] == layer]  # blocks of ≥ 2 neurons
            scale = float((spectrum[r] / spectrum[0]).sqrt()) if r < D and float(spectrum[0]) > 0 else 0.0
            rows.append({"layer": layer, "input_rank": r, "input_rank_min": r_min, "input_rank_max": r_max,
                         "sample_limited": sample_limited(r, batches.n_distinct_samples, D, centered=has_bias),
                         "data_limited": r_half < r,
                         "blocks_changing": changing_blocks(layer_blocks),
                         "blocks_without_basis": no_basis, "removed_residual": residual,
                         "eliminated_scale": scale, "blocks": len(layer_blocks),
                         "activation_free": (D - r) * F, "sync_free": int(layer_blocks["extra_freedom"].sum()),
                         "sync_exact": bool((layer_blocks["count_exact"] & ~layer_blocks["approximate"]).all()), "removed_neurons": len(removed),
                         "removed_silent": silent,
                         "free_min": (D - r_max) * F, "free_max": (D - r_min) * F})

        warn_sample_limited("sparsify", sum(row["sample_limited"] for row in rows), L, "MLP inputs (input_rank)",
                            batches.n_distinct_samples)
        warn_data_limited("sparsify", sum(row["data_limited"] for row in rows), f"{L} layers", "the MLP input's rank is",
                          batches.n_sequences, "column data_limited",
                          "activation_free counts directions that more data would use, and the copy may drift off these "
                          "data; sparsify on more sequences")
        silent = sum(row["removed_silent"] for row in rows)
        if silent:
            # audit 19a F3: the half-data check cannot see a neuron silent on all of the data; one of six
            # removed fired on 1 of 288 held-out samples, and the copy drifted 1.1e-2 there (9e-16 on the data).
            warn_once(f"sparsify: {silent} of the removed neurons never fire on these data (column removed_silent), so "
                      "nothing here says whether they fire elsewhere: on inputs where one does, the copy drifts off the "
                      "model; sparsify on data that cover the inputs the copy will see", DataLimitedWarning, stacklevel=2)
        changing = sum(row["blocks_changing"] for row in rows)
        if changing:
            warn_once(f"sparsify: {changing} of {sum(row['blocks'] for row in rows)} synchronized blocks are formed otherwise "
                      f"by the even-numbered half of the {batches.n_sequences} sequences (column blocks_changing): the "
                      "neurons removed from them and their changes of basis hold on these data, and the copy may drift "
                      "off them; sparsify on more sequences", DataLimitedWarning, stacklevel=2)
        if any(row["blocks_without_basis"] for row in rows):
            warn_once("sparsify: at some synchronized blocks the neurons' input weights span fewer directions than their "
                      "post-activations (a smooth activation: GELU(p) and GELU(2p) are independent), so no change of basis "
                      "makes their input weights an identity (paper eq. 26): those blocks keep their basis and add no zeros "
                      "(column blocks_without_basis)", SyncCountWarning, stacklevel=2)
        if not all(row["sync_exact"] for row in rows):
            warn_once("sparsify: some synchronized blocks' extra freedom is an upper estimate (approximate blocks) or has "
                      "no closed form (left out of sync_free): column sync_exact; free_directions is then not exact",
                      SyncCountWarning, stacklevel=2)
        if any(pending.values()):
            _check_firing(adapter, batches, {l: b for l, b in pending.items() if b}, progress)

        sparse = copy_model(adapter.model)  # the model itself, also when an adapter was passed
        sparse_adapter = adapt(sparse)
        result_bases = []
        for layer in range(L):
            M, W_out, info = new_weights[layer]["M"], new_weights[layer]["W_out"], bases[layer]
            hidden_basis = torch.eye(F, dtype=torch.float64, device="cpu")
            stored = M.clone()  # the weights written into the model
            paper = M.clone()  # the weights in the paper's hidden basis (every block's C applied)
            forced, in_basis = new_weights[layer]["forced"], torch.zeros(M.shape, dtype=torch.bool, device="cpu")
            in_model = 0
            for block in pending[layer]:
                I = block.neurons
                new_cols = M[:, I] @ block.C
                new_cols[block.rows] = torch.eye(len(I), dtype=torch.float64, device="cpu")  # exactly the identity (eq. 26)
                paper[:, I] = new_cols
                off_diagonal = ~torch.eye(len(I), dtype=torch.bool, device="cpu")
                forced[np.ix_(block.rows, I)] = off_diagonal
                if int(block.violations) == 0:  # the new neurons keep the block's firing: exact in the model
                    stored[:, I] = new_cols
                    W_out[I] = M[block.rows][:, I] @ W_out[I]  # C⁻¹ = M_R
                    info["hidden_map"][np.ix_(I, I)] = block.C
                    in_model += 1
                else:
                    hidden_basis[np.ix_(I, I)] = block.C
                    in_basis[np.ix_(block.rows, I)] = off_diagonal
            values = {"W_in": stored[:D], "W_out": W_out}
            if has_bias:
                values["b_in"] = stored[D]
            _write_mlp(sparse, layer, values)
            written = sparse_adapter.mlp_weights()
            written_M = torch.cat([written.W_in[layer], written.b_in[layer][None]]) if has_bias else written.W_in[layer]
            # a removed neuron's W_out row is zero as well: its D hidden–output pairs no longer interact
            removed = new_weights[layer]["removed"]
            out_zeros = int((written.W_out[layer][removed].cpu() == 0).sum())
            zeros_added = int((forced & (paper == 0)).sum()) + len(removed) * W_out.shape[1]
            zeros_in_model = int((forced & ~in_basis & (written_M.cpu() == 0)).sum()) + out_zeros
            if (zeros_added != int(forced.sum()) + len(removed) * W_out.shape[1]
                    or zeros_in_model != int((forced & ~in_basis).sum()) + len(removed) * W_out.shape[1]):
                raise RuntimeError(f"layer {layer}: an entry the construction sets to zero is not zero (a bug; please report it)")
            drift, kl = _drift(adapter, sparse_adapter, batches, progress)
            if not (math.isfinite(drift) and math.isfinite(kl)):
                raise NumericalError(f"the sparsified model's outputs are not finite after layer {layer}")
            result_bases.append(LayerBasis(hidden_basis=hidden_basis, **info))
            row = rows[layer]
            row.update({"free_directions": row["activation_free"] + row["sync_free"],
                        "free_min": row["free_min"] + row["sync_free"], "free_max": row["free_max"] + row["sync_free"],
                        "zeros_added": zeros_added,
                        "zeros_in_model": zeros_in_model, "zeros_out": out_zeros, "blocks_in_model": in_model,
                        "blocks_in_basis": len(pending[layer]) - in_model, "output_drift": drift, "kl": kl})
        warn_half_storage("sparsify", sparse_adapter.dtype,
                          "the copy's outputs move by about that much beyond the construction's own change (output_drift "
                          "holds both)", "sparsify a float32 copy (model.float()) for a copy equal to float32 rounding",
                          stacklevel=2)
        return SparsifyResult(model=sparse, bases=result_bases, rows=rows, act_fn=adapter.cfg.act_fn, tol=tol,
                              approximate=sync.approximate, n_samples=sync.n_samples,
                              positions=batches.positions.to_dict(), seconds=time.perf_counter() - t0)
