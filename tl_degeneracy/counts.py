"""Activation and Jacobian degeneracy counts per linear map (METHODS §4).

For a linear map W: R^{d_in} → R^{d_out} inside the model, G = (1/n) Σ f fᵀ over its inputs and
K = (1/n) Σ E[g gᵀ] with g the gradient of the output probe (``kl``: Fisher-weighted, ``mse``) with
respect to W's output. Under the Kronecker factorisation H ≈ G ⊗ K (paper eq. 37), rank(H) ≈
rank(G)·rank(K), so W has ≈ d_in·d_out − rank(G)·rank(K) free directions; Σ rank(G)·rank(K) over
all maps is a cheap estimate of N_eff (``n_eff_kfac``) to set beside 2·λ̂_B.

Maps and where their statistics come from (one activation pass, one Jacobian-probe pass):

====================  ===========================================  =================================
map                   input f (G)                                  output (K)
====================  ===========================================  =================================
W_Q^h                 attention input (normalized residual;        hook_q, head h
                      shortformer: + hook_pos_embed, W_K too)
W_K^kv, W_V^kv        attention input                              hook_k / hook_v, KV head kv
W_O^h                 hook_z, head h                               hook_attn_out (sum over heads)
W_in (W_gate)         MLP input (normalized residual)              hook_pre_linear (hook_pre)
W_out                 hook_post                                    hook_mlp_out
W_E (optional)        one-hot tokens: G = diag(frequencies)        hook_embed
====================  ===========================================  =================================

Under GQA, W_K and W_V are counted once per stored KV head (METHODS §0). Biases are affine
offsets, not linear maps, and are left out of the count, but a map with a bias (``adapter.map_biases``)
reads its inputs' covariance instead of G: a direction on which the inputs are constant is free up to a
change of that bias (METHODS (4.1′); column ``centered``), so the count does not depend on whether a
LayerNorm's bias is stored in the norm or folded into the maps' biases. The attention/MLP input is ``ln1/ln2.hook_out`` on the
bridge and ``hook_normalized`` elsewhere (with HookedTransformer's unfolded gain and bias applied
to the Gram, since its ``hook_normalized`` precedes them). Behind a post-norm (Gemma 2/3's sandwich
norms) hook_attn_out / hook_mlp_out carry the norm's output, so W_O's and W_out's K are read at the
bridge's ``attn.o.hook_out`` / ``mlp.out.hook_out`` (:func:`write_output_hook`).

Ranks follow the package's one rule (METHODS §2, :func:`tl_degeneracy.numerics.rank_rtol` with
``gram=True``) for Grams of vectors computed in the forward/backward pass: its precision is
``activation_precision`` of the model's dtype (float32 for bf16/fp16/fp32 models, with a warning for half precision).
W_E's G = diag(token frequencies) is exact (counts of one-hot inputs), so its precision is float64;
the same rule and ``loss_scale`` decide which frequencies are zero.

Positions (METHODS §0, §4): every non-padding position counts, BOS included. A direction is free only
if nothing downstream reads it, and every later position reads the BOS position's activations
through attention, so leaving BOS out would call a direction free that only BOS uses
(:func:`counted_batches`; ``sparsify`` counts the same way).

Sample limit: n samples span at most n directions (n − 1 centred), so a Gram whose rank reached that bound below d_in says as much
about the data as about the model (``numerics.sample_limited``, per row, with a :class:`SampleLimitedWarning`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from .autograd import refuse_inference_mode
from .data import TokenBatches, as_seed, token_batches
from .distributed import failing_together, warn_once
from .errors import MissingHookError, UnsupportedArchitectureError
from .memory import check_batches, counts_forward_held, counts_held
from .models.adapt import adapt
from .models.adapter import ModelAdapter
from .models.weights import MLPWeights
from .numerics import (CUTOFF_BAND, HALF_DTYPES, DataLimitedWarning, SampleLimitedWarning, activation_precision,
                       check_tolerances, covariance_floor, rank_band, rounding_rtol, sample_limited, warn_data_limited,
                       warn_sample_limited)
from .stats.accumulators import MomentAccumulator, descending_eigvalsh
from .stats.activations import activation_stats
from .stats.gram_stats import JacobianHookStats
from .stats.jacobian import check_memory, jacobian_stats
from .stats.passes import resolve_targets
from .stats.samples import SampleIndex
from .stats.stream import Step, stream

__all__ = ["DataLimitedWarning", "ProbeLimitedWarning", "SampleLimitedWarning", "block_input_affine", "block_input_hook",
           "counted_batches", "degeneracy_counts", "input_moment", "input_rank_bound", "warn_sample_limited"]


class ProbeLimitedWarning(UserWarning):
    """A Jacobian Gram's rank from probes was still growing with the number of probes: rank_K is a
    lower bound, and the map's free count an upper bound."""


def counted_batches(data, adapter: ModelAdapter, batch_size: int, seq_len: int | None, skip_bos: bool | None,
                    caller: str) -> TokenBatches:
    """``data``'s batches with every non-padding position counted, BOS included (METHODS §4, §8): every
    later position reads the BOS position through attention, so a direction only BOS uses is not free.
    A :class:`~tl_degeneracy.data.TokenBatches` that leaves BOS out (the default of ``token_batches``)
    is read with it counted; ``skip_bos=True`` is refused for the same reason."""
    if skip_bos:
        raise ValueError(
            f"{caller} counts the BOS position (skip_bos=True refused): every later position reads it through "
            "attention, so a direction used only at BOS is not free, and leaving BOS out would count it free "
            "(METHODS §4, §8); leave skip_bos unset"
        )
    batches = token_batches(data, adapter, batch_size=batch_size, seq_len=seq_len, skip_bos=False)
    return dataclasses.replace(batches, skip_bos=False) if batches.skip_bos else batches


def block_input_hook(adapter: ModelAdapter, layer: int, ln: str) -> str:
    """Hook carrying the input of the attention (``ln1``) or MLP (``ln2``) linear maps: the norm's
    output in a pre-norm block (``ln1``'s for both in a parallel block with one norm), the residual stream itself (``resid_pre`` / ``resid_mid``) in a model
    without normalization (toy:modadd). A ``hook_normalized`` is checked to carry x/σ before any pass
    reads it (:func:`check_normalized_hooks`)."""
    name = _input_hook(adapter, layer, ln)
    if name.endswith(".hook_normalized"):
        check_normalized_hooks(adapter)
    return name


