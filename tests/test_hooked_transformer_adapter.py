"""HookedTransformerAdapter on TransformerLens 3.x HookedTransformer (skipped on TL 4.x).

The models come from the tiny HF checkpoints through load_model's offline TL 3 route, with no
weight processing, so they compute the same function as the bridge in default mode.
"""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.hf import (
    ARCHS,
    check_hooks_reproduce_weights,
    check_perturbed_forward,
    has_hooked_transformer,
    hf_parameter_count,
)

if not has_hooked_transformer():
    pytest.skip("HookedTransformer needs TransformerLens 3.x", allow_module_level=True)

from tl_degeneracy import adapt  # noqa: E402
from tl_degeneracy.errors import MissingHookError  # noqa: E402
from tl_degeneracy.models.hooked_transformer import HookedTransformerAdapter  # noqa: E402

pytestmark = [pytest.mark.tl3, pytest.mark.usefixtures("single_thread")]
TOKENS = torch.tensor([[1, 5, 17, 42, 9, 77, 3], [1, 60, 61, 62, 2, 8, 99]])


@pytest.fixture(params=ARCHS)
def case(request, tl_models):
    return request.param, adapt(tl_models(request.param, "hooked_transformer"))


def test_backend_and_config(case):
    arch, a = case
    assert isinstance(a, HookedTransformerAdapter) and a.backend == "hooked_transformer"
    c = a.cfg
    assert c.n_kv_heads == (2 if arch == "llama" else 4)
    assert c.parallel_attn_mlp == (arch == "neox") and c.gated_mlp == (arch == "llama")
    assert c.normalization == ("RMS" if arch == "llama" else "LN")
    assert c.tied_embeddings is False  # HookedTransformer always has its own W_U
    assert c.bos_token_id == 1


def test_hooks_reproduce_weights(case):
    check_hooks_reproduce_weights(case[1], TOKENS)


def test_missing_hooks(case):
    arch, a = case
    if arch == "neox":
        with pytest.raises(MissingHookError, match="parallel"):
            a.hook_name("resid_mid", 1)
    else:
        assert a.hook_name("resid_mid", 1) in a.available_hooks()
    assert a.hook_name("embed") == "hook_embed"


def test_gqa_weights_are_the_stored_kv_tensors(case):
    arch, a = case
    aw = a.attention_weights()
    attn = a.model.blocks[0].attn
    if arch == "llama":
        assert aw.W_K_kv.shape == (2, 2, 32, 8)
        torch.testing.assert_close(aw.W_K_kv[0], attn._W_K.detach())
        torch.testing.assert_close(aw.W_K[0], attn.W_K.detach())  # HT's own expansion agrees
    else:
        torch.testing.assert_close(aw.W_K[0], attn.W_K.detach())


def test_live_parameters(case, hf_dirs):
    arch, a = case
    live = a.live_parameters()
    hf = hf_parameter_count(hf_dirs[arch])
    c = a.cfg
    # Expected from the configuration: HookedTransformer unties GPT-2's W_U, and adds zero biases
    # wherever the checkpoint has none (all of them on this Llama; b_U everywhere).
    extra = c.d_vocab  # b_U: no HF lm_head has a bias here
    if arch == "gpt2":
        extra += c.d_model * c.d_vocab
    if arch == "llama":
        per_layer = (c.n_heads + 2 * c.n_kv_heads) * c.d_head + c.d_model + c.d_mlp + c.d_model
        extra += c.n_layers * per_layer
    assert live.numel == hf + extra
    names = live.names
    assert {"embed.W_E", "unembed.W_U", "unembed.b_U", "blocks.0.attn.W_Q", "blocks.1.ln1.w"} <= set(names)
    assert ("blocks.0.attn._W_K" in names) == (arch == "llama")
    assert all(len(lp.slots) == 1 and lp.slots[0] == lp.name for lp in live)


def test_perturbed_forward(case):
    check_perturbed_forward(case[1], TOKENS)


def test_same_function_as_the_bridge(case, tl_models):
    arch, a = case
    bridge = tl_models(arch, "bridge")
    with torch.no_grad():
        torch.testing.assert_close(a.forward(TOKENS), bridge(TOKENS), atol=1e-5, rtol=1e-4)
    b = adapt(bridge)
    torch.testing.assert_close(a.attention_weights().W_Q, b.attention_weights().W_Q)
    torch.testing.assert_close(a.mlp_weights().W_out, b.mlp_weights().W_out)
