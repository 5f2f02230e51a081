"""Interaction edges (METHODS §5, squared formula): equal to a brute-force torch.func.jacrev
reference (with padding and a skipped BOS), ±1 position sources unbiased and converging like
r^{-1/2}, one source exact for a single output position, non-negative."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from tests.fixtures.toys import make_tiny_toy_transformer
from tl_degeneracy.data import token_batches
from tl_degeneracy.interaction import interaction_basis
from tl_degeneracy.models.toys.sma import SparseModularAddition


def rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def tiny_toy():
    model = make_tiny_toy_transformer().double()
    model.tokenizer = types.SimpleNamespace(bos_token_id=1, pad_token_id=0)
    return model


def ragged(model):
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(2, 20, (n,), generator=g) for n in (6, 4)]
    return token_batches(seqs, model, batch_size=2, prepend_bos=True)


def brute_force_edges(model, ib, tokens, mask, a, b):
    """E_ij = (1/n_a) Σ_x Σ_t (Σ_s ∂f̂^b_{t,i}/∂f̂^a_{s,j} f̂^a_{s,j})², the Jacobian of node b's
    activation with respect to node a's from torch.func.jacrev, mapped to f̂ coordinates."""
    _, cache = model.run_with_cache(tokens, names_filter=[a, b])
    fa0 = cache[a]

    def node_b(fa):
        store = {}
        model.run_with_hooks(tokens, fwd_hooks=[(a, lambda act, hook: fa), (b, lambda act, hook: store.__setitem__("b", act))])
        return store["b"].flatten(2)

    J = torch.func.jacrev(node_b)(fa0)  # [B, Pb, Db, B, Pa, Da]
    J = torch.einsum("xtdxse->xtdse", J)  # sequences do not interact
    Ca, Ca_inv, Cb = ib.basis[a], ib.inverse[a], ib.basis[b]
    Jhat = torch.einsum("id,xtdse,ej->xtisj", Cb, J, Ca_inv)
    fhat = ib.transform(fa0, a) * mask[:, :, None]
    A = torch.einsum("xtisj,xsj->xtij", Jhat, fhat)
    return torch.einsum("xt,xtij->ij", mask.double(), A.square()) / int(mask.sum())


@pytest.mark.parametrize("kind", ["local", "global"])
def test_edges_equal_jacrev_reference(kind):
    model = tiny_toy()
    tb = ragged(model)
    batch = tb.batch(0)
    assert not batch.mask.all()  # padding and a skipped BOS are both present
    ib = interaction_basis(model, tb, kind=kind, exact=True, progress=False)
    for a, b in ib.edges:
        ref = brute_force_edges(model, ib, batch.tokens, batch.mask, a, b)
        assert (ib.edges[a, b] >= 0).all() and rel(ib.edges[a, b], ref) < 1e-10, (a, b)


def test_one_source_is_exact_for_a_single_output_position():
    """SMA: resid_pre (12 positions) → resid_post (one per sequence): Σ_t has one term, so one ±1
    source gives the exact edges."""
    model = SparseModularAddition(p_max=4, d=4, d_mlp=8, seq_len=6, seed=2).double()
    toks = torch.randint(0, 4, (5, 6), generator=torch.Generator().manual_seed(13))
    kw = dict(kind="local", exact=True, progress=False)
    exact = interaction_basis(model, toks, **kw)
    one = interaction_basis(model, toks, edge_sources=1, seed=3, **kw)
    pair = ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post")
    assert rel(one.edges[pair], exact.edges[pair]) < 1e-12


def test_sources_are_unbiased_and_converge_like_inverse_sqrt():
    model = tiny_toy()
    toks = torch.randint(2, 20, (3, 8), generator=torch.Generator().manual_seed(5))
    kw = dict(kind="local", exact=True, progress=False)
    exact = interaction_basis(model, toks, **kw)
    pair = next(iter(exact.edges))
    ref = exact.edges[pair]
    sources, seeds, rms = [1, 4, 16], range(6), []
    for r in sources:
        runs = torch.stack([interaction_basis(model, toks, edge_sources=r, seed=s, **kw).edges[pair] for s in seeds])
        rms.append(float(np.sqrt(np.mean([rel(e, ref) ** 2 for e in runs]))))
        if r == 1:  # unbiased: the mean of R runs has 1/R of the single-run squared error (3× margin)
            single = float(((runs - ref) ** 2).sum((1, 2)).mean())
            assert float(((runs.mean(0) - ref) ** 2).sum()) < 3 * single / len(seeds)
    slope = np.polyfit(np.log(sources), np.log(rms), 1)[0]
    assert -0.8 <= slope <= -0.3, (slope, rms)