def _input_hook(adapter: ModelAdapter, layer: int, ln: str) -> str:
    if adapter.cfg.normalization is not None:
        adapter.norm_weights(layer, ln)  # a post-norm block (OLMo2) has no norm in front: MissingHookError
    available = adapter.available_hooks()
    norm = adapter.block_norm(layer, ln)
    # hook_out (the bridge) is the input itself; hook_normalized may precede the norm's affine part
    # (block_input_affine), so it comes second.
    names = [f"blocks.{layer}.{norm}.hook_out", f"blocks.{layer}.{norm}.hook_normalized"]
    if adapter.cfg.normalization is None:
        names.append(f"blocks.{layer}.hook_resid_{'pre' if ln == 'ln1' else 'mid'}")
    for name in names:
        if name in available:
            return name
    raise MissingHookError(
        f"cannot find the input of layer {layer}'s {'attention' if ln == 'ln1' else 'MLP'} on this "
        f"{type(adapter.model).__name__} (none of {', '.join(names)}); degeneracy_counts needs a standard "
        "pre-norm block (or no normalization at all), not a parallel or post-norm one"
    )


def write_output_hook(adapter: ModelAdapter, layer: int, sublayer: str) -> str:
    """Hook carrying W_O's (``"attn"``) or W_out's (``"mlp"``) own output p = W f + b, where K is read
    (METHODS §4): ``hook_attn_out`` / ``hook_mlp_out``, except behind a post-norm (Gemma 2/3's
    ``ln1_post`` / ``ln2_post``), where those carry the norm's output — whose Jacobian removes each
    sample's radial direction, so K's rank could differ (audit 9) — and the bridge's ``attn.o.hook_out`` /
    ``mlp.out.hook_out`` carry the map's own. A backend without such a hook (HookedTransformer) is refused."""
    kind = {"attn": "attn_out", "mlp": "mlp_out"}[sublayer]
    if not adapter.post_norm(sublayer):
        return adapter.hook_name(kind, layer)
    name = f"blocks.{layer}.{'attn.o' if sublayer == 'attn' else 'mlp.out'}.hook_out"
    if name in adapter.available_hooks():
        return name
    raise MissingHookError(
        f"layer {layer} of this {type(adapter.model).__name__} normalizes its {'attention' if sublayer == 'attn' else 'MLP'}'s "
        f"output before the residual add (Gemma 2/3), so hook_{kind} carries that norm's output, and no hook carries "
        f"{'W_O' if sublayer == 'attn' else 'W_out'}'s own, where degeneracy_counts reads K; load the model as a "
        "TransformerBridge (its attn.o / mlp.out hooks carry it)"
    )


def block_input_affine(adapter: ModelAdapter, layer: int, ln: str) -> tuple[Tensor | None, Tensor | None]:
    """(w, b) such that the linear maps' input is x = n·w + b with n = the activation at
    :func:`block_input_hook`: the norm's effective gain and its bias where that hook is a
    ``hook_normalized``, which every backend fires on x/σ before them (HookedTransformer, the
    bridge's NormalizationBridge, the toys); (None, None) where the hook is the input itself (the
    bridge's ``hook_out``) or the norm has no gain and bias (folded, weightless)."""
    if not block_input_hook(adapter, layer, ln).endswith(".hook_normalized"):
        return None, None
    norm = adapter.norm_weights(layer, ln)
    return norm.w, norm.b


#: How far a ``hook_normalized`` row may sit from x/σ before it is taken for the norm's output after
#: its gain and bias (relative). Where the norm's ``hook_scale`` and ε are known, a row's mean square
#: must be (σ² − ε)/σ² (LayerNorm and RMSNorm alike; checked on rows with σ² ≥ 2ε): rounding moves it by
#: about eps of the forward's precision, plus (eps·|mean x|/σ)² where a half-precision LayerNorm
#: subtracts a rounded mean (10⁻² at |mean| = 30σ in bfloat16). Without them, only a mean square
#: above 1 tells. A LayerNorm row of x/σ also sums to 0: |Σ_i n_i|/‖n‖, checked in float32 and float64
#: only, since a rounded mean leaves √D·eps·|mean x|/σ of it in half precision (review 60 F3).
NORMALIZED_TOLERANCE = 0.05

_NORMALIZED_CHECKED: weakref.WeakSet = weakref.WeakSet()


