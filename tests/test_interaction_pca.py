"""``interaction_basis(kind="pca")``: the PCA baseline of the companion paper (METHODS §5 with the
Jacobian Gram replaced by the identity): f̂ = Pᵀ (f − μ), D_M = D_G, edges by the same formula."""

from __future__ import annotations

import torch

from tests.fixtures.device import on_test_device
from tests.interaction_models import HookedMLP, mlp_inputs, node_acts
from tl_degeneracy.interaction import interaction_basis

NODES = ["hook_in", "hook_h0", "hook_h1"]


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_pca_basis_is_the_centred_covariance_eigenbasis_with_its_variances():
    model, x = on_test_device(HookedMLP([5, 7, 6, 4])), on_test_device(mlp_inputs(96, 5))
    ib = interaction_basis(model, x, kind="pca", nodes=NODES, edges=False, progress=False)
    acts = node_acts(model, x, NODES)
    assert ib.settings["passes"] == 1  # the Gram pass only: no Jacobian pass
    for node in NODES:
        f = acts[node]
        centred = f - f.mean(0)
        cov = centred.mT @ centred / len(f)
        vals, vecs = torch.linalg.eigh(cov)
        vals, vecs = vals.flip(0), vecs.flip(1)
        spec = ib.eigenvalues[node]
        k = spec.interaction_rank
        assert k == spec.rank_G == f.shape[1]  # generic data: every direction varies and is kept
        assert torch.allclose(spec.kept, vals[:k], rtol=1e-10)
        assert torch.allclose(spec.interaction, spec.gram[: spec.rank_G], rtol=1e-12)
        # rows of C are the unit eigenvectors (distinct variances: unique up to sign)
        C = ib.basis[node]
        assert rel(C.abs(), vecs[:, :k].mT.abs()) < 1e-8
        fhat = ib.transform(f, node)
        assert rel(fhat.mT @ fhat / len(f), torch.diag(vals[:k])) < 1e-10
    paper = interaction_basis(model, x, kind="pca", nodes=NODES, edges=False, scaling="paper", progress=False)
    for node in NODES:  # s = -1/2: C = D_G^{-1} Pᵀ
        assert torch.allclose(paper.basis[node] * ib.eigenvalues[node].kept[:, None], ib.basis[node], rtol=1e-9,
                              atol=1e-12 * ib.basis[node].abs().max())


def test_pca_edges_match_brute_force_jacobians():
    """E_ij = (1/n) Σ_x (∂f̂^{l+1}_i/∂f̂^l_j · f̂^l_j)², the Jacobian from torch.func.jacrev."""
    model, x = on_test_device(HookedMLP([4, 6, 5, 3])), on_test_device(mlp_inputs(40, 4))
    ib = interaction_basis(model, x, kind="pca", nodes=NODES, progress=False)
    acts = node_acts(model, x, NODES)
    for a, b in zip(NODES[:-1], NODES[1:]):
        C_inv, C_next = ib.inverse[a], ib.basis[b]

        def next_node(delta, a=a, b=b, C_inv=C_inv):
            seen = {}
            model.run_with_hooks(x, fwd_hooks=[(a, lambda act, hook: act + delta @ C_inv.mT),
                                               (b, lambda act, hook: seen.setdefault("f", act))])
            return seen["f"]

        J = torch.func.jacrev(next_node)(torch.zeros(len(x), C_inv.shape[1], dtype=torch.float64, device=x.device)).detach()  # [n, D_b, n, k_a]
        A = torch.einsum("idk,ed->iek", torch.einsum("ndnk->ndk", J), C_next)  # [n, k_b, k_a]
        fhat = ib.transform(acts[a], a).detach()  # the activations carry the parameters' graph
        brute = ((A * fhat[:, None, :]) ** 2).mean(0)
        assert rel(ib.edges[(a, b)], brute) < 1e-9
