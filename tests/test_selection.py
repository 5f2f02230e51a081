"""Parameter selections (models.selection) on every backend: toy, HookedTransformer, bridge.

Known answers: the storage layout of a head's slice in each backend (HF Linear rows, GPT-2 Conv1D
columns, HookedTransformer's head axis), the count D·d per weight, partitions of the live set, and
the effect of perturbing only a head's entries on that head's activations.
"""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.hf import assert_state_unchanged, boot_native, cache_hooks, has_hooked_transformer, state_snapshot
from tl_degeneracy import adapt
from tl_degeneracy.models.selection import ParameterSelection, select_parameters

pytestmark = pytest.mark.usefixtures("single_thread")
CASES = [
    ("gpt2", "bridge"), ("gpt2", "bridge-compat"), ("neox", "bridge"), ("llama", "bridge"),
    ("gpt2", "hooked_transformer"), ("llama", "hooked_transformer"), ("toy", "toy"), ("native-llama", "bridge"),
]


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request, tl_models):
    arch, backend = request.param
    if arch == "toy":
        from tests.fixtures.toys import make_tiny_toy_transformer

        model = make_tiny_toy_transformer()
    elif arch == "native-llama":
        model = boot_native("llama")
    else:
        if backend == "hooked_transformer" and not has_hooked_transformer():
            pytest.skip("HookedTransformer needs TransformerLens 3.x")
        model = tl_models(arch, backend)
    return arch, backend, adapt(model)


def q_weight_name(a, layer: int) -> str:
    return f"blocks.{layer}.attn.q.weight" if a.backend.startswith("bridge") else f"blocks.{layer}.attn.W_Q"


def tokens_for(a) -> torch.Tensor:
    return torch.randint(0, a.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0))


def test_all_and_components_partition_the_live_set(case):
    arch, backend, a = case
    live = a.live_parameters()
    everything = select_parameters(a)
    assert isinstance(everything, ParameterSelection)
    assert everything.numel == live.numel == select_parameters(a, "all").numel
    assert all(everything.is_full(n) for n in live.names)
    parts = ["embed", "unembed", "ln_final"] + [f"blocks.{layer}" for layer in range(a.n_layers)]
    if a.cfg.positional_embedding == "standard":
        parts.append("pos_embed")
    sizes = [select_parameters(a, p).numel for p in parts]
    tied = a.cfg.tied_embeddings
    # components are disjoint except that a tied embedding is also the unembedding
    assert sum(sizes) - (a.d_vocab * a.d_model if tied else 0) == live.numel
    assert select_parameters(a, parts).numel == live.numel
    for layer in range(a.n_layers):
        inner = [f"blocks.{layer}.{c}" for c in ("attn", "mlp", "ln1", "ln2")]
        assert sum(select_parameters(a, c).numel for c in inner) == select_parameters(a, f"blocks.{layer}").numel