def check_normalized_hooks(adapter: ModelAdapter) -> None:
    """Refuse a model whose ``hook_normalized`` fires on the norm's output after its gain and bias
    rather than on x/σ: :func:`block_input_affine` applies (w, b) to that hook's activation, so they
    would count twice and every input moment (counts, synchronization, sparsify) would be another
    model's (review 58 #6: a third-party toy's norm). One forward of :meth:`ModelAdapter.example_tokens`
    per adapter, reading every layer's attention and MLP input hook whose norm has a gain or bias, and
    the norm's ``hook_scale`` where it has one. A necessary condition only: a gain within the
    tolerance of 1 with no bias passes, and so does any gain where neither the scale nor ε is known
    and the mean square stays at most 1."""
    if adapter in _NORMALIZED_CHECKED:
        return
    norms, scales, worst = {}, {}, {}
    available = adapter.available_hooks()
    for layer in range(adapter.n_layers):
        for ln in ("ln1", "ln2"):
            try:
                name = _input_hook(adapter, layer, ln)
            except MissingHookError:
                continue
            norm = adapter.norm_weights(layer, ln)
            if name.endswith(".hook_normalized") and (norm.w is not None or norm.b is not None):
                norms[name] = norm
    scale_of = {name: name.removesuffix("hook_normalized") + "hook_scale" for name in norms}

    def read_scale(name: str):
        def hook(act: Tensor, hook=None) -> None:
            scales[name] = act.detach().to(torch.float64).squeeze(-1)

        return hook

    def read(name: str):
        def hook(act: Tensor, hook=None) -> None:
            n = act.detach().to(torch.float64)
            square = n.square().mean(-1)
            found = worst.setdefault(name, {"square": 0.0, "ratio": None, "sum": None})
            found["square"] = max(found["square"], square.max().item())
            sigma2, eps = scales.get(scale_of[name]), norms[name].eps
            if sigma2 is not None and eps is not None and sigma2.shape == square.shape:
                sigma2 = sigma2.square()
                rows = sigma2 >= 2 * eps  # below, σ² − ε cancels
                if rows.any():
                    ratio = (square[rows] / ((sigma2[rows] - eps) / sigma2[rows]) - 1).abs().max().item()
                    found["ratio"] = max(found["ratio"] or 0.0, ratio)
            if norms[name].kind == "layernorm" and act.dtype not in HALF_DTYPES:
                total = (n.sum(-1).abs() / n.norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)).max().item()
                found["sum"] = max(found["sum"] or 0.0, total)

        return hook

    hooks = []
    for name in sorted(norms):
        if scale_of[name] in available:
            hooks.append((scale_of[name], read_scale(scale_of[name])))
        hooks.append((name, read(name)))
    with torch.no_grad():
        adapter.run_with_hooks(adapter.example_tokens(2, 8), fwd_hooks=hooks)
    for name, found in sorted(worst.items()):
        ratio, total = found["ratio"], found["sum"]
        wrong = []
        if ratio is not None and ratio > NORMALIZED_TOLERANCE:
            wrong.append(f"its rows' mean square differs from x/σ's, σ²/(σ² + ε), by up to {ratio:.1%}")
        elif ratio is None and found["square"] > 1 + NORMALIZED_TOLERANCE:
            wrong.append(f"its rows' largest mean square is {found['square']:.3g} (x/σ: at most 1)")
        if total is not None and total > NORMALIZED_TOLERANCE:
            wrong.append(f"its rows sum to up to {total:.3g}·‖n‖ (LayerNorm's x/σ: 0)")
        if wrong:
            raise UnsupportedArchitectureError(
                f"{name} of this {type(adapter.model).__name__} does not carry the normalized x/σ: {'; '.join(wrong)}. "
                "It seems to fire after the norm's gain and bias, which tl_degeneracy applies itself, so they would "
                "count twice; fire hook_normalized on x/σ, before w and b, as TransformerLens does "
                "(docs/architecture.md)")
    _NORMALIZED_CHECKED.add(adapter)


#: Maps whose outputs reach only their own position's outputs when they are the last layer's (no later
#: attention mixes positions): a query reads one position, W_O writes it, the MLP acts on it.
_OWN_POSITION_MAPS = ("W_Q", "W_O", "W_in", "W_gate", "W_out")


def _k_sample_bound(map_name: str, layer: int | None, n_layers: int, exact: bool, output: str, n_probes: int,
                    d_vocab_out: int, n_distinct: int, n_positions: int) -> int | None:
    """The most directions a map's Jacobian Gram K can hold on these data (audit 23b F1: a 2-token
    vocabulary's W_O read rank_K 12 of 15 on 12 distinct samples, unflagged): with probes, one
    gradient per probe and position (each sequence draws its own probes, so a repeated sequence adds
    directions); exact, for a last-layer map whose output reaches only its own position's outputs
    (:data:`_OWN_POSITION_MAPS`), one per output direction of a distinct sample: V − 1 under kl (the
    softmax's Fisher loses the constant), V under mse. None (not checked) elsewhere: there later
    attention carries a position's output to later positions, and the bound grows with the lengths. A rank
    at the bound is flagged only below the most K can hold (``degeneracy_counts``: d_out, or D − 1 for a
    map writing a LayerNorm model's residual stream, whose mean no reader reads)."""
    if not exact:
        return n_probes * n_positions
    per_sample = {"kl": d_vocab_out - 1, "mse": d_vocab_out}.get(output)
    if per_sample is None or layer != n_layers - 1 or map_name not in _OWN_POSITION_MAPS:
        return None
    return per_sample * n_distinct


def input_rank_bound(adapter: ModelAdapter, centered: bool) -> int:
    """The most directions the covariance (``centered``) or uncentred Gram of a block input x = n·w + b
    can have: D − 1 for the covariance under LayerNorm (n is mean-free, so Cov(x) = diag(w) Cov(n)
    diag(w) has rank ≤ D − 1), D otherwise. A half-precision forward's rounding fills the missing
    direction above float32's cut-off (audit 14b: D_in 32 of D = 32 on a bfloat16 bridge), which
    the analyses cap here rather than count. Not for a shortformer's query/key input x̃ = x + W_pos[p]."""
    return adapter.d_model - int(centered and adapter.cfg.normalization is not None
                                 and adapter.norm_weights(0, "ln1").kind == "layernorm")


def input_moment(adapter: ModelAdapter, layer: int, ln: str, acc: MomentAccumulator, centered: bool,
                 bias: bool = True) -> Tensor:
    """The second moment of the linear maps' input x = n·w + b (:func:`block_input_affine`) from the
    moments ``acc`` of n, the activation at :func:`block_input_hook`: the covariance W Cov(n) W (the
    bias b drops out), or the uncentred E[x xᵀ] = W E[n nᵀ] W + W μ bᵀ + b μᵀ W + b bᵀ, with W = diag(w).
    Counts (METHODS (4.1′)) and synchronization (D_in, METHODS §3) read their input ranks from it.
    ``bias=False``: the uncentred W E[n nᵀ] W, the scale of the rounding the covariance carries (n's,
    scaled by w: b is added here, in float64, not in the forward that rounded n)."""
    w, b = block_input_affine(adapter, layer, ln)
    b = b if bias else None
    moment, mean = (acc.covariance() if centered else acc.gram())[0], acc.mean[0]
    if w is not None:
        w = w.detach().to(moment)
        moment = w[:, None] * moment * w[None, :]
        mean = mean * w
    if b is not None and not centered:
        b = b.detach().to(moment)
        moment = moment + torch.outer(mean, b) + torch.outer(b, mean) + torch.outer(b, b)
    return moment


