"""BridgeAdapter on TransformerBridge models (TL 3.9 and 4.x; default and compatibility mode).

Tiny random GPT-2 (tied embeddings, Conv1D, joint c_attn), GPT-NeoX (parallel blocks, partial
rotary) and Llama (GQA, gated SiLU MLP, RMSNorm, no biases) checkpoints (tests/fixtures/hf.py),
plus TL-native ``boot_native`` models.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.fixtures.hf import (
    ARCHS,
    boot_native,
    check_hooks_reproduce_weights,
    check_perturbed_forward,
    hf_parameter_count,
    tl_major_version,
)
from tl_degeneracy import adapt
from tl_degeneracy.errors import MissingHookError
from tl_degeneracy.models.bridge import BridgeAdapter

pytestmark = pytest.mark.usefixtures("single_thread")
BRIDGE_BACKENDS = ("bridge", "bridge-compat")
TOKENS = torch.tensor([[1, 5, 17, 42, 9, 77, 3], [1, 60, 61, 62, 2, 8, 99]])


def tl3_compat_gated(arch: str, backend: str) -> bool:
    """TL 3.9's bridge in compatibility mode runs gated MLPs from detached weight copies; the
    adapter refuses to build a live parameter set for it (hooks and weights still work)."""
    return tl_major_version() == 3 and backend == "bridge-compat" and arch == "llama"


@pytest.fixture(params=[(a, b) for a in ARCHS for b in BRIDGE_BACKENDS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, tl_models):
    arch, backend = request.param
    return arch, backend, adapt(tl_models(arch, backend))


def test_backend_and_config(case):
    arch, backend, a = case
    assert isinstance(a, BridgeAdapter)
    assert a.backend == backend
    c = a.cfg
    assert (c.n_layers, c.n_heads, c.d_model, c.d_head, c.d_vocab, c.n_ctx) == (2, 4, 32, 8, 100, 64)
    assert c.n_kv_heads == (2 if arch == "llama" else 4)
    assert c.d_mlp == (64 if arch == "llama" else 128)
    assert c.parallel_attn_mlp == (arch == "neox")
    assert c.gated_mlp == (arch == "llama")
    assert c.normalization == ("RMS" if arch == "llama" else "LN")
    assert c.positional_embedding == ("standard" if arch == "gpt2" else "rotary")
    assert c.act_fn == {"gpt2": "gelu_new", "neox": "gelu", "llama": "silu"}[arch]
    # compatibility mode unties GPT-2's unembedding
    assert c.tied_embeddings == (arch == "gpt2" and backend == "bridge")
    # TransformerLens does not prepend BOS for GPT-NeoX/Pythia, which were trained without it
    assert c.default_prepend_bos == (arch != "neox") and c.bos_token_id == 1
    assert backend in repr(a)


def test_hooks_reproduce_weights(case):
    check_hooks_reproduce_weights(case[2], TOKENS)


def test_hook_names_and_aliases(case):
    arch, _, a = case
    hooks = a.available_hooks()
    # legacy aliases and canonical bridge names are both accepted
    assert {"blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "hook_embed", "blocks.0.hook_out"} <= hooks
    assert a.hook_name("resid_post", 1) == "blocks.1.hook_resid_post"
    assert a.hook_name("mlp_pre", 0) == "blocks.0.mlp.hook_pre"
    assert a.hook_kind("blocks.1.attn.hook_pattern") == ("attn_pattern", 1)
    expected = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z", "blocks.0.hook_out"]
    assert a.hook_names(["z", "blocks.0.hook_out"]) == expected
    if arch == "neox":
        with pytest.raises(MissingHookError, match="parallel"):
            a.hook_name("resid_mid", 0)
        with pytest.raises(MissingHookError, match="parallel"):
            a.hook_names("resid_mid")
    else:
        assert a.hook_name("resid_mid", 0) == "blocks.0.hook_resid_mid"
    with pytest.raises(MissingHookError, match="neither a hook kind"):
        a.hook_names("blocks.0.hook_nonexistent")


def test_weights_shapes(case):
    arch, _, a = case
    aw, mw, ew = a.attention_weights(), a.mlp_weights(), a.embedding_weights()
    n_kv = 2 if arch == "llama" else 4
    assert aw.W_Q.shape == aw.W_K.shape == (2, 4, 32, 8)
    assert aw.W_K_kv.shape == (2, n_kv, 32, 8)
    # GQA expansion: query head h reads KV head h // 2
    torch.testing.assert_close(aw.W_K[:, 3], aw.W_K_kv[:, 3 * n_kv // 4])
    if arch == "llama":  # no biases in the checkpoint: zeros, not errors
        assert not aw.b_Q.any() and not aw.b_O.any() and not mw.b_in.any()
        assert mw.W_gate is not None and mw.W_gate.shape == (2, 32, 64)
    else:
        assert aw.b_Q.abs().sum() > 0 and mw.W_gate is None
    assert (ew.W_pos is not None) == (arch == "gpt2")
    assert ew.W_E.shape == (100, 32) and ew.W_U.shape == (32, 100) and ew.b_U.shape == (100,)


def test_live_parameters(case, hf_dirs):
    arch, backend, a = case
    if tl3_compat_gated(arch, backend):
        with pytest.raises(RuntimeError, match="detached"):
            a.live_parameters()
        return
    live = a.live_parameters()
    names = live.names
    assert all("original_component" not in n and "qkv" not in n for n in names)
    assert "blocks.0.attn.q.weight" in names and "blocks.1.ln1.weight" in names and "embed.weight" in names
    assert "blocks.0.mlp.in.weight" in names and "blocks.0.mlp.out.weight" in names
    assert ("blocks.0.mlp.gate.weight" in names) == (arch == "llama")
    tied = arch == "gpt2" and backend == "bridge"
    if tied:
        # one tensor, both slots: the embedding and the unembedding
        assert "unembed.weight" not in names
        assert [s.split(".")[0] for s in live["embed.weight"].slots] == ["embed", "unembed"]
    else:
        assert "unembed.weight" in names
    # The count: the HF model's own (tied once); compatibility mode unties GPT-2's W_U; TL 3.x's
    # bridge adds a zero, trainable lm_head bias.
    expected = hf_parameter_count(hf_dirs[arch])
    if arch == "gpt2" and backend == "bridge-compat":
        expected += a.d_model * a.d_vocab
    if tl_major_version() == 3:
        expected += a.d_vocab
    assert live.numel == expected
    assert len({id(lp.param) for lp in live}) == len(live)
    frame = live.to_frame()
    assert list(frame["name"]) == names and frame["numel"].sum() == live.numel
    # the dead joint-QKV copies are in model.parameters() but not live
    if arch in ("gpt2", "neox"):
        assert sum(p.numel() for p in a.model.parameters()) > live.numel


def test_tokenizer_ids_and_text_encoder(case):
    """What data.py asks the adapter instead of the tokenizer: BOS and pad ids, and string encoding
    without special tokens (the fixture's tokenizer: <pad>=0, <bos>=1, "wN" = N)."""
    arch, backend, a = case
    assert (a.bos_token_id, a.pad_token_id) == (1, 0)
    encode, how = a.text_encoder()
    assert how == "tokenizer" and encode("w3 w17 w99") == [3, 17, 99]


def test_parameter_components(case):
    """Every slot of a live parameter counts: GPT-2's tied embedding is both embed and unembed."""
    arch, backend, a = case
    live = a.unchecked_live_parameters()
    components = {lp.name: a.parameter_components(lp) for lp in live}
    assert components["blocks.0.attn.q.weight"] == {"blocks.0.attn"}
    assert components["blocks.1.ln1.weight"] == {"blocks.1.ln1"}
    if not tl3_compat_gated(arch, backend):  # there the MLP weights are detached copies, not live
        assert components["blocks.1.mlp.out.weight"] == {"blocks.1.mlp"}
    tied = arch == "gpt2" and backend == "bridge"
    assert components["embed.weight"] == ({"embed", "unembed"} if tied else {"embed"})


def test_unchecked_live_parameters(case):
    """Where the bridge refuses its live set (TL 3.x compatibility mode, gated MLP), the unchecked set
    still holds the attention weights, and is not cached: the adapter goes on refusing."""
    arch, backend, a = case
    if not tl3_compat_gated(arch, backend):
        assert a.unchecked_live_parameters().names == a.live_parameters().names
        return
    assert "blocks.0.attn.q.weight" in a.unchecked_live_parameters().names
    with pytest.raises(RuntimeError, match="detached"):
        a.live_parameters()


def test_perturbed_forward(case):
    arch, backend, a = case
    if tl3_compat_gated(arch, backend):
        with pytest.raises(RuntimeError, match="default mode"):
            a.perturbed_forward({}, TOKENS)
        return
    check_perturbed_forward(a, TOKENS)


def test_compat_switch_after_adapting_is_refused(hf_dirs):
    from tests.fixtures.hf import boot_bridge

    bridge = boot_bridge(hf_dirs["gpt2"])
    a = adapt(bridge)
    bridge.enable_compatibility_mode(disable_warnings=True)
    with pytest.raises(RuntimeError, match="adapt"):
        a.live_parameters()
    assert adapt(bridge).backend == "bridge-compat"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_native_bridge(kind):
    model = boot_native(kind)
    a = adapt(model)
    assert a.backend == "bridge"
    assert a.n_kv_heads == (2 if kind == "llama" else 4) and a.cfg.gated_mlp == (kind == "llama")
    assert a.cfg.bos_token_id is None  # boot_native has no tokenizer
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    check_hooks_reproduce_weights(a, tokens)
    check_perturbed_forward(a, tokens)
    # no dead duplicates in native bridges: every parameter is live
    assert a.live_parameters().numel == sum(p.numel() for p in model.parameters())
    assert "blocks.0.attn.q.weight" in a.live_parameters().names


@pytest.mark.parametrize("bad", [object(), nn.Linear(2, 2), "gpt2"])
def test_adapt_rejects_other_types(bad):
    with pytest.raises(TypeError) as info:
        adapt(bad)
    message = str(info.value)
    assert "HookedTransformer" in message and "TransformerBridge" in message and "toys" in message


def test_adapt_returns_adapter_unchanged(tl_models):
    a = adapt(tl_models("gpt2", "bridge"))
    assert adapt(a) is a


def test_the_exact_name_of_a_kind_the_architecture_lacks_says_why(tl_models):
    """Audit 13a F7: blocks.0.hook_resid_mid on parallel blocks got the generic "not a hook point"."""
    import tl_degeneracy as tld
    from tl_degeneracy.errors import MissingHookError

    adapter = tld.adapt(tl_models("neox", "bridge"))
    with pytest.raises(MissingHookError, match="parallel attention and MLP blocks"):
        adapter.hook_names(["blocks.0.hook_resid_mid"])
