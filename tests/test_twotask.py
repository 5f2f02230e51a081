"""The two-sub-task model of the modularity experiment (paper §5, tutorial 07): the facts the
tutorial rests on are exact properties of the architecture, checked here to float64 rounding."""

from __future__ import annotations

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.models.toys.twotask import (
    TwoTaskMLP, direction_towers, fisher_spectrum, module_masks, train_twotask, twotask_data, twotask_loss,
)

P, H = 3, 4


def _copy(model: TwoTaskMLP) -> TwoTaskMLP:
    other = TwoTaskMLP(**model.init_kwargs())
    other.load_state_dict(model.state_dict())
    return other


def _trained_like(norm: str, seed: int = 0) -> TwoTaskMLP:
    """A random model with non-zero biases (so no unit is trivially symmetric)."""
    model = TwoTaskMLP(P, H, norm, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        model.b_in.copy_(0.1 * torch.randn(model.b_in.shape, generator=g, dtype=torch.float64))
        model.b_out.copy_(0.1 * torch.randn(model.b_out.shape, generator=g, dtype=torch.float64))
    return model


def test_data_is_the_full_product_with_both_labels():
    x, y = twotask_data(P)
    assert x.shape == (P**4, 4 * P) and y.shape == (P**4, 2)
    digits = x.view(-1, 4, P).argmax(-1)
    assert (x.view(-1, 4, P).sum(-1) == 1).all()
    assert len({tuple(d.tolist()) for d in digits}) == P**4  # every input once: the sub-tasks are independent
    assert torch.equal(y[:, 0], (digits[:, 0] + digits[:, 1]) % P)
    assert torch.equal(y[:, 1], (digits[:, 2] + digits[:, 3]) % P)


@pytest.mark.parametrize("norm", ["module", "joint"])
def test_interaction_and_symmetries_follow_the_centring(norm):
    """Per-tower centring: sub-task 1 ignores (a2, b2), tower 0's scale and a shift of W_out[0]'s
    rows are exact symmetries. Joint centring: all three are broken (the mean mediates)."""
    x, _ = twotask_data(P)
    model = _trained_like(norm)
    with torch.no_grad():
        ref = model(x).log_softmax(-1)
        first = ref[:, 0].reshape(P * P, P * P, P)  # [(a1, b1), (a2, b2), class]
        cross = float((first - first[:, :1]).abs().max())
        scaled, shifted = _copy(model), _copy(model)
        scaled.W_in[0].mul_(2.5), scaled.b_in[0].mul_(2.5), scaled.W_out[0].div_(2.5)
        shifted.W_out[0].add_(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
        moves = [float((m(x).log_softmax(-1) - ref).abs().max()) for m in (scaled, shifted)]
        # The joint scale is free for both architectures.
        both = _copy(model)
        both.W_in.mul_(2.5), both.b_in.mul_(2.5), both.W_out.div_(2.5)
        assert float((both(x).log_softmax(-1) - ref).abs().max()) < 1e-12
    if norm == "module":
        assert cross < 1e-12 and max(moves) < 1e-12
    else:
        assert cross > 1e-4 and min(moves) > 1e-4


def test_module_masks_select_one_tower():
    model = TwoTaskMLP(P, H)
    n = sum(p.numel() for p in model.parameters())
    masks = [module_masks(model, k) for k in (0, 1)]
    for k, mask in enumerate(masks):
        assert sum(int(m.sum()) for m in mask.values()) == n // 2
        for name, m in mask.items():
            assert m[k].all() and not m[1 - k].any(), name
    with pytest.raises(ValueError, match="tower"):
        module_masks(model, 2)


def test_fisher_spectrum_is_the_hessian_of_the_kl_at_theta_star():
    """Against autograd's Hessian of the kl behavioral loss (mean over (input, sub-task) samples)."""
    x, _ = twotask_data(2)
    model = TwoTaskMLP(2, 3, "joint", seed=1)
    names = [n for n, _ in model.named_parameters()]
    star = {n: p.detach().clone() for n, p in model.named_parameters()}
    shapes, sizes = [star[n].shape for n in names], [star[n].numel() for n in names]
    ref = model(x).detach().log_softmax(-1)

    def kl(flat):
        parts = torch.split(flat, sizes)
        out = torch.func.functional_call(model, {n: t.view(s) for n, t, s in zip(names, parts, shapes)}, (x,))
        return (ref.exp() * (ref - out.log_softmax(-1))).sum(-1).mean()

    flat = torch.cat([star[n].flatten() for n in names])
    hessian = torch.autograd.functional.hessian(kl, flat)
    expected = torch.linalg.eigvalsh(hessian).flip(0).numpy()
    got = fisher_spectrum(model, x)
    assert got.shape == expected.shape
    assert abs(got - expected).max() <= 1e-10 * expected[0]


def test_fisher_rank_of_the_modular_model_is_its_function_space():
    """Per-tower centring: each tower's logits are a function of its p² inputs, so the Fisher rank is
    at most 2·p²·(p − 1) (softmax drops one direction), reached with 8 units per tower; joint
    centring (sub-task 1 also depends on sub-task 2's inputs) exceeds that bound."""
    x, _ = twotask_data(P)
    ranks = {}
    for norm in ("module", "joint"):
        e = fisher_spectrum(TwoTaskMLP(P, 8, norm, seed=0), x)
        ranks[norm] = int((e > 1e-12 * e[0]).sum())
    assert ranks["module"] == 2 * P * P * (P - 1)
    assert ranks["joint"] > 2 * P * P * (P - 1)


def test_training_stops_at_the_target_loss_and_is_deterministic():
    x, y = twotask_data(P)
    runs = [train_twotask("joint", seed=0, p=P, d_hidden=8, target_loss=1e-2, max_steps=2000, num_threads=1) for _ in range(2)]
    run = runs[0]
    assert run.reached and run.history["step"].iloc[-1] == run.steps
    assert float(twotask_loss(run.model(x), y).detach()) <= 1e-2
    assert run.history["loss"].iloc[-2] > 1e-2  # it had not reached the target at the previous record
    assert torch.equal(runs[0].model.W_in, runs[1].model.W_in)
    short = train_twotask("module", seed=0, p=P, d_hidden=8, target_loss=1e-9, max_steps=5)
    assert not short.reached and short.steps == 5


def test_modular_model_has_single_tower_interaction_directions():
    x, _ = twotask_data(P)
    model = train_twotask("module", seed=0, p=P, d_hidden=8, target_loss=1e-2).model
    ib = tld.interaction_basis(model, x, nodes=["hook_in", "hook_post", "hook_normalized", "hook_logits"], progress=False)
    towers = direction_towers(ib)
    assert len(towers) == sum(ib.basis[n].shape[0] for n in ib.nodes)
    assert (towers["tower"] != "both").all()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="norm"):
        TwoTaskMLP(P, H, norm="layer")
    with pytest.raises(ValueError, match="4p"):
        TwoTaskMLP(P, H)(torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="p ≥ 2"):
        twotask_data(1)
    with pytest.raises(ValueError, match="target_loss"):
        train_twotask("module", target_loss=0.0)