def _input_moments(adapter: ModelAdapter, batches, hooks: list[str], progress: bool,
                   query_key: dict[str, tuple[Tensor | None, Tensor | None]] | None = None,
                   ) -> tuple[dict, dict]:
    """Uncentred moments of the normalized block inputs, and those of the data's even-numbered
    sequences alone (for ``data_limited``), counting each hook's first firing per forward pass only:
    HookedTransformer applies ``ln1`` separately to the query, key and value inputs (three firings
    of one hook with identical values), which ``activation_stats`` refuses.

    ``query_key`` (a shortformer model): for each of its hooks, with the (w, b) of
    :func:`block_input_affine`, also the moments of what the queries and keys read,
    x̃ = n·w + b + the position embedding (``hook_pos_embed``, as the model adds it, padding offsets
    included), keyed ``(hook, "query_key")``."""
    query_key = query_key or {}
    accs: dict = {}
    halves: dict = {}
    keys = [*hooks, *((n, "query_key") for n in hooks if n in query_key)]

    def on_batch(step: Step) -> None:
        seen: set[str] = set()
        pos: dict[str, Tensor] = {}

        def add(key, act: Tensor, unit) -> None:
            rows = step.index.rows(act, unit).reshape(-1, 1, act.shape[-1])
            if key not in accs:  # also on a rank without batches (step.count False): it joins the reduction
                accs[key] = MomentAccumulator(1, rows.shape[-1], device=adapter.device)
                halves[key] = MomentAccumulator(1, rows.shape[-1], device=adapter.device)
            if step.count:
                step.flags[key] = accs[key].update(rows)
                halves[key].update(rows[step.index.half(unit)])

        def keep(name):
            def hook(act: Tensor, hook=None) -> None:
                if name in seen:
                    return
                seen.add(name)
                act = act.detach()
                unit = step.index.unit(tuple(act.shape), name)
                add(name, act, unit)
                if name in query_key:
                    w, b = query_key[name]
                    x = act * (1 if w is None else w.to(act)) + (0 if b is None else b.to(act))
                    add((name, "query_key"), x + pos["embed"].to(act), unit)

            return hook

        def keep_pos(act: Tensor, hook=None) -> None:
            pos["embed"] = act.detach()

        fwd = [("hook_pos_embed", keep_pos)] if query_key else []
        adapter.run_with_hooks(step.batch.tokens, fwd_hooks=fwd + [(n, keep(n)) for n in hooks])
        silent = [n for n in hooks if n not in seen]
        if silent:
            raise MissingHookError(f"hook(s) {silent} did not fire on this {type(adapter.model).__name__}")

    stream(adapter.device, batches, on_batch, reduce=lambda: [*(accs[k] for k in keys), *(halves[k] for k in keys)],
           desc="degeneracy_counts", progress=progress, what="activation")  # the same order on every rank
    return accs, halves


