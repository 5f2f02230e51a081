"""ChainMap (models/chains.py): operators without a torch.func.vmap batching rule are found, attention
is moved to the math SDPA kernel, and every fallback is said once (VmapFallbackWarning).

Without a batching rule vmap runs an operator once per chain, silently; on a CPU the fused kernel
behind ``F.scaled_dot_product_attention`` (``_scaled_dot_product_flash_attention_for_cpu``) is such an
operator. Every test compares the chain-batched outputs (and gradients) with the chains computed one
at a time: the same functions in another evaluation order, so they agree to float32 rounding
(relative 1e-5 on O(1) outputs, a few dozen operations deep).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.fixtures.device import test_device
from tl_degeneracy.models.chains import VmapFallbackWarning
from tl_degeneracy.models.engine import engine_for

pytestmark = pytest.mark.usefixtures("single_thread")

CHAINS = 3


class _SDPAAttention(nn.Module):
    """Causal self-attention through F.scaled_dot_product_attention (2 heads of 4), then a readout."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.qkv = nn.Parameter(torch.randn(8, 24, generator=g) / 8**0.5)
        self.out = nn.Parameter(torch.randn(8, 3, generator=g) / 8**0.5)

    def forward(self, x):  # [n, pos, 8] -> [n, pos, 3]
        n, pos, _ = x.shape
        q, k, v = (x @ self.qkv).reshape(n, pos, 3, 2, 4).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return z.transpose(1, 2).reshape(n, pos, 8) @ self.out


class _MaxNorm(nn.Module):
    """A linear map whose rows are renormalised (torch.renorm: no batching rule, not attention)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        return x @ torch.renorm(self.w, 2, 0, 1.0).T


class _ReadsAValue(nn.Module):
    """Data-dependent control flow on a parameter's value: vmap cannot run it at all."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 2, generator=torch.Generator().manual_seed(2)))

    def forward(self, x):
        y = x @ self.w
        return y * 2 if float(self.w.sum()) > 0 else y


def _deltas(shapes: dict[str, tuple], scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {n: (scale * torch.randn((CHAINS, *s), generator=g)).to(test_device()).requires_grad_(True)
            for n, s in shapes.items()}


def _batched_vs_one_by_one(engine, deltas, inputs):
    """Chain-batched outputs and gradients, and the same computed chain by chain without a chain axis."""
    out = engine.perturbed_forward(deltas, inputs, chains=True)
    weights = torch.linspace(-1, 1, out[0].numel(), device=out.device).reshape(out[0].shape)
    grads = torch.autograd.grad((out * weights).sum(), list(deltas.values()))
    looped, looped_grads = [], []
    for c in range(CHAINS):
        single = {n: d[c].detach().requires_grad_(True) for n, d in deltas.items()}
        o = engine.perturbed_forward(single, inputs)
        looped.append(o.detach())
        looped_grads.append(torch.autograd.grad((o * weights).sum(), list(single.values())))
    for got, c_grads in zip(grads, zip(*looped_grads)):
        torch.testing.assert_close(got, torch.stack(c_grads), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.detach(), torch.stack(looped), rtol=1e-5, atol=1e-5)
    return out


def _no_vmap_warning_in(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", VmapFallbackWarning)
        return fn()


def _assert_fallback_switch_restored():
    # The call turns vmap's per-chain loop into an error while it runs and must give the switch back.
    assert torch._C._functorch._is_vmap_fallback_enabled()


def test_sdpa_attention_is_batched_on_the_math_kernel_and_said_once():
    model = _SDPAAttention().to(test_device()).eval()
    engine = engine_for(model)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3)).to(test_device())
    deltas = _deltas({"qkv": (8, 24), "out": (8, 3)})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _batched_vs_one_by_one(engine, deltas, x)
    fallback = [w for w in seen if issubclass(w.category, VmapFallbackWarning)]
    chain_map = engine._chain_map
    if test_device().type == "cpu":
        # The CPU's fused kernel has no batching rule: found, named once, replaced by the math kernel.
        assert len(fallback) == 1, [str(w.message) for w in fallback]
        assert "scaled_dot_product" in str(fallback[0].message) and "math kernel" in str(fallback[0].message)
        assert chain_map.math_attention
    assert chain_map.vmap_works is True and not chain_map.looped_ops
    _no_vmap_warning_in(lambda: _batched_vs_one_by_one(engine, deltas, x))
    _assert_fallback_switch_restored()


