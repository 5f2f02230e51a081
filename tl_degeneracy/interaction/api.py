"""``interaction_basis``: the global interaction basis (paper §6) and the local interaction basis
(LIB, companion paper), with edges, for any TransformerLens-style model (METHODS §5)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import DataError
from ..stats.activations import moment_pass
from ..stats.distributed import distributed_context
from ..stats.jacobian import METHODS_, OBJECTIVES, jacobian_pass
from .basis import SCALINGS, NodeBasis, default_rtol, interaction_directions, whiten
from .edges import edge_pass
from .result import InteractionBasis, NodeSpectrum
from .runner import Runner, build_runner

__all__ = ["interaction_basis"]

KINDS = ("local", "global", "pca")


def _pass_seed(seed: int, node: int) -> int:
    """An independent probe seed per Jacobian pass (LIB runs one per node)."""
    return int(np.random.SeedSequence([int(seed), 7, int(node)]).generate_state(1)[0])


def _jacobian_grams(runner: Runner, whitenings, kind: str, output: str, interaction_rtol, interaction_atol,
                    probe_kw: dict) -> dict[str, NodeBasis]:
    """Steps 2–3 for every node: one pass for the global basis, one pass per node for LIB, none for PCA."""
    names = runner.names
    bases: dict[str, NodeBasis] = {}

    def finish(name: str, gram: torch.Tensor) -> None:
        rtol = default_rtol(whitenings[name].rank, runner.dtype) if interaction_rtol is None else interaction_rtol
        bases[name] = interaction_directions(whitenings[name], gram, rtol, interaction_atol)

    if kind == "pca":
        # M = I, the Jacobian Gram of the identity map: M̃ = diag(D_G), so V = I, D_M = D_G and
        # C = D_G^{s-½} Pᵀ; with s = +½ that is Pᵀ, the principal components (rib's "svd" baseline).
        for name in names:
            D = whitenings[name].mean.numel()
            finish(name, torch.eye(D, dtype=torch.float64))
        return bases
    if kind == "global":
        res = jacobian_pass(runner.engine, runner.batches, runner.nodes, objective=output,
                            seed=_pass_seed(probe_kw.pop("seed"), 0), desc="interaction basis: Jacobians", **probe_kw)
        for name in names:
            finish(name, res.accs[name].gram()[0])
        return bases
    seed = probe_kw.pop("seed")
    last = len(names) - 1
    res = jacobian_pass(runner.engine, runner.batches, [runner.nodes[last]], objective=output, seed=_pass_seed(seed, last),
                        desc=f"LIB {names[last]}", **probe_kw)
    finish(names[last], res.accs[names[last]].gram()[0])
    for l in range(last - 1, -1, -1):
        nxt = bases[names[l + 1]]
        D = whitenings[names[l]].mean.numel()
        if nxt.size == 0:  # node l+1 keeps nothing: nothing downstream depends on node l either
            finish(names[l], torch.zeros(D, D, dtype=torch.float64))
            continue
        # The recursion differentiates node l+1's importance-scaled coordinates whatever the output
        # scaling (METHODS §5 step 3: only s = +½ composes); the shift by μ does not change a Jacobian.
        C = nxt.matrix("importance").to(device=runner.device, dtype=runner.dtype)
        res = jacobian_pass(runner.engine, runner.batches, [runner.nodes[l]], objective="mse", output_hook=names[l + 1],
                            output_transform=lambda o, C=C: o.flatten(2) @ C.mT, seed=_pass_seed(seed, l),
                            desc=f"LIB {names[l]}", **probe_kw)
        finish(names[l], res.accs[names[l]].gram()[0])
    return bases


def interaction_basis(
    model,
    data,
    kind: str = "local",
    output: str = "kl",
    scaling: str = "importance",
    nodes: str | Sequence[str] | None = None,
    centered: bool = True,
    gram_rtol: float | None = None,
    gram_atol: float = 0.0,
    interaction_rtol: float | None = None,
    interaction_atol: float = 0.0,
    n_probes: int = 8,
    exact: bool = False,
    edges: bool = True,
    edge_sources: int | None = None,
    batch_size: int = 32,
    seq_len: int | None = None,
    skip_bos: bool | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    method: str = "auto",
) -> InteractionBasis:
    """The interaction basis of every node layer and the edges between adjacent ones (METHODS §5).

    Per node (activations f, D features, samples as in ``activation_stats``):

    1. G = (1/n) Σ (f − μ)(f − μ)ᵀ (``centered=True``; else the second moment and μ = 0), float64,
       eigendecomposed; directions with D_G ≤ max(gram_rtol·max, gram_atol) are dropped; the rest
       are whitened, f̃ = D_G^{-1/2} Pᵀ (f − μ).
    2. M = (1/n) Σ_t E[g_t g_tᵀ], the Jacobian Gram of the outputs with respect to f (float64
       accumulation of Jacobian-probe VJPs, METHODS §4), in whitened coordinates M̃ = V D_M Vᵀ;
       directions with D_M ≤ max(interaction_rtol·max, interaction_atol) are dropped.
    3. f̂ = C (f − μ), C = D_M^{s} Vᵀ D_G^{-1/2} Pᵀ; s = +½ (``scaling="importance"``: E[f̂ f̂ᵀ] =
       diag(D_M), Jacobian Gram in f̂ coordinates = I) or s = −½ (``"paper"``, the paper's formula).

    Outputs of step 2:

    - ``kind="global"`` (paper §6): the model's outputs for every node, ``output="kl"`` (Fisher-
      weighted, sampled labels) or ``"mse"`` (Gaussian probes) — one backward per probe serves all
      nodes.
    - ``kind="local"`` (LIB, companion paper), from the last node backwards: node l's outputs are
      node l+1's finished coordinates f̂^{l+1} with ``mse`` weighting (every output position,
      cross-position terms included); the last node's outputs are the model's outputs with the
      chosen kl/mse weighting, so for the last node LIB equals the global basis (with ``mse`` and
      the logits as the last node, this is rib's PCA-rotated output node). The recursion always
      uses the importance-scaled f̂^{l+1} (only s = +½ composes, METHODS §5); ``scaling`` only
      rescales the returned coordinates, so the two scalings differ by a per-direction factor
      D_M^{±1} for both kinds.
    - ``kind="pca"`` (the baseline the companion paper compares LIB with): M = I, the Jacobian
      replaced by the identity, so D_M = D_G and f̂ = Pᵀ (f − μ) with importance scaling, the
      principal components with E[f̂ f̂ᵀ] = diag(D_G); no Jacobian pass. Edges use the same formula
      in these coordinates.

    Edges (``edges=True``): E_ij = (1/n_l) Σ_x Σ_t (Σ_s ∂f̂^{l+1}_{t,i}/∂f̂^l_{s,j} f̂^l_{s,j})² in
    the returned coordinates, n_l = node l's sample count. Exact by default: per pair, kept_l
    forward-mode JVPs per batch (one per direction j of node l), or P·kept_{l+1} reverse-mode VJPs
    where that is fewer (P: counted positions of node l+1). ``edge_sources=r`` allows the unbiased
    estimate with r random ±1 position sources (r·kept_{l+1} VJPs) on pairs where it is cheaper
    than the exact JVPs (kept_l > r·kept_{l+1}); other pairs stay exact. ``settings["edge_modes"]``
    says which way each pair went. See :mod:`tl_degeneracy.interaction.edges`.

    Args:
        model: a model ``tld.adapt`` accepts (data: anything ``token_batches`` accepts), or any other
            transformer_lens ``HookedRootModule`` (data: a tensor [n, d_in] or [n, pos, d_in], or a
            list of such batches; output: the module's forward output).
        nodes: hook kinds (every layer) and/or exact hook names, in forward order. Default for
            transformers: resid_pre of every layer, then ``ln_final.hook_normalized`` (or the last
            resid_post where there is no final norm); for other modules every hook point, in the
            order the forward pass reaches them.
        gram_rtol, interaction_rtol: relative cut-offs (default: 1e-10, or more where the model's
            dtype needs it: (10·√dim·eps)²); gram_atol, interaction_atol: absolute ones.
        n_probes, exact, method: Jacobian probes per batch, or one backward per output entry
            (small outputs, tests); VJPs batched or looped (see ``jacobian_stats``).
        edge_sources: None (exact) or r: random ±1 position sources where they are cheaper (above).
        seed: probes and sources are seeded per (seed, pass, batch, probe): results do not depend
            on chunking or on the number of processes.
        device: where the float64 accumulators live (default: the model's device).

    Cost (B batches): one Gram pass (a forward per batch); global: one Jacobian pass (a forward and
    n_probes VJPs per batch, or P·V exact ones); LIB: one Jacobian pass per node (node l's
    forward stops at node l+1, its VJPs go back through one section only, n_probes or
    P·kept_{l+1} per batch); PCA: no Jacobian pass; edges: one pass (per batch and pair, min(kept_l JVPs,
    P·kept_{l+1} or r·kept_{l+1} VJPs) through one section each, in chunks). Memory: the D×D
    float64 accumulators and one chunk of tangents or VJPs; no per-direction gradient is stored.

    Under ``torch.distributed`` every pass shards the batches and reduces its float64 sums.

    Raises:
        MissingHookError: unknown node names, or nodes that never fire. ValueError: nodes out of
            forward order or repeated, bad options. DataError: empty data. NumericalError: NaN/inf
            activations, gradients or results.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if output not in OBJECTIVES:
        raise ValueError(f"output must be one of {OBJECTIVES}; got {output!r}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {tuple(SCALINGS)}; got {scaling!r}")
    if method not in METHODS_:
        raise ValueError(f"method must be one of {METHODS_}; got {method!r}")
    if not exact and (not isinstance(n_probes, int) or n_probes < 1):
        raise ValueError(f"n_probes must be a positive integer; got {n_probes!r}")
    if edge_sources is not None and (not isinstance(edge_sources, int) or edge_sources < 1):
        raise ValueError(f"edge_sources must be None (exact) or a positive integer; got {edge_sources!r}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    runner = build_runner(model, data, nodes, batch_size, seq_len, skip_bos)
    acc_device = torch.device(device) if device is not None else runner.device

    collector = moment_pass(runner.engine, runner.batches, runner.nodes, per_head=False, device=acc_device,
                            progress=progress, desc="interaction basis: Grams")
    whitenings, counts, shapes = {}, {}, {}
    for name in runner.names:
        acc = collector.accs[name]
        if acc.count == 0:
            raise DataError(f"no samples counted at node {name!r}: the data have no position that counts")
        gram = acc.covariance()[0] if centered else acc.gram()[0]
        mean = acc.mean[0] if centered else torch.zeros_like(acc.mean[0])
        rtol = default_rtol(acc.dim, runner.dtype) if gram_rtol is None else gram_rtol
        whitenings[name] = whiten(gram, mean, rtol, gram_atol)
        counts[name], shapes[name] = acc.count, collector.layouts[name].feature_shape
    timings["gram_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    probe_kw = dict(n_probes=n_probes, exact=exact, seed=seed, per_head=False, device=acc_device, progress=progress, method=method)
    bases = _jacobian_grams(runner, whitenings, kind, output, interaction_rtol, interaction_atol, probe_kw)
    timings["jacobian_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    basis = {n: bases[n].matrix(scaling) for n in runner.names}
    inverse = {n: bases[n].right_inverse(scaling) for n in runner.names}
    mean = {n: whitenings[n].mean for n in runner.names}
    edge_values, edge_modes = {}, {}
    if edges and len(runner.nodes) > 1:
        ep = edge_pass(runner.engine, runner.batches, runner.nodes, basis, inverse, mean, counts, edge_sources, seed,
                       method=method, device=acc_device, progress=progress)
        edge_values, edge_modes = ep.edges, {f"{a} -> {b}": m for (a, b), m in ep.modes.items()}
    timings["edges_s"] = time.perf_counter() - t2

    n_jacobian_passes = {"global": 1, "local": len(runner.nodes), "pca": 0}[kind]
    settings = {
        "gram_rtol": gram_rtol, "gram_atol": gram_atol, "interaction_rtol": interaction_rtol,
        "interaction_atol": interaction_atol, "n_probes": None if exact else n_probes, "exact": bool(exact),
        "edges": bool(edges), "edge_sources": edge_sources, "edge_modes": edge_modes, "seed": int(seed), "method": method,
        "batch_size": batch_size, "n_batches": len(runner.batches), "world_size": distributed_context().world_size,
        "passes": 1 + n_jacobian_passes + int(bool(edge_values)), "dtype": str(runner.dtype).removeprefix("torch."),
        **timings,
    }
    return InteractionBasis(
        nodes=runner.names,
        kind=kind,
        output=output,
        scaling=scaling,
        centered=bool(centered),
        basis=basis,
        inverse=inverse,
        mean=mean,
        eigenvalues={n: NodeSpectrum(gram=whitenings[n].eigenvalues, interaction=bases[n].eigenvalues,
                                     rank_G=whitenings[n].rank, interaction_rank=bases[n].size) for n in runner.names},
        edges=edge_values,
        counts=counts,
        feature_shapes=shapes,
        positions=runner.positions,
        settings=settings,
    )