def test_heads_partition_attention(case):
    arch, backend, a = case
    D, d, H = a.d_model, a.d_head, a.n_heads
    group = H // a.n_kv_heads
    for layer in range(a.n_layers):
        attn = select_parameters(a, f"blocks.{layer}.attn")
        heads = [select_parameters(a, f"blocks.{layer}.attn.head{h}") for h in range(H)]
        union = select_parameters(a, [f"blocks.{layer}.attn.head{h}" for h in range(H)])
        qname = q_weight_name(a, layer)
        for h, sel in enumerate(heads):
            assert int(sel.masks[qname].sum()) == D * d
            # every head: its W_Q, W_K, W_V, W_O slices (D·d each) and b_Q, b_K, b_V (d each) if present
            has_bias = any(n.endswith(("q.bias", "b_Q")) for n in attn.names)
            assert sel.numel == 4 * D * d + (3 * d if has_bias else 0)
            for name, mask in sel.masks.items():
                assert (attn.masks[name] | ~mask).all(), f"head {h} selects outside the attention ({name})"
        # query-side slices are disjoint across heads; K/V slices are shared within a GQA group only
        q_masks = torch.stack([s.masks[qname] for s in heads])
        assert (q_masks.sum(0) <= 1).all() and q_masks.any(0).all()
        for h in range(H):
            for h2 in range(H):
                overlap = any(
                    (m & heads[h2].masks[n]).any() for n, m in heads[h].masks.items() if n in heads[h2].masks
                )
                assert overlap == (h // group == h2 // group)
        # union of heads + the rest = the attention; the rest is exactly b_O (shared by all heads)
        rest = attn.numel - union.numel
        assert rest == (D if any(n.endswith(("o.bias", "b_O")) for n in attn.names) else 0)


def test_head_layout_matches_storage(case):
    arch, backend, a = case
    d = a.d_head
    sel = select_parameters(a, "blocks.1.attn.head1")
    mask = sel.masks[q_weight_name(a, 1)]
    expected = torch.zeros_like(mask)
    if backend in ("hooked_transformer", "toy"):
        expected[1] = True  # [H, D, d]
    else:
        # nn.Linear [H·d, D]; also on GPT-2, whose bridge splits the joint Conv1D c_attn [D, 3·H·d]
        # into Linear q/k/v weights that are transposed views of it (strides (1, 3·H·d))
        expected[d:2 * d, :] = True
    assert torch.equal(mask, expected)
    if arch == "gpt2" and backend == "bridge":  # compatibility mode writes contiguous copies
        assert a.live_parameters()["blocks.1.attn.q.weight"].param.stride() == (1, 3 * a.d_model)


def test_selection_leaves_the_model_bit_identical(case):
    arch, backend, a = case
    # a fresh adapter measures the head layout again (the layout cache is per adapter)
    fresh = adapt(a.model)
    before = state_snapshot(a.model)
    for layer in range(a.n_layers):
        select_parameters(fresh, f"blocks.{layer}.attn.head1")
    assert_state_unchanged(a.model, before)


def test_perturbing_a_head_changes_only_that_head(case):
    arch, backend, a = case
    tokens, layer, head = tokens_for(a), 1, 1
    group = a.n_heads // a.n_kv_heads
    names = [a.hook_name("q", layer), a.hook_name("z", layer)]
    base = cache_hooks(a, tokens, names)
    sel = select_parameters(a, f"blocks.{layer}.attn.head{head}")
    live = a.live_parameters()
    saved = {n: live[n].param.detach().clone() for n in sel.names}
    g = torch.Generator().manual_seed(3)
    try:
        with torch.no_grad():
            for n, m in sel.masks.items():
                live[n].param.add_(0.5 * torch.randn(m.shape, generator=g) * m)
        new = cache_hooks(a, tokens, names)
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                live[n].param.copy_(v)
    q_change = (new[names[0]] - base[names[0]]).abs().amax(dim=(0, 1, 3))
    z_change = (new[names[1]] - base[names[1]]).abs().amax(dim=(0, 1, 3))
    for h in range(a.n_heads):
        assert (q_change[h] > 1e-3) == (h == head), f"hook_q of head {h}: {q_change.tolist()}"
        # z reads the head's own q and its KV group's k, v: under GQA the group's heads move together
        assert (z_change[h] > 1e-3) == (h // group == head // group), f"hook_z of head {h}: {z_change.tolist()}"


def test_selection_forms_and_errors(case):
    arch, backend, a = case
    live = a.live_parameters()
    name = live.names[3]
    exact = select_parameters(a, name)
    assert exact.names == [name] and exact.numel == live[name].numel
    items = ["blocks.0.mlp", "blocks.0.attn.head0", name]
    both = select_parameters(a, items)
    parts = [select_parameters(a, i) for i in items]
    expected = 0
    for n in live.names:
        masks = [p.masks[n] for p in parts if n in p.masks]
        if masks:
            expected += int(torch.stack(masks).any(0).sum())
    assert both.numel == expected and set(both.names) == {n for p in parts for n in p.names}
    frame = both.to_frame()
    assert list(frame.columns) == ["name", "shape", "numel", "selected", "fraction"]
    assert frame["selected"].sum() == both.numel and set(frame["name"]) == set(both.names)
    assert both.to_dict()["numel"] == both.numel
    with pytest.raises(ValueError, match=r"blocks\.L\.attn\.headH"):
        select_parameters(a, "blocks.0.attention")
    with pytest.raises(ValueError, match="out of range"):
        select_parameters(a, f"blocks.{a.n_layers}.mlp")
    with pytest.raises(ValueError, match="out of range"):
        select_parameters(a, f"blocks.0.attn.head{a.n_heads}")
    with pytest.raises(ValueError, match="string or a non-empty list"):
        select_parameters(a, [])
    if a.cfg.positional_embedding != "standard":
        with pytest.raises(ValueError, match="matches no live parameter"):
            select_parameters(a, "pos_embed")


def test_tied_embedding_is_in_embed_and_unembed(tl_models):
    a = adapt(tl_models("gpt2", "bridge"))
    assert a.cfg.tied_embeddings
    assert select_parameters(a, "embed").names == ["embed.weight"]
    # TL 3.x's bridge adds a (zero, trainable) unembedding bias
    assert select_parameters(a, "unembed").names[0] == "embed.weight"
    assert set(select_parameters(a, "unembed").names) <= {"embed.weight", "unembed.bias"}


def test_component_selections(tiny_toy_transformer):
    """How llc_by_component and the report read ``components``: one selection per component, each
    of which resolves; a list is taken as given; anything else is refused by name."""
    from tl_degeneracy.models.selection import component_selections

    a = adapt(tiny_toy_transformer)
    heads = component_selections(a, "heads")
    assert heads == [f"blocks.{l}.attn.head{h}" for l in range(2) for h in range(2)]
    assert component_selections(tiny_toy_transformer, "layers") == ["blocks.0", "blocks.1"]
    assert component_selections(a, "mlp") == ["blocks.0.mlp", "blocks.1.mlp"]
    for selection in heads + component_selections(a, "attn"):
        assert select_parameters(a, selection).numel > 0
    assert component_selections(a, ("blocks.1.attn", "embed")) == ["blocks.1.attn", "embed"]
    with pytest.raises(ValueError, match='"heads", "layers", "attn", "mlp"'):
        component_selections(a, "neurons")