def _rounding_floors(weights: MLPWeights, layer: int, input_norm: float, output_norm: float, dtype: torch.dtype,
                     bias_after_product: bool) -> dict[str, Float[Tensor, " d_mlp"]]:
    """Per neuron of ``layer``, the RMS over the samples at or below which the counts read its value in
    their Grams as the forward's rounding (METHODS §4): 4·eps(``dtype``)·T_k/√D, a few times the typical
    rounding of one sample's dot product of D terms of sizes ≈ T_k/D each (rounding errors add up as a
    random walk; the worst case, D·eps·T_k, exceeds T_k in bfloat16 at D ≥ 128); 0 for a float16 or
    bfloat16 forward. ``"W_out"``: its activation, T_k = ‖x‖‖W_in[:, k]‖ +
    |b_in[k]| (gated: the product of the gate's and the linear factor's T, with TransformerLens's b_in
    after the product where ``bias_after_product``), ‖x‖ = ``input_norm`` (√E‖x‖² of the MLP's input);
    ``"W_in"``, ``"W_gate"``: its pre-activation's gradient, T_k = ‖W_out[k]‖·``output_norm`` (√E‖g‖²
    of the gradient at the MLP's output; gated, times the other factor's T). A ReLU rescaling of a
    neuron scales its values and its floor alike. float64, on the CPU."""
    def f64(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[layer].detach().to(torch.float64).cpu()

    W_in, b_in, W_out, W_gate, b_gate = (f64(t) for t in (weights.W_in, weights.b_in, weights.W_out, weights.W_gate,
                                                          weights.b_gate))
    D = W_in.shape[0]
    reads = input_norm * W_in.norm(dim=0)
    writes = output_norm * W_out.norm(dim=1)
    if W_gate is None:
        sizes = {"W_out": reads + b_in.abs(), "W_in": writes}
    else:
        gate = input_norm * W_gate.norm(dim=0) + (0.0 if b_gate is None else b_gate.abs())
        linear = reads if bias_after_product else reads + b_in.abs()
        sizes = {"W_out": gate * linear + (b_in.abs() if bias_after_product else 0.0),
                 "W_gate": writes * linear, "W_in": writes * gate}
    # Not in half precision: there the floor (≈ 3 % of the terms in bfloat16) read real neurons as 0 where
    # they fire on few samples or sit in GELU's tail, correct to a few % (review 49: 15 for float32's 16, the
    # band without 16); the band's upper cut-off reaches the rounding level instead, and the ranks stay
    # upper bounds, as the HalfPrecisionWarning says.
    level = 0.0 if dtype in HALF_DTYPES else 4 * torch.finfo(dtype).eps / math.sqrt(D)
    return {name: level * size for name, size in sizes.items()}


def _neuron_units(diagonal: Float[Tensor, " d_mlp"], floor: Float[Tensor, " d_mlp"],
                  variances: Float[Tensor, " d_mlp"] | None = None) -> Float[Tensor, " d_mlp"]:
    """The scales at which the counts rank a neuron-indexed Gram (``band``'s ``units``): each neuron's
    own RMS √M_kk, so that a ReLU rescaling moves no rank (audit 19b F1: against the Gram's largest
    eigenvalue, c = 10⁻⁶ read W_in's rank_K 1 of 16), a neuron that fires rarely counting as much as
    one that fires always; and ∞ (its row and column read as 0) where that RMS is at most its
    ``floor`` (:func:`_rounding_floors`): a pre-activation that cancels to rounding is no direction
    (review 47), whose own RMS would have made its rounding one. (Scales from the weights alone cut
    real neurons that fire on few samples, review 48.) ``variances``: the neurons' variances where the
    Gram is a covariance; ∞ also where the standard deviation is at most the floor: a neuron whose
    pre-activation cancels to a constant varies only by its rounding, which is relative to the dot
    product's terms, not to its value, so the covariance floor (relative to E[f²]) leaves it in (audit
    22b F1: in float32 a ReLU neuron at 0.5 with terms of 300 read one direction more than float64, and
    the band left the truth out). The floor lies 3.5–20 times above the rounding such neurons show, so
    a neuron that really varies within it is dropped too (review 53 #1): the counts read the band's
    fewest directions at these units, the rank at the others."""
    rms = diagonal.detach().to(torch.float64).cpu().clamp_min(0).sqrt()
    varies = rms > floor
    if variances is not None:
        varies &= variances.detach().to(torch.float64).cpu().clamp_min(0).sqrt() > floor
    return torch.where(varies, rms, torch.full_like(rms, math.inf))


def _token_frequencies(batches: TokenBatches, d_vocab: int) -> tuple[Float[Tensor, " d_vocab"], Float[Tensor, " d_vocab"]]:
    """Frequency of each token over the counted positions: the eigenvalues of W_E's input Gram
    G = (1/n) Σ e_t e_tᵀ = diag(frequencies) (METHODS (4.1) for one-hot inputs), float64; and the same
    over the data's even-numbered sequences alone (``SampleIndex.half``, for ``data_limited``)."""
    counts = torch.zeros(2, d_vocab, dtype=torch.float64)
    for batch in batches:
        index = SampleIndex.from_batch(batch)
        tokens, half = index.rows(batch.tokens, "position").cpu(), index.half("position").cpu()
        counts[0] += torch.bincount(tokens, minlength=d_vocab).to(torch.float64)
        counts[1] += torch.bincount(tokens[half], minlength=d_vocab).to(torch.float64)
    return counts[0] / max(float(counts[0].sum()), 1.0), counts[1] / max(float(counts[1].sum()), 1.0)


def degeneracy_counts(
    model,
    data,
    rtol: float | None = None,
    loss_scale: float | None = None,
    output: str = "kl",
    n_probes: int = 8,
    exact: bool = False,
    embeddings: bool = False,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    seq_len: int | None = None,
    skip_bos: bool | None = None,
) -> pd.DataFrame:
    """Kronecker estimate of free directions per linear map (METHODS §4; module docstring).

    Returns one row per map: ``map`` (W_Q, W_K, W_V, W_O, W_in, W_gate, W_out, W_E), ``layer``,
    ``head`` (query head, or KV head for W_K/W_V; None for MLP maps), ``d_in``, ``d_out``,
    ``n_params`` = d_in·d_out, ``rank_G``, ``rank_K``, ``kfac`` = rank_G·rank_K (4.5), ``free`` =
    n_params − kfac (4.4), ``centered`` (the map has a bias, so rank_G is that of its inputs'
    covariance, (4.1′)), ``sample_limited`` (rank_G reached the n samples, n − 1 centred, below d_in:
    ``numerics.sample_limited``; or rank_K reached its own bound below d_out, :func:`_k_sample_bound`;
    a :class:`SampleLimitedWarning` says how many) and ``probe_limited``
    (with probes: the Gram of the first half of each batch's probes has a lower rank than all of them
    together, so rank_K is still growing with the probes: a lower bound, and ``free`` an upper bound;
    a :class:`ProbeLimitedWarning` says how many; METHODS §4) and ``data_limited`` (rank_G or rank_K
    is lower on the data's even-numbered sequences alone than on all of them: still growing with the
    data, which ``sample_limited`` does not see when few distinct inputs keep a rank below n; a
    :class:`DataLimitedWarning` says how many), and ``kfac_min`` / ``kfac_max``: kfac with the rank
    rule's cut-off moved ``numerics.CUTOFF_BAND``-fold up / down (``numerics.rank_band``), equal to
    kfac where G's and K's spectra have gaps around the cut-off and spread where they decay smoothly
    through it (the rank is then the cut-off's as much as the model's; for a half-precision forward
    the upper cut-off reaches at least its rounding level, ``numerics.rounding_rtol``). ``frame.attrs``
    holds ``n_eff_kfac`` (Σ kfac; a lower bound where a map is data- or probe-limited, and where the
    model computes in bfloat16/float16, ``half_precision``, possibly too high as well: its ranks may
    count the forward's rounding, audit 9: toy:modadd 142,080 in bfloat16 against 77,335 in float32),
    ``n_eff_kfac_band`` ([Σ kfac_min, Σ kfac_max]), ``n_params``, ``data_limited_maps``,
    ``probe_limited_maps``, the tolerances, the objective and the positions counted: every
    non-padding position, BOS included (:func:`counted_batches`).

    Args:
        data: anything ``token_batches`` takes; a ``TokenBatches`` that leaves BOS out is read with
            BOS counted.
        rtol: an eigenvalue counts when above rtol·(largest eigenvalue of that Gram; for the MLP's
            neuron-indexed Grams, W_out's G and W_in's and W_gate's K, of the Gram with each neuron at
            its own scale and those at their rounding level read as 0, :func:`_neuron_units`, so that a
            ReLU neuron's rescaling moves no rank); default: the
            package's rank rule for a Gram (:func:`tl_degeneracy.numerics.rank_rtol` with ``gram=True``)
            of that Gram's size at the forward pass's precision, ``activation_precision`` of the model's
            dtype (float64 for W_E's exact token frequencies).
        loss_scale: eigenvalues at or below it also count as zero (METHODS §4: a direction whose
            variance is below ε is free at loss scale ε; for W_E, a token frequency). ``None``: no
            absolute cut-off. Unlike the ranks, such counts depend on the parametrisation (a gauge
            or a ReLU rescaling moves the eigenvalues an absolute cut sees; METHODS §4).
        output: ``"kl"`` (Fisher-weighted) or ``"mse"`` on the logits, for K.
        n_probes, exact, seed: the Jacobian probes (``tld.jacobian_stats``).
        embeddings: also count W_E (one-hot inputs, G = diag of token frequencies).
        progress: a tqdm bar per pass over the data (block inputs, activations, Jacobian probes),
            as for the statistics passes (rank 0 only; TQDM_DISABLE turns them off).
        skip_bos: ``None`` or ``False``; ``True`` is refused (BOS must count, module docstring).

    Raises:
        ValueError: ``output`` not kl/mse, a negative ``loss_scale``, ``skip_bos=True``.
        MemoryBudgetError: a batch of the activation or Jacobian-probe pass would not fit the memory
        budget (``tld.memory``); raised before the first pass, saying what to lower.
    """
    with failing_together("degeneracy_counts"):
        if output not in ("kl", "mse"):
            raise ValueError(f"output must be 'kl' or 'mse'; got {output!r}")
        if loss_scale is not None and not loss_scale >= 0:
            raise ValueError(f"loss_scale must be a non-negative number or None; got {loss_scale!r}")
        refuse_inference_mode("degeneracy_counts")  # before the activation passes, not after them
        rtol, _ = check_tolerances(rtol)
        seed = as_seed(seed)
        adapter = adapt(model)
        mlp = adapter.d_mlp is not None  # attention-only models have no W_in/W_out
        batches = counted_batches(data, adapter, batch_size, seq_len, skip_bos, "degeneracy_counts")
        L, H, n_kv, D, d = adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, adapter.d_model, adapter.d_head
        atol = 0.0 if loss_scale is None else float(loss_scale)
        gated = adapter.cfg.gated_mlp

        attn_in = [block_input_hook(adapter, layer, "ln1") for layer in range(L)]
        mlp_in = [block_input_hook(adapter, layer, "ln2") for layer in range(L)] if mlp else []
        g_hooks = adapter.hook_names("z") + (adapter.hook_names("mlp_post") if mlp else [])
        attn_out = [write_output_hook(adapter, layer, "attn") for layer in range(L)]
        mlp_out = [write_output_hook(adapter, layer, "mlp") for layer in range(L)] if mlp else []
        k_hooks = adapter.hook_names(["q", "k", "v"]) + attn_out
        if mlp:
            k_hooks += adapter.hook_names(["mlp_pre"]) + mlp_out
            if gated:
                k_hooks += [f"blocks.{layer}.mlp.hook_pre_linear" for layer in range(L)]
        if embeddings:
            k_hooks.append(adapter.hook_name("embed"))
        # Before the first pass: the Jacobian-probe pass (logits' softmax, cotangents and the autograd
        # graph) is the one that outgrows memory first, with a large vocabulary; fail now, not after the
        # activation passes.
        check_batches(adapter, "forward", batches, "degeneracy_counts' activation passes", held=counts_forward_held(adapter))
        check_memory(adapter, batches, resolve_targets(adapter, k_hooks, "degeneracy_counts"), output_hook=None,
                     n_probes=n_probes, exact=exact, what="degeneracy_counts' Jacobian-probe pass",
                     held=counts_held(adapter))  # the activation passes' Grams, the split-half checks' Grams

        # A shortformer's queries and keys read ln1(x) + W_pos[p], its values ln1(x) (METHODS §2).
        shortformer = adapter.cfg.positional_embedding == "shortformer"
        query_key = {attn_in[layer]: block_input_affine(adapter, layer, "ln1") for layer in range(L)} if shortformer else None
        inputs, input_halves = _input_moments(adapter, batches, attn_in + mlp_in, progress, query_key)
        with warnings.catch_warnings():
            # The counts judge their own Grams' sample limit (column sample_limited, one warning below), which
            # activation_stats would also warn of, for z and hook_post, in other words.
            warnings.filterwarnings("ignore", category=SampleLimitedWarning, message="activation_stats")
            acts = activation_stats(adapter, batches, hooks=g_hooks, per_head=True, progress=progress, half=True)
        jac = jacobian_stats(adapter, batches, hooks=k_hooks, output=output, n_probes=n_probes, exact=exact,
                             seed=seed, per_head=True, progress=progress, halves="first", half=True)
        precision = activation_precision(adapter.dtype)  # activations and gradients carry the forward's rounding
        # A half-precision forward's rounding sits far above float32's cut-off: the band reaches up to it.
        rounding = rounding_rtol(adapter.dtype, gram=True)
        n = batches.n_distinct_samples  # what a Gram's rank can reach: every sequence's BOS is one sample

        def spectrum_band(spectrum: Float[Tensor, " k"], inputs_precision: torch.dtype = precision,
                          second_moments: Tensor | None = None, floor: float = atol) -> tuple[int, int, int]:
            """The eigenvalues that are not zero: above the rank rule (0.4) and above loss_scale (METHODS
            §4; ``floor``), with the ranks at the rule's cut-off moved CUTOFF_BAND-fold up and down (rank_band) —
            up to the forward's rounding level at least for a half-precision model (exact inputs,
            W_E's token frequencies, have none), which for a covariance is set by its activations'
            uncentred ``second_moments`` E[f_i²] (rank_band's noise_scale). The rule's own cut-off (``rtol`` not
            given) also leaves out a covariance's rounding, which its mean can set above it
            (numerics.covariance_floor; audit 21b F1: 15 of 16 directions in float32 where float64 reads 4)."""
            scale = None if second_moments is None else float(second_moments.max())
            own = 0.0 if second_moments is None or rtol is not None else covariance_floor(inputs_precision, second_moments)
            return rank_band(spectrum, spectrum.shape[-1], precision=inputs_precision, gram=True,
                             rtol=None if rtol is None else float(rtol), atol=floor,
                             noise_rtol=rounding if inputs_precision == precision else None, noise_scale=scale,
                             rounding=own)

        def band(m: Tensor, second_moments: Tensor | None = None, units: Tensor | None = None,
                 fewest: Tensor | None = None) -> tuple[int, int, int]:
            """The band of a Gram ``m`` (``second_moments``: as :func:`spectrum_band`'s); ``units``: its units'
            scales (:func:`_neuron_units`): the rule then reads D⁻¹mD⁻¹ (and D⁻²·second_moments), and
            loss_scale still m's own eigenvalues; ``fewest``: other units at which the band's fewest
            directions are read too (its low end the smaller)."""
            if fewest is not None:
                low = band(m, second_moments, fewest)[0]
                b = band(m, second_moments, units)
                return min(low, b[0]), b[1], b[2]
            if units is None:
                return spectrum_band(descending_eigvalsh(m), second_moments=second_moments)
            inverse = (1 / units).to(m.device)
            b = spectrum_band(descending_eigvalsh(m * inverse[:, None] * inverse[None, :]), floor=0.0,
                              second_moments=None if second_moments is None else second_moments * inverse.square())
            if atol:
                significant = int((descending_eigvalsh(m) > atol).sum())
                b = tuple(min(r, significant) for r in b)
            return b

        def rank(m: Tensor, units: Tensor | None = None) -> int:
            return band(m, units=units)[1]

        def g_rank(whole: Tensor, half: Tensor, most: int | None = None,
                   second_moments: tuple[Tensor, Tensor] | None = None,
                   units: Tensor | None = None, fewest: Tensor | None = None) -> tuple[tuple[int, int, int], bool]:
            """rank_G (its band, each at most ``most``), and whether the data's even-numbered sequences
            alone give a lower one: the rank is still growing with the data. ``second_moments``: the
            uncentred second moments E[f_i²] of both where they are covariances (their rounding level);
            ``units``, ``fewest``: as :func:`band`'s."""
            most = whole.shape[-1] if most is None else most
            whole_moment, half_moment = (None, None) if second_moments is None else second_moments
            b = tuple(min(r, most) for r in band(whole, whole_moment, units, fewest))
            return b, min(band(half, half_moment, units)[1], most) < b[1]

        def k_rank(key, head: int | None = None, units: Tensor | None = None) -> tuple[tuple[int, int, int], bool, bool]:
            """rank_K (its band), whether it is probe-limited and whether it grows with the data. Every
            probe gradient lies in K's range, so a probe Gram's rank can only fall short of K's, and the
            first half of the probes finding fewer directions than all of them says more probes would
            find more; a rank at K's full width cannot grow (audit 5: toy:modadd's W_V, 32 of 32, were
            flagged where the half-probe spectrum decayed through the cut-off). ``units``: as :func:`band`'s."""
            stats = jac[key]

            def of(st: JacobianHookStats) -> Tensor:
                return st.gram if head is None else st.head_gram[head]

            gram = of(stats)
            b = band(gram, units=units)
            halves = stats.half_grams(head is not None)
            probes = (halves is not None and b[1] < gram.shape[-1]
                      and min(rank(h if head is None else h[head], units) for h in halves) < b[1])
            return b, probes, rank(of(stats.half), units) < b[1]

        rows = []

        def add(map_name, layer, head, G, K, d_in, d_out, centered=False, g_most=None):
            """One map's row; ``g_most``: the most directions its input can span (``input_rank_bound``;
            default d_in), below which a rank at the sample count may be the data's limit; rank_K is
            checked against its own bound (:func:`_k_sample_bound`)."""
            (G_band, g_grows), (K_band, probe_limited, k_grows) = G, K
            G_rank, K_rank = G_band[1], K_band[1]
            k_bound = _k_sample_bound(map_name, layer, L, bool(jac.exact), output, n_probes, logits_width, n,
                                      batches.n_samples)
            rows.append({"map": map_name, "layer": layer, "head": head, "d_in": d_in, "d_out": d_out,
                         "n_params": d_in * d_out, "rank_G": G_rank, "rank_K": K_rank,
                         "kfac": G_rank * K_rank, "free": d_in * d_out - G_rank * K_rank, "centered": centered,
                         "sample_limited": sample_limited(G_rank, n, d_in if g_most is None else g_most, centered=centered)
                         or (k_bound is not None and sample_limited(K_rank, k_bound, k_most.get(map_name, d_out))),
                         "data_limited": g_grows or k_grows, "probe_limited": probe_limited,
                         "kfac_min": G_band[0] * K_band[0], "kfac_max": G_band[2] * K_band[2]})

        logits_width = adapter.embedding_weights().W_U.shape[-1]  # d_vocab_out: a toy's may differ from d_vocab
        # K of a map writing the residual stream has no direction along what no reader reads (LayerNorm's mean)
        k_most = dict.fromkeys(("W_O", "W_out"), input_rank_bound(adapter, True))
        mlp_weights = adapter.mlp_weights() if mlp else None
        for layer in range(L):
            bias = adapter.map_biases(layer)
            input_ranks: dict[tuple[str, bool], tuple[int, bool]] = {}

            def most(centered: bool, queries_keys: bool = False) -> int:
                """The most directions a block input can span: a shortformer's x̃ all D, else input_rank_bound."""
                return D if queries_keys and shortformer else input_rank_bound(adapter, centered)

            def input_rank(ln: str, centered: bool, queries_keys: bool = False) -> tuple[int, bool]:
                """rank_G of a block input (its band, and whether it grows with the data); ``queries_keys``:
                the input the queries and keys read (a shortformer's x̃, whose moments hold x̃ itself)."""
                hook = (attn_in if ln == "ln1" else mlp_in)[layer]
                if queries_keys and shortformer:
                    if ("x̃", centered) not in input_ranks:
                        whole, half = inputs[hook, "query_key"], input_halves[hook, "query_key"]
                        of = (lambda acc: acc.covariance()[0]) if centered else (lambda acc: acc.gram()[0])
                        input_ranks["x̃", centered] = g_rank(of(whole), of(half), most(centered, True),
                                                            (whole.gram()[0].diagonal(), half.gram()[0].diagonal())
                                                            if centered else None)
                    return input_ranks["x̃", centered]
                if (ln, centered) not in input_ranks:
                    input_ranks[ln, centered] = g_rank(input_moment(adapter, layer, ln, inputs[hook], centered),
                                                       input_moment(adapter, layer, ln, input_halves[hook], centered),
                                                       most(centered),
                                                       tuple(input_moment(adapter, layer, ln, a[hook], False,
                                                                          bias=False).diagonal()
                                                             for a in (inputs, input_halves)) if centered else None)
                return input_ranks[ln, centered]

            z = acts[("z", layer)]
            z_G, z_half = (z.head_covariance(), z.half.head_covariance()) if bias["W_O"] else (z.head_gram, z.half.head_gram)
            # a covariance's rounding level (spectrum_band)
            z_raw = list(zip(z.head_gram.diagonal(dim1=-2, dim2=-1), z.half.head_gram.diagonal(dim1=-2, dim2=-1))) \
                if bias["W_O"] else [None] * H
            out_K = k_rank(attn_out[layer])
            for h in range(H):
                add("W_Q", layer, h, input_rank("ln1", bias["W_Q"], True), k_rank(("q", layer), h), D, d, bias["W_Q"],
                    most(bias["W_Q"], True))
            for kv in range(n_kv):
                add("W_K", layer, kv, input_rank("ln1", bias["W_K"], True), k_rank(("k", layer), kv), D, d, bias["W_K"],
                    most(bias["W_K"], True))
                add("W_V", layer, kv, input_rank("ln1", bias["W_V"]), k_rank(("v", layer), kv), D, d, bias["W_V"],
                    most(bias["W_V"]))
            for h in range(H):
                add("W_O", layer, h, g_rank(z_G[h], z_half[h], second_moments=z_raw[h]), out_K, d, D, bias["W_O"])
            if mlp:
                F = adapter.d_mlp
                maps = [("W_gate", ("mlp_pre", layer)), ("W_in", f"blocks.{layer}.mlp.hook_pre_linear")] if gated else \
                    [("W_in", ("mlp_pre", layer))]
                x_norm = float(input_moment(adapter, layer, "ln2", inputs[mlp_in[layer]], False).trace().clamp_min(0).sqrt())
                g_norm = float(jac[mlp_out[layer]].gram.trace().clamp_min(0).sqrt())
                floors = _rounding_floors(mlp_weights, layer, x_norm, g_norm, adapter.dtype,
                                          adapter.gated_bias_after_product)
                for name, key in maps:
                    units = _neuron_units(jac[key].gram.diagonal(), floors[name])
                    add(name, layer, None, input_rank("ln2", bias[name]), k_rank(key, units=units), D, F, bias[name],
                        most(bias[name]))
                post = acts[("mlp_post", layer)]
                G_post = (post.covariance(), post.half.covariance()) if bias["W_out"] else (post.gram, post.half.gram)
                units = _neuron_units(post.gram.diagonal(), floors["W_out"])
                steady = _neuron_units(post.gram.diagonal(), floors["W_out"], G_post[0].diagonal()) if bias["W_out"] else None
                add("W_out", layer, None, g_rank(*G_post, second_moments=(post.gram.diagonal(), post.half.gram.diagonal())
                                                 if bias["W_out"] else None, units=units, fewest=steady),
                    k_rank(mlp_out[layer]), F, D, bias["W_out"])
        if embeddings:
            # G = diag(token frequencies), exact from counts of one-hot inputs: float64's rule, not the forward's.
            frequencies, half_frequencies = _token_frequencies(batches, adapter.d_vocab)
            G_band = spectrum_band(frequencies, torch.float64)
            G_half = spectrum_band(half_frequencies, torch.float64)[1]
            add("W_E", None, None, (G_band, G_half < G_band[1]), k_rank(adapter.hook_name("embed")), adapter.d_vocab, D)

        frame = pd.DataFrame(rows)
        warn_sample_limited("degeneracy_counts", int(frame["sample_limited"].sum()), len(frame),
                            "maps' input Grams (rank_G) or Jacobian Grams (rank_K, against their own bound: column "
                            "sample_limited)", n)
        data_limited = int(frame["data_limited"].sum())
        warn_data_limited("degeneracy_counts", data_limited, f"{len(frame)} maps", "rank_G or rank_K is",
                          batches.n_sequences, "column data_limited",
                          "the maps' free counts are upper bounds and n_eff_kfac a lower bound, for the model as much as "
                          "for these data; count on more sequences (where the data are already the model's whole input "
                          "domain, e.g. every pair of a modular-addition task, no more exist and the counts are the task's)")
        probe_limited = int(frame["probe_limited"].sum())
        if n_probes == 1 and not exact:
            warn_once(
                "degeneracy_counts: with n_probes=1 no half of the probes is kept, so whether rank_K is still growing "
                "with the probes cannot be checked (probe_limited is False everywhere): every probe rank_K is a lower "
                "bound of K's and n_eff_kfac one of the Kronecker count; use n_probes ≥ 2, or exact=True",
                ProbeLimitedWarning, stacklevel=2)
        elif probe_limited:
            warn_once(
                f"degeneracy_counts: at {probe_limited} of {len(frame)} maps the first half of the {n_probes} Jacobian "
                "probes per batch "
                "found fewer directions of K than all of them (column probe_limited): there rank_K is a lower bound and "
                "free an upper bound, and n_eff_kfac is a lower bound; raise n_probes, count on more positions, or use "
                "exact=True", ProbeLimitedWarning, stacklevel=2)
        for col in ("layer", "head"):
            frame[col] = frame[col].astype("Int64")
        frame.attrs.update({
            "n_eff_kfac": int(frame["kfac"].sum()),
            "n_params": int(frame["n_params"].sum()),
            "free": int(frame["free"].sum()),
            "probe_limited_maps": probe_limited,
            "data_limited_maps": data_limited,
            "n_eff_kfac_band": [int(frame["kfac_min"].sum()), int(frame["kfac_max"].sum())],
            "cutoff_band": CUTOFF_BAND,
            "rtol": rtol, "precision": str(precision).removeprefix("torch."), "loss_scale": loss_scale, "output": output,
            # A half-precision forward's ranks may count its rounding: N_eff may read high as well as low.
            "half_precision": str(adapter.dtype).removeprefix("torch.") if rounding is not None else None,
            # One sequence cannot be halved: data_limited was not checked (numerics.warn_data_limited).
            "data_checked": batches.n_sequences >= 2,
            "n_probes": None if exact else n_probes, "exact": bool(exact),
            # n_probes = 1 keeps no half of the probes: probe_limited was not checked.
            "probes_checked": bool(exact) or n_probes >= 2,
            "positions": batches.positions.to_dict(), "n_distinct_samples": n,
        })
        return frame
