"""Restricted (weight-refined) LLC: the mask multiplies gradient, prior and noise (METHODS §1)."""

import numpy as np
import pytest
import torch

from tl_degeneracy.llc import behavioral_llc
from tl_degeneracy.llc.layout import ParameterLayout, selection_masks
from tl_degeneracy.llc.targets import make_target
from tl_degeneracy.llc.sampler import Dynamics, chain_seed, initial_state, run_chains
from tl_degeneracy.models.selection import select_parameters

from .test_llc import linear_regression


def _run(model, data, params, steps=40, loss=None):
    target = make_target(model, data, loss, None)
    _, masks = selection_masks(target, params)
    layout = ParameterLayout(tuple(masks), tuple(tuple(target.star[n].shape) for n in masks))
    mask = layout.flatten(masks)
    settings = Dynamics(nbeta=100.0, step_size=1e-3, gamma=1.0, steps=steps)
    state = run_chains(target, layout, mask, settings, initial_state(target, layout, [chain_seed(0, c) for c in range(3)], settings))
    return layout, mask, state


def test_unselected_coordinates_never_move_plain_module():
    model, x = linear_regression(d=6, n=40)
    sel = torch.tensor([[True, False, True, False, False, True]])
    layout, mask, state = _run(model, x, {"weight": sel})
    moved = state.delta != 0
    assert bool(moved[:, mask].all())
    assert not bool(moved[:, ~mask].any())


def test_unselected_coordinates_never_move_toy_head(tiny_toy_transformer, tiny_toy_tokens):
    layout, mask, state = _run(tiny_toy_transformer, tiny_toy_tokens, "blocks.1.attn.head0", steps=5)
    assert int(mask.sum()) == select_parameters(tiny_toy_transformer, "blocks.1.attn.head0").numel
    assert bool((state.delta[:, mask] != 0).all())
    assert not bool((state.delta[:, ~mask] != 0).any())


def test_selecting_everything_equals_unrestricted_plain_module():
    model, x = linear_regression(d=4, n=40)
    a = behavioral_llc(model, x, chains=2, draws=30, burnin=5)
    b = behavioral_llc(model, x, params=["weight"], chains=2, draws=30, burnin=5)
    np.testing.assert_array_equal(a.trace, b.trace)
    assert a.llc == b.llc and a.n_params == b.n_params == 4


def test_selecting_everything_equals_unrestricted_toy(tiny_toy_transformer, tiny_toy_tokens):
    kw = dict(chains=2, draws=4, burnin=1, step_size=1e-6, nbeta=100)
    a = behavioral_llc(tiny_toy_transformer, tiny_toy_tokens, **kw)
    b = behavioral_llc(tiny_toy_transformer, tiny_toy_tokens, params="all", **kw)
    np.testing.assert_array_equal(a.trace, b.trace)
    assert a.n_params == b.n_params


def test_restricted_regular_model_counts_only_the_selection():
    model, x = linear_regression(d=8, n=400)
    keep = torch.zeros(1, 8, dtype=torch.bool)
    keep[0, :4] = True
    res = behavioral_llc(model, x, params={"weight": keep}, chains=4, draws=1500, burnin=300)
    assert res.n_params == 4
    bound = res.diagnostics["bias_bound"]
    assert abs(res.llc - 2.0) < 2.0  * bound + 4 * res.llc_stderr + 0.02


def test_unknown_selection_is_refused():
    model, x = linear_regression(d=3, n=10)
    with pytest.raises(ValueError, match="unknown parameter name"):
        behavioral_llc(model, x, params="bias")
    with pytest.raises(ValueError, match="shape"):
        behavioral_llc(model, x, params={"weight": torch.ones(3, dtype=torch.bool)})


def test_a_bfloat16_models_restricted_chains_run_in_float32(tiny_toy_transformer, tiny_toy_tokens):
    """SGLD keeps δ in float32 for a bfloat16 model (θ* + δ in bfloat16 would round δ away). The
    sampled weights are then float32 and meet the others widened, so the whole forward runs in
    float32: the same chains as on the float32 copy of the bfloat16 weights, bit for bit."""
    import copy

    from tl_degeneracy.models.adapt import adapt

    bf16 = copy.deepcopy(tiny_toy_transformer).to(torch.bfloat16)
    wide = copy.deepcopy(bf16).to(torch.float32)
    kw = dict(params="blocks.1.attn", chains=2, draws=8, burnin=2, step_size=1e-4, progress=False)
    a, b = behavioral_llc(bf16, tiny_toy_tokens, **kw), behavioral_llc(wide, tiny_toy_tokens, **kw)
    assert np.isfinite(a.llc) and np.array_equal(a.trace, b.trace)
    widened = make_target(bf16, tiny_toy_tokens, None, None).widened
    assert widened and {t.dtype for t in widened.values()} == {torch.float32}
    assert make_target(wide, tiny_toy_tokens, None, None).widened is None  # nothing to widen: the plain forward
    delta = {"blocks.1.attn.W_Q": torch.zeros(2, *bf16.blocks[1].attn.W_Q.shape)}
    out = adapt(bf16).perturbed_forward(delta, tiny_toy_tokens[:2], chains=True, under=widened)
    assert out.dtype == torch.float32