def test_behavioral_llc_of_an_sdpa_model_warns_once():
    from tl_degeneracy.llc import behavioral_llc

    model = _SDPAAttention().to(test_device()).eval()
    x = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(4)).to(test_device())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = behavioral_llc(model, x, step_size=1e-4, chains=2, draws=10, burnin=0, progress=False)
    fallback = [w for w in seen if issubclass(w.category, VmapFallbackWarning)]
    # Once per run at most (on the CPU exactly once: its fused kernel has no batching rule; on a GPU
    # the fused kernels may have one).
    assert len(fallback) == 1 if test_device().type == "cpu" else len(fallback) <= 1, [str(w.message) for w in fallback]
    assert not res.failed and np.all(np.isfinite(res.llc_per_chain))


def test_other_operator_without_a_batching_rule_is_looped_and_said_once():
    model = _MaxNorm().to(test_device()).eval()
    engine = engine_for(model)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(6)).to(test_device())
    deltas = _deltas({"w": (3, 4)})
    with pytest.warns(VmapFallbackWarning, match=r"aten::renorm has no torch.func.vmap batching rule.*once per chain"):
        _batched_vs_one_by_one(engine, deltas, x)
    assert engine._chain_map.looped_ops == {"aten::renorm"} and not engine._chain_map.math_attention
    assert engine._chain_map.vmap_works is True
    _no_vmap_warning_in(lambda: _batched_vs_one_by_one(engine, deltas, x))
    _assert_fallback_switch_restored()


def test_a_model_vmap_cannot_run_goes_chain_by_chain_and_says_so_once():
    model = _ReadsAValue().to(test_device()).eval()
    engine = engine_for(model)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(7)).to(test_device())
    deltas = _deltas({"w": (4, 2)})
    with pytest.warns(VmapFallbackWarning, match="cannot be run under torch.func.vmap.*one at a time"):
        _batched_vs_one_by_one(engine, deltas, x)
    assert engine._chain_map.vmap_works is False
    _no_vmap_warning_in(lambda: _batched_vs_one_by_one(engine, deltas, x))
    _assert_fallback_switch_restored()


@pytest.fixture(scope="module")
def tiny_opt_dir(tmp_path_factory):
    """A tiny OPT causal LM saved locally: TransformerLens' bridge runs OPT's own attention module, so
    the Hugging Face attention implementation (here SDPA) is what the chains go through."""
    import transformers as tf

    from tests.fixtures.hf import _COMMON, tiny_tokenizer

    torch.manual_seed(0)
    cfg = tf.OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                       max_position_embeddings=64, word_embed_proj_dim=32, **_COMMON)
    directory = tmp_path_factory.mktemp("hf_models") / "tiny_opt"
    tf.OPTForCausalLM(cfg).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def test_bridge_with_sdpa_attention_runs_chains_on_the_math_kernel(tiny_opt_dir):
    from tests.fixtures.hf import boot_bridge
    from tl_degeneracy.models.adapt import adapt

    bridge = boot_bridge(tiny_opt_dir)
    # The bridge boots HF models with eager attention; SDPA is what a user asking for speed sets
    # (attention dispatch is read at every call, so switching it in place is enough).
    bridge.original_model.config._attn_implementation = "sdpa"
    adapter = adapt(bridge)
    tokens = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(8)).to(test_device())
    deltas = _deltas({p.name: p.shape for p in adapter.live_parameters()}, scale=0.02)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _batched_vs_one_by_one(adapter, deltas, tokens)
    fallback = [w for w in seen if issubclass(w.category, VmapFallbackWarning)]
    if test_device().type == "cpu":
        assert len(fallback) == 1 and "math kernel" in str(fallback[0].message), [str(w.message) for w in fallback]
        assert adapter._chain_map.math_attention
    assert adapter._chain_map.vmap_works is True and not adapter._chain_map.looped_ops
    _no_vmap_warning_in(lambda: _batched_vs_one_by_one(adapter, deltas, tokens))
    _assert_fallback_switch_restored()
