"""jacobian_stats (METHODS §4): exact Grams against brute-force Jacobians, probes unbiased with
1/√k error, determinism, sequence-level outputs, hook outputs, errors."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from tests.fixtures.toys import make_tiny_toy_transformer
from tl_degeneracy.data import token_batches
from tl_degeneracy.errors import NumericalError
from tl_degeneracy.models.toys.sma import SparseModularAddition
from tl_degeneracy.stats import jacobian_stats

HOOKS = ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_v"]


def rel(a, b):
    a, b = a.cpu(), b.cpu()  # the brute-force references are on the CPU
    return float((a - b).norm() / b.norm())


def small_vocab_model():
    """float64 tiny toy, d_vocab 20, with BOS = 1 (a stub tokenizer carries the ids)."""
    model = make_tiny_toy_transformer().double()
    model.tokenizer = types.SimpleNamespace(bos_token_id=1, pad_token_id=0)
    return model


def ragged_batches(model, batch_size=2):
    """Two sequences of different lengths with BOS: the batch has padding and a skipped BOS."""
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(2, 20, (n,), generator=g) for n in (6, 3)]
    return token_batches(seqs, model, batch_size=batch_size, prepend_bos=True)


def brute_force_gram(model, tokens, mask, hook, objective, output_hook=None, transform=None, out_unit="position"):
    """K = (1/n) Σ_s Σ_{t counted} Σ_{t' counted} Jᵀ W J from torch.autograd.functional.jacobian.

    kl: J = ∂ log_softmax(logits)_{t'} / ∂ f_t and W = diag(p_{t'}) (Fisher: Σ_y p(y) ∇log p(y) ∇log p(y)ᵀ);
    mse: J = ∂ o_{t'} / ∂ f_t and W = I.
    """
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    f0 = cache[hook]
    b, p = tokens.shape

    def F(x):
        store = {}
        hooks = [(hook, lambda a, hook: x)]
        if output_hook is not None:
            hooks.append((output_hook, lambda a, hook: store.__setitem__("o", a)))
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        o = store["o"] if output_hook is not None else logits
        if transform is not None:
            o = transform(o)
        return o.log_softmax(-1) if objective == "kl" else o.flatten(2)

    out = F(f0).detach()
    P, V = out.shape[1], out.shape[2]
    # The reference sums on the CPU, wherever the model runs.
    J = torch.autograd.functional.jacobian(F, f0, vectorize=True).reshape(b, P, V, b, p, -1).double().cpu()
    probs = out.exp().cpu() if objective == "kl" else None
    mask = mask.cpu()
    out_mask = mask if out_unit == "position" else mask.any(1, keepdim=True)
    D = J.shape[-1]
    K = torch.zeros(D, D, dtype=torch.float64)
    n = 0
    for s in range(b):
        for t in range(p):
            if not mask[s, t]:
                continue
            n += 1
            for tp in range(P):
                if out_mask[s, tp]:
                    L = J[s, tp, :, s, t, :]  # [V, D]
                    K += L.T @ (probs[s, tp][:, None] * L) if objective == "kl" else L.T @ L
    return K / n, n


@pytest.mark.parametrize("objective", ["kl", "mse"])
def test_exact_gram_equals_brute_force_jacobian(objective):
    model = small_vocab_model()
    tb = ragged_batches(model)
    batch = tb.batch(0)
    assert not batch.mask.all()  # padding and BOS both present
    js = jacobian_stats(model, tb, hooks=HOOKS, output=objective, exact=True, progress=False)
    for hook in HOOKS:
        K, n = brute_force_gram(model, batch.tokens, batch.mask, hook, objective)
        assert js[hook].count == n == tb.n_samples
        assert rel(js[hook].gram, K) < 1e-10, hook
    # batches of one sequence (no padding at all) give the same Grams: the sums are exact
    js1 = jacobian_stats(model, ragged_batches(model, batch_size=1), hooks=HOOKS, output=objective, exact=True, progress=False)
    for hook in HOOKS:
        assert rel(js1[hook].gram, js[hook].gram) < 1e-10


def test_exact_mse_on_a_hook_output_with_transform():
    model = small_vocab_model()
    tb = ragged_batches(model)
    batch = tb.batch(0)
    C = torch.randn(16, 5, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    transform = lambda o: o @ C  # e.g. coordinates in a next layer's basis (METHODS §5, LIB)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    js = jacobian_stats(model, tb, hooks=hooks, output="blocks.1.hook_resid_mid", output_transform=transform,
                        exact=True, progress=False)
    assert js.output == "mse" and js.output_hook == "blocks.1.hook_resid_mid"
    K, _ = brute_force_gram(model, batch.tokens, batch.mask, hooks[0], "mse", output_hook="blocks.1.hook_resid_mid", transform=transform)
    assert rel(js[hooks[0]].gram, K) < 1e-10
    # a hook after the output does not influence it: zero Gram, samples still counted
    assert torch.count_nonzero(js[hooks[1]].gram) == 0 and js[hooks[1]].count == tb.n_samples


def test_sequence_level_output_sma():
    """SMA: logits [b, 1, V] (one output per sequence), hooks with a position per token."""
    model = SparseModularAddition(p_max=4, d=4, d_mlp=8, seq_len=6, seed=2).double()
    toks = torch.randint(0, 4, (3, 6), generator=torch.Generator().manual_seed(13))
    js = jacobian_stats(model, toks, hooks=["resid_pre", "attn_out"], output="kl", exact=True, progress=False)
    assert js.output_unit == "sequence"
    mask = torch.ones(3, 6, dtype=torch.bool)
    K, n = brute_force_gram(model, toks, mask, "blocks.0.hook_resid_pre", "kl", out_unit="sequence")
    assert js["resid_pre", 0].count == n == 18 and rel(js["resid_pre", 0].gram, K) < 1e-10
    assert js["attn_out", 0].unit == "sequence" and js["attn_out", 0].count == 3


@pytest.mark.parametrize("objective", ["kl", "mse"])
def test_probe_estimates_are_unbiased(objective):
    """The mean of R independent k-probe estimates converges to the exact Gram: its squared error
    is the single-run mean squared error divided by R (unbiased), checked with a 3× margin."""
    model = small_vocab_model()
    tb = ragged_batches(model)
    hook = HOOKS[0]
    exact = jacobian_stats(model, tb, hooks=hook, output=objective, exact=True, progress=False)[hook].gram
    R, k = 24, 16
    runs = torch.stack([jacobian_stats(model, tb, hooks=hook, output=objective, n_probes=k, seed=s, progress=False)[hook].gram
                        for s in range(R)])
    single_mse = float(((runs - exact) ** 2).sum((1, 2)).mean())
    mean_err2 = float(((runs.mean(0) - exact) ** 2).sum())
    assert mean_err2 < 3 * single_mse / R
    assert mean_err2 > single_mse / R / 10  # and not suspiciously exact (probes really are random)


@pytest.mark.parametrize("objective", ["kl", "mse"])
def test_probe_error_shrinks_like_inverse_sqrt_probes(objective):
    model = small_vocab_model()
    tb = ragged_batches(model)
    hook = HOOKS[0]
    exact = jacobian_stats(model, tb, hooks=hook, output=objective, exact=True, progress=False)[hook].gram
    probes, seeds = [4, 16, 64, 256], range(8)
    rms = []
    for k in probes:
        errs = [rel(jacobian_stats(model, tb, hooks=hook, output=objective, n_probes=k, seed=100 + s, progress=False)[hook].gram, exact)
                for s in seeds]
        rms.append(float(np.sqrt(np.mean(np.square(errs)))))
    slope = np.polyfit(np.log(probes), np.log(rms), 1)[0]
    assert -0.65 <= slope <= -0.35, (slope, rms)


def test_probes_are_seeded_and_independent_of_chunking_and_method():
    model = small_vocab_model()
    tb = ragged_batches(model)
    run = lambda **kw: jacobian_stats(model, tb, hooks=HOOKS, output="kl", n_probes=6, progress=False, **kw)
    a, b = run(seed=3), run(seed=3)
    assert all(torch.equal(a[h].gram, b[h].gram) for h in HOOKS)
    for other in (run(seed=3, probe_chunk=4), run(seed=3, method="loop")):
        assert all(rel(other[h].gram, a[h].gram) < 1e-12 for h in HOOKS)
    assert rel(run(seed=4)[HOOKS[0]].gram, a[HOOKS[0]].gram) > 1e-3


def test_auto_is_decided_once_from_the_data_not_per_batch():
    """exact="auto": exact iff P·V ≤ EXACT_FACTOR·k with P the longest sequence's counted
    positions (here 7 after a skipped BOS, V = 20: 140 cotangents), whatever the batch split; a
    per-batch choice would make the 3-token batches exact at k = 8 (2·20 = 40 ≤ 128)."""
    from tl_degeneracy.stats.jacobian import EXACT_FACTOR

    model = small_vocab_model()
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(2, 20, (n,), generator=g) for n in (7, 2, 2, 2)]
    assert 7 * 20 > EXACT_FACTOR * 8 and 7 * 20 <= EXACT_FACTOR * 9
    for batch_size in (1, 4):
        tb = token_batches(seqs, model, batch_size=batch_size, prepend_bos=True)
        run = lambda **kw: jacobian_stats(model, tb, hooks=HOOKS, output="kl", progress=False, **kw)
        probes, auto_probes = run(n_probes=8, exact=False), run(n_probes=8, exact="auto")
        assert not auto_probes.exact and auto_probes.n_probes == 8
        assert all(torch.equal(auto_probes[h].gram, probes[h].gram) for h in HOOKS)
        exact, auto_exact = run(exact=True), run(n_probes=9, exact="auto")
        assert auto_exact.exact and auto_exact.n_probes is None
        assert all(torch.equal(auto_exact[h].gram, exact[h].gram) for h in HOOKS)
    with pytest.raises(ValueError, match="exact"):
        run(exact="sometimes")


def test_per_head_query_grams_are_blocks():
    model = small_vocab_model()
    tb = ragged_batches(model)
    per = jacobian_stats(model, tb, hooks="q", exact=True, progress=False)
    full = jacobian_stats(model, tb, hooks="q", exact=True, per_head=False, progress=False)
    for name in per:
        H, d = full[name].feature_shape
        g = full[name].gram
        blocks = torch.stack([g[h * d : (h + 1) * d, h * d : (h + 1) * d] for h in range(H)])
        assert not per[name].has_full and rel(per[name].head_gram, blocks) < 1e-12
    assert list(per.to_frame(per_head=True)["head"]) == [0, 1, 0, 1]


def test_errors(tiny_toy_transformer, tiny_toy_tokens):
    with pytest.raises(ValueError, match="output_transform"):
        jacobian_stats(tiny_toy_transformer, tiny_toy_tokens, output="kl", output_transform=lambda o: o)
    with pytest.raises(ValueError, match="n_probes"):
        jacobian_stats(tiny_toy_transformer, tiny_toy_tokens, n_probes=0)
    with pytest.raises(ValueError, match="head_synchronization"):
        jacobian_stats(tiny_toy_transformer, tiny_toy_tokens, hooks="attn_pattern")
    with torch.no_grad():
        tiny_toy_transformer.unembed.W_U[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="output 'logits' in batch 0"):
        jacobian_stats(tiny_toy_transformer, tiny_toy_tokens, progress=False)


@pytest.mark.parametrize("backend", ["bridge", "hooked_transformer"])
def test_transformerlens_backends(backend, tmp_path):
    """On a TransformerBridge / HookedTransformer (tiny GPT-2, float32): activation statistics
    equal run_with_cache, and the value-hook Jacobian equals brute force. The bridge continues the
    forward from a hook's *returned* tensor only, which is what the gradient must be taken at."""
    from tests.fixtures import hf

    model = hf.open_model(hf.save_hf_model("gpt2", tmp_path / "tiny_gpt2"), backend)
    tb = token_batches(["w5 w6 w7 w8", "w9 w10"], model, batch_size=2)
    batch = tb.batch(0)
    assert tb.positions.bos_source == "prepended" and not batch.mask.all()
    from tl_degeneracy.stats import activation_stats

    st = activation_stats(model, tb, hooks=["blocks.1.hook_resid_pre", "blocks.1.attn.hook_v"], progress=False)
    _, cache = model.run_with_cache(batch.tokens, names_filter=list(st))
    for name, s in st.items():
        x = cache[name][batch.mask].flatten(1).double()
        assert s.count == len(x) and rel(s.gram, x.T @ x / len(x)) < 1e-12, name
    hook, out = "blocks.1.attn.hook_v", "blocks.1.hook_resid_post"
    js = jacobian_stats(model, tb, hooks=hook, output=out, exact=True, progress=False)
    K, n = brute_force_gram(model, batch.tokens, batch.mask, hook, "mse", output_hook=out)
    # float32 model: Jacobians agree to float32 rounding (~1e-7 relative), checked at 1e-5
    assert js[hook].count == n and float(K.norm()) > 0 and rel(js[hook].gram, K) < 1e-5


def test_the_frame_says_when_k_came_from_probes(tiny_toy_transformer, tiny_toy_tokens):
    """Audit 13b F2: jacobian_stats' frame gave a probed rank (82 where K's is 118 on toy:modadd) with
    nothing to say it was an estimate. A probed K̂ lies in K's range: its rank is at most K's."""
    probed = jacobian_stats(tiny_toy_transformer, tiny_toy_tokens, hooks="resid_pre", n_probes=1, progress=False)
    exact = jacobian_stats(tiny_toy_transformer, tiny_toy_tokens, hooks="resid_pre", exact=True, progress=False)
    a, b = probed.to_frame(), exact.to_frame()
    assert a["estimated"].all() and (a["n_probes"] == 1).all()
    assert not b["estimated"].any() and b["n_probes"].isna().all()
    assert (a["rank"] <= b["rank"]).all()


def test_a_pass_over_one_half_of_the_sequences_is_that_half_alone():
    """jacobian_pass(sequences="odd") differentiates only the odd-numbered sequences of each batch (LIB's
    refit passes, review 60 F8): exact K equals a pass over those sequences alone, also where a batch holds
    none of them (batch_size 1: every other batch is empty of the half, and only sets the shapes), and
    equals the odd half of a whole pass (the whole less ``res.half``)."""
    from tl_degeneracy.models.adapt import adapt
    from tl_degeneracy.stats.jacobian import jacobian_pass
    from tl_degeneracy.stats.passes import resolve_targets

    model = make_tiny_toy_transformer(seed=2)
    adapter = adapt(model)
    tokens = torch.randint(1, 20, (5, 6), generator=torch.Generator().manual_seed(4))
    targets = resolve_targets(adapter, ["resid_pre"], "test")
    kw = dict(objective="kl", exact=True, progress=False, per_head=False)
    for batch_size in (1, 2, 5):
        part = jacobian_pass(adapter, token_batches(tokens, adapter, batch_size=batch_size), targets, sequences="odd", **kw)
        alone = jacobian_pass(adapter, token_batches(tokens[1::2], adapter, batch_size=batch_size), targets, **kw)
        whole = jacobian_pass(adapter, token_batches(tokens, adapter, batch_size=batch_size), targets, half=True, **kw)
        for t in targets:
            expected = alone.accs[t.name].gram()[0]
            assert part.accs[t.name].count == alone.accs[t.name].count
            assert torch.allclose(part.accs[t.name].gram()[0], expected, rtol=1e-10, atol=1e-14 * float(expected.abs().max()))
            odd = whole.accs[t.name].without(whole.half[t.name]).gram()[0]
            assert torch.allclose(part.accs[t.name].gram()[0], odd, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    with pytest.raises(ValueError, match="sequences must be"):
        jacobian_pass(adapter, token_batches(tokens, adapter), targets, sequences="first", **kw)
