"""OV/QK invariants (METHODS §2): effective maps however the model was loaded, the float64 rank
rule whatever the storage dtype, agreement with TransformerLens, known answers, GQA, toys, errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import tl_degeneracy as tld
from tests.fixtures.hf import has_hooked_transformer
from tl_degeneracy.gauge import write_attention
from tl_degeneracy.invariants import free_directions, ov_circuits, ov_invariants, qk_circuits, qk_invariants
from tl_degeneracy.models.adapter import NormWeights
from tl_degeneracy.models.copying import copy_model
from tl_degeneracy.models.selection import read_attention
from tl_degeneracy.plots import plot_spectra

from .fixtures.device import test_device
from .fixtures.hf import LOADS, boot_native, has_hooked_transformer, load_as, native_config, open_model, save_hf_model
from .fixtures.jacobian import jacobian_rank


def _dense(W_left, W_right):
    m = W_left.detach().double() @ W_right.detach().double()
    return torch.linalg.svdvals(m), torch.linalg.eigvals(m)


def _projector(D: int, layernorm: bool) -> torch.Tensor:
    """P = I − 11ᵀ/D for LayerNorm, I otherwise (METHODS §2)."""
    eye = torch.eye(D, dtype=torch.float64)
    return eye - torch.full((D, D), 1.0 / D, dtype=torch.float64) if layernorm else eye


def _dense_effective(w, W_left, W_right, layernorm: bool, reading_right: bool):
    """Dense effective D×D map from METHODS §2's formula: P diag(w) W_left · W_right P for OV, and
    P diag(w) W_left · W_rightᵀ-side (P diag(w))ᵀ for QK (``reading_right``: the right factor reads too)."""
    D = W_left.shape[0]
    P = _projector(D, layernorm)  # the reference is computed on the CPU, wherever the model is
    Dw = torch.diag(w.detach().double().cpu()) if w is not None else torch.eye(D, dtype=torch.float64)
    right = W_right.detach().double().cpu()
    m = P @ Dw @ W_left.detach().double().cpu() @ right
    return m @ (Dw @ P) if reading_right else m @ P


def _match_eigs(a: np.ndarray, b: np.ndarray, tol: float) -> None:
    """Every eigenvalue of ``a`` has a partner in ``b`` within ``tol`` and the counts agree."""
    assert len(a) == len(b)
    for lam in a:
        assert np.min(np.abs(b - lam)) <= tol, (lam, b)


def test_toy_matches_dense_effective_maps(tiny_toy_transformer):
    """The toy's LayerNorm has random gain and bias: OV = P diag(w) W_V W_O P, QK = P diag(w) W_Q W_Kᵀ diag(w) P."""
    ov, qk = ov_invariants(tiny_toy_transformer), qk_invariants(tiny_toy_transformer)
    blk = tiny_toy_transformer.blocks[1]
    a, w = blk.attn, blk.ln1.w
    assert len(ov) == len(qk) == 4
    assert (ov["norm"] == "layernorm").all() and ov["centered"].all()
    row = ov[(ov["layer"] == 1) & (ov["head"] == 1)].iloc[0]
    m = _dense_effective(w, a.W_V[1], a.W_O[1], layernorm=True, reading_right=False)
    s, eig = torch.linalg.svdvals(m), torch.linalg.eigvals(m)
    d = a.W_V.shape[-1]
    assert row["rank"] == d and row["free_directions"] == d * d
    np.testing.assert_allclose(row["singular_values"], s[:d].numpy(), rtol=1e-10)
    big = eig[eig.abs() > 1e-6 * s[0]].numpy()  # the D×D product has D − d zero eigenvalues
    _match_eigs(row["eigenvalues"], big, 1e-8 * float(s[0]))
    np.testing.assert_allclose(row["frobenius"], float(torch.linalg.matrix_norm(m)))
    assert -1 <= row["copying_score"] <= 1 and 0 <= row["positive_eigen_share"] <= 1
    # The raw product W_V W_O has other singular values: the fold is not a no-op here.
    raw, _ = _dense(a.W_V[1], a.W_O[1])
    assert np.abs(row["singular_values"] - raw[:d].numpy()).max() > 1e-2 * float(raw[0])
    row = qk[(qk["layer"] == 1) & (qk["head"] == 0)].iloc[0]
    m = _dense_effective(w, a.W_Q[0], a.W_K[0].T, layernorm=True, reading_right=True)
    np.testing.assert_allclose(row["singular_values"], torch.linalg.svdvals(m)[:d].numpy(), rtol=1e-10)
    assert not row["rotary"]


def test_affine_qk_folds_the_norm_bias(tiny_toy_transformer):
    """The affine QK form is that of the augmented normalised input [n, 1]: x = n·w + β, so the LN bias β
    enters through b_Q + β W_Q and b_K + β W_K (as fold_ln puts it), the reading weights as P diag(w) W."""
    blk = tiny_toy_transformer.blocks[0]
    a, w, beta = blk.attn, blk.ln1.w.detach().double().cpu(), blk.ln1.b.detach().double().cpu()
    D = w.shape[0]
    P = _projector(D, True)
    frame = qk_invariants(tiny_toy_transformer, affine=True)
    for h in range(a.W_Q.shape[0]):
        W_Q, W_K = a.W_Q[h].detach().double().cpu(), a.W_K[h].detach().double().cpu()
        left = torch.cat([P @ torch.diag(w) @ W_Q, (a.b_Q[h].detach().double().cpu() + beta @ W_Q)[None]])
        right = torch.cat([P @ torch.diag(w) @ W_K, (a.b_K[h].detach().double().cpu() + beta @ W_K)[None]])
        s = torch.linalg.svdvals(left @ right.T)
        row = frame[(frame["layer"] == 0) & (frame["head"] == h)].iloc[0]
        np.testing.assert_allclose(row["singular_values"], s[: row["rank"]].numpy(), rtol=1e-10)
        assert row["free_directions"] == a.W_Q.shape[-1] ** 2  # full rank, no GQA, no rotary: GL(d)


def _factorisation_free(fn, factors: list[torch.Tensor]) -> int:
    """Free directions by definition (METHODS (2.4)): factor entries minus the rank of the Jacobian
    of ``fn`` (factors → products) there, from torch.func."""
    return sum(f.numel() for f in factors) - jacobian_rank(fn, factors)


def _ov_group(fm, layer: int, heads: list[int]):
    """The effective OV factors of query heads ``heads`` sharing one value head: [W_V, W_O^h, …]."""
    return [fm.A[layer, heads[0]]] + [fm.B[layer, h] for h in heads]


#: Head (0, 0) of the tiny toy (D = 16, d = 8): how its factors are made rank deficient, and whether
#: both end up with the product's rank (where (2.4)'s 2·D·d − r(2D − r) holds).
RANK_CASES = {
    "full rank": ({}, True),
    "W_V of rank 3": ({"W_V": (slice(None), slice(3, None))}, False),
    "zero column of W_V": ({"W_V": (slice(None), 7)}, False),
    "zero row of W_O": ({"W_O": (7,)}, False),
    "both of rank 3": ({"W_V": (slice(None), slice(3, None)), "W_O": (slice(3, None),)}, True),
    "pruned": ({"W_V": (slice(None),), "W_O": (slice(None),)}, True),
}


@pytest.mark.parametrize("case", list(RANK_CASES))
def test_free_directions_are_the_jacobian_kernel(tiny_toy_transformer, case):
    """Audit finding 6 / METHODS (2.4): ``free_directions`` is the number of factor entries minus the
    Jacobian rank of (W_V, W_O) ↦ W_V W_O, and it is the factors' ranks that set it; (2.4)'s
    2·D·d − r(2D − r) in the product's rank r is that count only when both factors have rank r."""
    zeros, both_rank_r = RANK_CASES[case]
    a = tiny_toy_transformer.blocks[0].attn
    with torch.no_grad():  # exact zeros: a low-rank product formed in float32 would be rank d to float64
        for name, index in zeros.items():
            getattr(a, name)[0][index] = 0.0
    ov = ov_invariants(tiny_toy_transformer)
    row = ov[(ov["layer"] == 0) & (ov["head"] == 0)].iloc[0]
    factors = _ov_group(ov_circuits(tiny_toy_transformer), 0, [0])
    assert row["free_directions"] == _factorisation_free(lambda f: f[0] @ f[1], factors)
    D, d, r = a.W_V.shape[1], a.W_V.shape[2], row["rank"]
    assert (row["free_directions"] == 2 * D * d - r * (2 * D - r)) == both_rank_r
    assert len(row["singular_values"]) == r and len(row["eigenvalues"]) <= r
    if r:
        assert row["singular_values"][-1] > row["tol"]


def test_free_directions_formula():
    """The closed forms of :func:`free_directions` (METHODS (2.4))."""
    D, d = 16, 8
    assert free_directions(D, D, [(d, d, d)]) == d * d  # GL(d)
    assert free_directions(D, D, [(d, 3, 3)]) == 2 * D * d - 3 * (2 * D - 3)
    assert free_directions(D, D, [(d, d - 1, d)]) == d * d - d + D  # a zero column of W_V
    assert free_directions(D, 2 * D, [(d, d, d)]) == d * d  # a GQA group of two heads: one GL(d)
    assert free_directions(D, D, [(1, 1, 1)] * d) == d  # full rotary, distinct frequencies
    assert free_directions(D, D, [(1, 1, 1)] * 2 + [(d - 2, d - 2, d - 2)]) == 2 + (d - 2) ** 2  # partial


def test_sma_toy():
    """SMA: W_O = I so OV is W_V; the query is a learned vector, so QK is 0 and its affine form rank 1."""
    sma = tld.load_model("toy:sma")
    ov = ov_invariants(sma)
    s = torch.linalg.svdvals(sma.blocks[0].attn.W_V[0].detach().double())
    assert len(ov) == 1 and ov["rank"][0] == len(s)
    np.testing.assert_allclose(ov["singular_values"][0], s.numpy(), rtol=1e-10)
    assert qk_invariants(sma)["rank"][0] == 0
    affine = qk_invariants(sma, affine=True)
    assert affine["rank"][0] == 1 and bool(affine["affine"][0])
    q = sma.blocks[0].attn.q.detach().double()
    np.testing.assert_allclose(affine["singular_values"][0], [float(q.norm())], rtol=1e-10)


def test_circuits_fixed_by_the_architecture_count_no_free_directions():
    """Audit 4: the SMA toy's W_O is a fixed identity and W_Q = 0, W_K = I are no parameters either,
    so neither circuit has a gauge (random_gauge leaves it as it is): free_directions <NA>, not the
    d² = 1,024 a factorisation of parameters would have, and the report's verdict does not call
    QK's rank 0 weight-space degeneracy. Head synchronization leaves its counts, which take W_O's
    entries for parameters, empty (a lone head still adds no freedom)."""
    from tl_degeneracy import degeneracy_report
    from tl_degeneracy.report.sections import verdict

    sma = tld.load_model("toy:sma")
    for frame in (ov_invariants(sma), qk_invariants(sma), qk_invariants(sma, affine=True)):
        assert not frame["parameters"].any() and frame["free_directions"].isna().all()
    bytelm = ov_invariants(tld.load_model("toy:bytelm"))
    assert bytelm["parameters"].all() and (bytelm["free_directions"] == 32 * 32).all()
    section = degeneracy_report(sma, sections=["invariants"], progress=False)["invariants"]
    assert section.values["qk"]["fixed_heads"] == 1 and section.values["qk"]["low_rank_parameter_heads"] == 0
    assert section.values["ov"]["free_directions"] == 0 and "fixed by the architecture" in section.headline
    text = verdict(section)
    assert "rank-deficient" not in text and "1 OV and 1 QK circuit(s) fixed by the architecture" in text
    from tl_degeneracy.synchronization import head_synchronization

    row = head_synchronization(sma, tld.toy_data("sma", 16)).to_frame().iloc[0]
    assert row["n_params"] is pd.NA and row["free_block"] is pd.NA and row["extra_freedom"] == 0 and row["count_exact"]


def test_telling_parameters_apart_writes_nothing():
    """Which factors are parameters is read from storage: the invariants write no weight (version
    counters unchanged) and still run on weights made under inference_mode, as before."""
    model = tld.load_model("toy:bytelm")
    versions = {name: p._version for name, p in model.named_parameters()}
    assert ov_invariants(model)["parameters"].all() and qk_invariants(model)["parameters"].all()
    assert {name: p._version for name, p in model.named_parameters()} == versions
    with torch.inference_mode():
        frozen = tld.load_model("toy:bytelm")
    assert (ov_invariants(frozen)["free_directions"] == 32 * 32).all()


# ---------------------------------------------------------------------------------------------- GQA, rotary
@pytest.mark.parametrize("zero_column", [False, True])
def test_gqa_ov_free_directions_count_the_group_once(tl_models, zero_column):
    """Audit finding 6 (e10): under GQA one W_V serves two query heads and one gauge A acts on the
    whole group, so the group's free directions are those of (W_V, W_O¹, W_O²) ↦ (W_V W_O¹, W_V W_O²):
    d² = 64, not 2·d². The group's count stands on its first head and the column sums to the total."""
    model = copy_model(tl_models("llama", "bridge"))  # a private copy: the weights change below
    if zero_column:  # a rank-deficient shared value head: both of its query heads lose a direction
        w = read_attention(tld.adapt(model), 0)
        W_V = w["W_V"].detach().clone()
        W_V[0, :, 5] = 0.0
        write_attention(tld.adapt(model), 0, {"W_V": W_V})
    ov = ov_invariants(model)
    fm = ov_circuits(model)
    D, d = fm.ldim, fm.mdim
    for layer in range(2):
        for kv, heads in enumerate(([0, 1], [2, 3])):
            rows = ov[(ov["layer"] == layer) & (ov["kv_head"] == kv)]
            truth = _factorisation_free(lambda f: torch.stack([f[0] @ o for o in f[1:]]), _ov_group(fm, layer, heads))
            assert rows["free_directions"].tolist() == [truth, 0]
            if not (zero_column and layer == 0 and kv == 0):
                assert truth == d * d
    # A zero column of the shared W_V: d² − d + 2D in its group (its W_O row in both heads is free).
    assert ov["free_directions"].sum() == 4 * d * d + (2 * D - d if zero_column else 0)


def test_affine_qk_counts_bias_entries_only_where_the_model_stores_the_bias(tl_models):
    """A bias-free Llama: with the queries of KV group 0 zeroed, every entry of its W_K is free (d·D).
    affine=True appended the [b_Q]/[b_K] row and column and counted d of their entries too, though the
    checkpoint has no such bias (audit 9 F3: 264 for 256)."""
    model = copy_model(tl_models("llama", "bridge"))  # a private copy: the weights change below
    adapter = tld.adapt(model)
    assert not adapter.map_biases(0)["W_Q"] and not adapter.map_biases(0)["W_K"]
    W_Q = read_attention(adapter, 0)["W_Q"].detach().clone()
    W_Q[0:2] = 0
    write_attention(adapter, 0, {"W_Q": W_Q})
    D, d = adapter.d_model, adapter.d_head
    for affine in (False, True):
        layer0 = qk_invariants(model, affine=affine).query("layer == 0")
        assert layer0["rank"].tolist()[:2] == [0, 0]
        assert int(layer0["free_directions"].iloc[0]) == d * D


def _native_gqa_without_rotary():
    """A TL-native GQA bridge (4 query heads, 2 KV heads, d = 8) with learned positions."""
    from transformer_lens.model_bridge import TransformerBridge

    cfg = native_config("llama")
    cfg.positional_embedding_type = "standard"
    return TransformerBridge.boot_native(cfg).eval()


def test_gqa_qk_free_directions_count_the_group_once():
    """QK under GQA: one W_K serves two query heads, one B per group: (W_Q¹, W_Q², W_K) ↦ (W_Q^h W_Kᵀ)
    has d² free directions per group, counted once."""
    model = _native_gqa_without_rotary()
    qk, fm = qk_invariants(model), qk_circuits(model)
    d = fm.mdim
    for layer in range(2):
        for kv, heads in enumerate(([0, 1], [2, 3])):
            factors = [fm.A[layer, h] for h in heads] + [fm.B[layer, heads[0]]]
            truth = _factorisation_free(lambda f: torch.stack([q @ f[-1] for q in f[:-1]]), factors)
            rows = qk[(qk["layer"] == layer) & (qk["kv_head"] == kv)]
            assert rows["free_directions"].tolist() == [truth, 0] and truth == d * d
    assert not qk["rotary"].any()


def _rotary_scores(hf_model, positions: int):
    """(query factors…, key factor) ↦ the scores q_t·k_0 of every offset t < ``positions``, with the
    rotation done by Hugging Face's own rotary code (an independent account of layout and frequencies)."""
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    rotary = next(m for name, m in hf_model.named_modules() if name.endswith("rotary_emb"))
    x = torch.zeros(1, dtype=torch.float64)
    cos, sin = rotary(x, torch.arange(positions)[None])  # [1, T, rotary dims]

    def scores(factors):
        K = factors[-1]  # d × D: the key at offset 0 is not rotated
        out = []
        for Q in factors[:-1]:
            q = Q[:, None, None, :].expand(Q.shape[0], 1, positions, Q.shape[1])
            rotated, _ = apply_rotary_pos_emb(q, q, cos.to(Q), sin.to(Q))
            out.append(torch.einsum("atd,db->tab", rotated[:, 0], K))
        return torch.stack(out)

    return scores


def _repeated_frequency_dir(tmp_path):
    """The tiny Llama with rope_theta = 1: every rotary pair turns by 1 rad per position."""
    import transformers as tf

    from .fixtures.hf import tiny_tokenizer

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, max_position_embeddings=64, rope_theta=1.0, vocab_size=100,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    directory = tmp_path / "tiny_repeated_rope"  # no "llama" in the path (TransformerLens 3.x picks by name)
    tf.LlamaForCausalLM(cfg).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


#: name → (architecture, zeroed W_Q entries of layer 0, full-rank count per group as a closed form).
#: d = 8: Llama rotates all 8 dims with 4 distinct frequencies (2 each); NeoX rotates 2 (2 + 6²);
#: rope_theta = 1 gives all four pairs one frequency, so the commuting matrices are GL(4, C): 2·4².
ROTARY_CASES = {
    "llama, rotary on all dims": ("llama", None, 8),
    "llama, one rotary pair of a group's W_Q zero": ("llama", (slice(0, 2), slice(None), [0, 4]), None),
    "TL-native, one rotary pair of a group's W_Q zero": ("native", (slice(0, 2), slice(None), [0, 1]), None),
    "neox, rotary on 2 of 8 dims": ("neox", None, 2 + 6 * 6),
    "repeated frequencies": ("repeated", None, 2 * 4 * 4),
}


@pytest.mark.parametrize("case", list(ROTARY_CASES))
def test_rotary_qk_free_directions_are_the_commutant(hf_dirs, tmp_path, case):
    """Audit finding 6: with rotary embeddings the score is q R_t kᵀ, only gauges commuting with every
    R_t are symmetries, and QK's free directions are those of (W_Q^h…, W_K) ↦ (W_Q^h R_t W_Kᵀ)_{h,t}:
    the commutant at full rank (2 per rotary pair of distinct frequency, (d − rotary dims)² for the
    rest; more for repeated frequencies), checked against the Jacobian rank with HF's own rotary (TL-native: TransformerLens' rotary code).
    Offsets 0 … 8 span the algebra of the one-position rotation (≤ 8 distinct eigenvalues at d = 8)."""
    from transformers import AutoModelForCausalLM

    arch, zeros, closed_form = ROTARY_CASES[case]
    if arch == "native":  # its own rotary code (adjacent pairs) is the independent account
        model = boot_native("llama")
        scores = _native_rotary_scores(model, positions=9)
    else:
        directory = _repeated_frequency_dir(tmp_path) if arch == "repeated" else hf_dirs[arch]
        model = open_model(directory, "bridge")
        scores = _rotary_scores(AutoModelForCausalLM.from_pretrained(directory), positions=9)
    if zeros is not None:  # both query heads of group 0 lose a rotary pair: (0, 4) of rotate-half, (0, 1) adjacent
        W_Q = read_attention(tld.adapt(model), 0)["W_Q"].detach().clone()
        W_Q[zeros] = 0.0
        write_attention(tld.adapt(model), 0, {"W_Q": W_Q})
    qk, fm = qk_invariants(model), qk_circuits(model)
    assert qk["rotary"].all()
    adapter = tld.adapt(model)
    group = adapter.n_heads // adapter.n_kv_heads
    for kv in range(adapter.n_kv_heads):
        heads = list(range(kv * group, (kv + 1) * group))
        factors = [fm.A[0, h] for h in heads] + [fm.B[0, heads[0]]]
        truth = _factorisation_free(scores, factors)
        rows = qk[(qk["layer"] == 0) & (qk["kv_head"] == kv)]
        assert rows["free_directions"].tolist() == [truth] + [0] * (group - 1), kv
        if closed_form is not None:
            assert truth == closed_form
    if zeros is not None:  # the pair's two eigenvectors no longer reach W_Q: each frees W_K's D entries there
        assert qk.loc[(qk["layer"] == 0) & (qk["head"] == 0), "free_directions"].item() == 6 + 2 * fm.rdim


def _rotate(x: torch.Tensor, t: int, angles: torch.Tensor, adjacent: bool) -> torch.Tensor:
    """x [..., d] turned by the rotary rotation of position t: pair j = (2j, 2j + 1) if ``adjacent``
    else (j, j + pairs), by the angle angles[j]·t; coordinates beyond the pairs unchanged."""
    x, p = x.double(), angles.numel()
    first = torch.arange(p) * 2 if adjacent else torch.arange(p)
    second = first + 1 if adjacent else first + p
    c, s = torch.cos(angles * t), torch.sin(angles * t)
    out = x.clone()
    out[..., first] = x[..., first] * c - x[..., second] * s
    out[..., second] = x[..., first] * s + x[..., second] * c
    return out


def _pattern_error(model, angles: torch.Tensor, adjacent: bool, positions: int = 10) -> float:
    """Largest deviation of layer 0's attention pattern (``hook_pattern``) from the one predicted from
    its unrotated queries and keys (``hook_q``, ``hook_k``) turned by (``angles``, ``adjacent``): the
    model's own forward is the oracle of its rotary layout and frequencies."""
    seen = {}
    names = [f"blocks.0.attn.hook_{x}" for x in ("q", "k", "pattern")]
    model.run_with_hooks(torch.arange(3, 3 + positions, device=test_device())[None],
                         fwd_hooks=[(n, lambda x, hook, n=n: seen.__setitem__(n, x.detach().cpu())) for n in names])
    q, k, pattern = (seen[n][0] for n in names)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    turned_q, turned_k = (torch.stack([_rotate(x[t], t, angles, adjacent) for t in range(positions)]) for x in (q, k))
    scores = torch.einsum("qhd,khd->hqk", turned_q, turned_k) / math.sqrt(q.shape[-1])
    causal = torch.ones(positions, positions, dtype=torch.bool).tril()
    return float((scores.masked_fill(~causal, -math.inf).softmax(-1) - pattern.double()).abs().max())


@pytest.mark.parametrize("arch", ["native", "llama", "neox", "gptj"])
@pytest.mark.parametrize("backend", ["bridge", "bridge-compat", "hooked_transformer"])
def test_rotary_pairs_and_angles_are_the_forwards(hf_dirs, tmp_path, arch, backend):
    """The pairs and angles the free directions are counted in (METHODS §2) are those the model's
    forward rotates by: its attention pattern is reproduced from hook_q/hook_k with them (float32
    rounding: ~1e-7), and the other pairing misses it by far more. Both TL-native models and GPT-J
    (whose config leaves ``rotary_adjacent_pairs`` False) rotate adjacent pairs; the adapter said
    (j, j + pairs) for them, so a factor rank-deficient on a rotary pair was counted in the wrong
    eigenspaces. Llama and NeoX (partial rotary) rotate halves."""
    if arch == "native":
        if backend != "bridge":
            pytest.skip("TL-native models are bridges only")
        model = boot_native("llama")
    else:
        directory = save_hf_model("gptj", tmp_path / "gptj") if arch == "gptj" else hf_dirs[arch]
        model = open_model(directory, backend)
    angles, adjacent = tld.adapt(model).rotary_angles(0)
    assert adjacent == (arch in ("native", "gptj"))
    assert _pattern_error(model, angles, adjacent) < 1e-5
    if angles.numel() > 1:  # one pair (the tiny NeoX: 2 rotary dims) is both (0, 1) and (j, j + 1)
        assert _pattern_error(model, angles, not adjacent) > 1e-3


def test_rotation_functions_say_their_pairing_and_a_module_with_two_is_named(tmp_path, monkeypatch):
    """Review 32 F5: the pairing was read from the name rotate_every_two, which GLM-4V's text rotation
    (rotate_half_llm, adjacent pairs) does not have. Each HF module's rotation functions are now read
    off where they send a unit vector; a module with two that disagree (GLM-4V's vision and text)
    cannot say which its attention uses: a warning says so, and halves are taken."""
    import importlib

    from tl_degeneracy.models.bridge import rotation_pairings

    def module(arch):
        return importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")

    assert rotation_pairings(module("glm4v")) == {"rotate_half": False, "rotate_half_llm": True}
    assert rotation_pairings(module("gptj")) == {"rotate_every_two": True}
    assert rotation_pairings(module("llama")) == {"rotate_half": False}
    model = open_model(save_hf_model("gptj", tmp_path / "gptj"), "bridge")
    monkeypatch.setattr(module("gptj"), "rotate_half", module("llama").rotate_half, raising=False)
    with pytest.warns(RuntimeWarning, match=r"rotate_every_two \(adjacent pairs\), rotate_half \(halves\): which its "
                                            r"attention uses cannot be read"):
        assert tld.adapt(model).rotary_angles(0)[1] is False


def _native_rotary_scores(model, positions: int):
    """(query factors…, key factor) ↦ the scores q_t·k_0 of every offset t < ``positions``, rotated
    by the TL-native model's own rotary code (``NativeRotary.apply_rope``)."""
    rotary = model.blocks[0].attn.original_component.rotary

    def scores(factors):
        K = factors[-1]  # d × D: the key at offset 0 is not rotated
        out = []
        for Q in factors[:-1]:
            q = Q[:, None, None, :].expand(Q.shape[0], 1, positions, Q.shape[1])
            turned, _ = rotary.apply_rope(q, q)
            out.append(torch.einsum("atd,db->tab", turned[:, 0], K))
        return torch.stack(out)

    return scores


# ---------------------------------------------------------------------------------------------- rank rule
@pytest.mark.parametrize("condition", [1e0, 1e2, 1e4, 1e6])
def test_rank_does_not_depend_on_the_balance_of_the_factors(tiny_toy_transformer, condition):
    """Audit finding 9 (e3): a rank-4 head under gauges A of growing condition number read as rank 4,
    4, 6, 8, because the product's rounding (the SVD core of the factors) grows with ‖W_V A‖‖A⁻¹ W_O‖
    while the cut-off followed σ_1. The cut-off is now relative to ‖A‖₂‖B‖₂ (numerics.product_scale),
    the rank 4 whatever the balance. The same for QK with W_K of rank 4."""
    a = tiny_toy_transformer.blocks[0].attn
    tiny_toy_transformer.double()  # the gauged factors are stored exactly as computed
    g = torch.Generator().manual_seed(3)
    d = a.W_V.shape[-1]
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.logspace(0, math.log10(condition), d, dtype=torch.float64)) @ Q.T
    with torch.no_grad():
        a.W_O[0, 4:] = 0.0
        a.W_K[0, :, 4:] = 0.0
        a.W_V[0], a.W_O[0] = a.W_V[0] @ A, torch.linalg.solve(A, a.W_O[0])
        a.W_Q[0], a.W_K[0] = a.W_Q[0] @ A, a.W_K[0] @ torch.linalg.inv(A).T
    for frame in (ov_invariants(tiny_toy_transformer), qk_invariants(tiny_toy_transformer)):
        assert frame.loc[(frame["layer"] == 0) & (frame["head"] == 0), "rank"].item() == 4
        assert (frame.loc[frame["layer"] == 1, "rank"] == d).all()


def test_eigenvalues_and_copying_scores_do_not_depend_on_the_balance_of_the_factors(tiny_toy_transformer):
    """Audit 19a F1: the eigenvalues came from B A = A⁻¹(W_O W_V)A in the stored gauge A, whose
    rounding grows as cond(A)²·eps: 7·10⁻⁶ relative at cond 10⁶ (copying score 1.7·10⁻⁷ off), where
    the singular values agreed to 4·10⁻¹¹. From the SVD's core S^½VᵀUS^½ they move by the rounding
    of the stored gauged weights alone, cond(A)·eps ≈ 10⁻¹⁰ here: 10⁻⁸ allows 100×."""
    tiny_toy_transformer.double()
    before = ov_invariants(tiny_toy_transformer)
    a = tiny_toy_transformer.blocks[0].attn
    d = a.W_V.shape[-1]
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    A = Q @ torch.diag(torch.logspace(0, 6, d, dtype=torch.float64)) @ Q.T
    with torch.no_grad():
        a.W_V[0], a.W_O[0] = a.W_V[0] @ A, torch.linalg.solve(A, a.W_O[0])
    after = ov_invariants(tiny_toy_transformer)
    for column in ("eigenvalues", "singular_values"):
        for x, y in zip(before[column], after[column]):
            gaps = np.abs(x[:, None] - y[None, :])  # nearest partner either way: a conjugate pair's order is rounding's
            assert len(x) == len(y) and max(gaps.min(0).max(), gaps.min(1).max()) <= 1e-8 * np.abs(x).max()
    np.testing.assert_allclose(after["copying_score"], before["copying_score"], rtol=0, atol=1e-8)


# ---------------------------------------------------------------------------------------------- however loaded
# Folding rounds every weight entry once or twice in float32 (w·W, then the mean over d_model removed),
# so the folded factors differ from the float64 ones by ‖E‖ ≲ 4·eps32·‖W‖ per factor; a singular value
# of the product moves by at most ‖E_L‖‖R‖ + ‖L‖‖E_R‖ ≲ 8·eps32·√d·σ_1 ≈ 2.7e-6·σ_1 at d = 8
# (‖·‖_F ≤ √d‖·‖_2 for rank-d factors). Copying scores are ratios of eigenvalue sums of d eigenvalues
# of condition κ ≲ 10 here: 10× that.
_EPS32 = torch.finfo(torch.float32).eps
_SV_RTOL = 8 * _EPS32 * math.sqrt(8)
_SCORE_ATOL = 10 * _SV_RTOL


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_same_invariants_however_loaded(tl_models, hf_dirs, arch):
    """Issue 14 item 3: one checkpoint with non-trivial LayerNorm/RMSNorm gains and biases gives the
    same spectra, ranks and copying scores unfolded (bridge, HookedTransformer), in compatibility mode
    and folded by HookedTransformer (TL 3.x): the effective maps are the same maps."""
    loads = [ld for ld in LOADS if has_hooked_transformer() or not ld.startswith("hooked_transformer")]
    norm = {"gpt2": "layernorm", "neox": "layernorm", "llama": "rmsnorm"}[arch]
    for affine in (False, True):
        for circuit in ("OV", "QK"):
            if affine and circuit == "OV":
                continue
            frames = {}
            for ld in loads:
                model = load_as(tl_models, hf_dirs, arch, ld)
                frames[ld] = ov_invariants(model) if circuit == "OV" else qk_invariants(model, affine=affine)
                assert (frames[ld]["norm"] == norm).all() and (frames[ld]["centered"] == (norm == "layernorm")).all()
            ref = frames["bridge"]
            assert (ref["rank"] == 8).all()  # d_head: the inner dimension bounds the affine form too
            for ld, frame in frames.items():
                assert frame["rank"].tolist() == ref["rank"].tolist(), (ld, circuit)
                # Rotary frequencies read from HF's inv_freq (bridges) or TL's rotary buffers (HookedTransformer).
                assert frame["free_directions"].tolist() == ref["free_directions"].tolist(), (ld, circuit)
                for (_, r0), (_, r1) in zip(ref.iterrows(), frame.iterrows()):
                    top = r0["singular_values"][0]
                    np.testing.assert_allclose(r1["singular_values"], r0["singular_values"], rtol=0,
                                               atol=_SV_RTOL * top, err_msg=f"{ld} {circuit} {affine}")
                    if circuit == "OV":
                        np.testing.assert_allclose(r1["copying_score"], r0["copying_score"], atol=_SCORE_ATOL)
                        np.testing.assert_allclose(r1["positive_eigen_share"], r0["positive_eigen_share"],
                                                   atol=_SCORE_ATOL)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("load", ["bridge-compat", "hooked_transformer-folded"])
def test_agrees_with_transformerlens_on_folded_models(tl_models, hf_dirs, arch, load):
    """On a folded model TransformerLens' own model.OV / model.QK are the effective maps: same
    singular values and eigenvalues."""
    if load.startswith("hooked_transformer") and not has_hooked_transformer():
        pytest.skip("HookedTransformer needs TransformerLens 3.x")
    model = load_as(tl_models, hf_dirs, arch, load)
    for fn, name in ((ov_invariants, "OV"), (qk_invariants, "QK")):
        try:
            theirs = getattr(model, name)
        except Exception as e:  # noqa: BLE001 - report which backend lacks it
            pytest.skip(f"{type(model).__name__}.{name} unavailable here: {e}")
        frame = fn(model)
        S = theirs.S.detach().double().cpu()
        eig = theirs.eigenvalues.detach().to(torch.complex128).cpu()
        assert S.shape[:2] == (model.cfg.n_layers, model.cfg.n_heads)  # GQA expanded by TL too
        for _, row in frame.iterrows():
            s_tl = S[row["layer"], row["head"]]
            r = row["rank"]
            # TL's FactoredMatrix works in the model's float32: its SVD is good to ~d·eps32 relative.
            np.testing.assert_allclose(row["singular_values"], s_tl[:r].numpy(), rtol=0, atol=_SV_RTOL * float(s_tl[0]))
            e_tl = eig[row["layer"], row["head"]].numpy()
            e_tl = e_tl[np.abs(e_tl) > 1e-4 * float(s_tl[0])]
            _match_eigs(row["eigenvalues"], e_tl, 1e-5 * float(s_tl[0]))


@pytest.mark.parametrize("load", LOADS)
def test_adapter_norm_weights(tl_models, hf_dirs, load):
    """adapter.norm_weights: the kind, and the stored gain/bias (None where folded away or absent)."""
    from transformers import AutoModelForCausalLM

    if load.startswith("hooked_transformer") and not has_hooked_transformer():
        pytest.skip("HookedTransformer needs TransformerLens 3.x")
    for arch, kind in (("gpt2", "layernorm"), ("llama", "rmsnorm")):
        adapter = tld.adapt(load_as(tl_models, hf_dirs, arch, load))
        hf = {"gpt2": "transformer.h.1.ln_2", "llama": "model.layers.1.post_attention_layernorm"}[arch]
        raw = dict(AutoModelForCausalLM.from_pretrained(hf_dirs[arch]).named_parameters())
        norm = adapter.norm_weights(1, "ln2")
        assert norm.kind == kind
        if load == "hooked_transformer-folded":
            assert norm.w is None and norm.b is None
        elif load == "bridge-compat":  # folded: kept as w = 1, b = 0
            assert torch.equal(norm.w, torch.ones_like(norm.w))
        else:
            torch.testing.assert_close(norm.w.cpu(), raw[f"{hf}.weight"].detach(), rtol=0, atol=0)
            if arch == "gpt2":
                torch.testing.assert_close(norm.b.cpu(), raw[f"{hf}.bias"].detach(), rtol=0, atol=0)
        if arch == "llama":
            assert norm.b is None
    with pytest.raises(ValueError, match="ln1"):
        adapter.norm_weights(0, "ln_final")
    with pytest.raises(IndexError):
        adapter.norm_weights(2, "ln1")


def test_toy_norm_weights(tiny_toy_transformer):
    sma, modadd = (tld.adapt(tld.load_model(f"toy:{name}", device=test_device())) for name in ("sma", "modadd"))
    assert sma.norm_weights(0, "ln1") == NormWeights("rmsnorm", None, None)  # weightless RMSNorm
    assert modadd.norm_weights(0, "ln1") == NormWeights(None, None, None)
    norm = tld.adapt(tiny_toy_transformer).norm_weights(0, "ln1")
    assert norm.kind == "layernorm" and torch.equal(norm.w, tiny_toy_transformer.blocks[0].ln1.w.detach())
    assert not ov_invariants(modadd)["centered"].any() and (ov_invariants(modadd)["norm"].isna()).all()


def test_rmsnorm_is_not_centred(tl_models):
    """Llama (RMSNorm): OV = diag(w) W_V W_O, no projection; the dense formula with P would differ."""
    model = tl_models("llama", "bridge")
    a, w = model.blocks[1].attn, model.blocks[1].ln1.w
    ov = ov_invariants(model)
    assert not ov["centered"].any()
    row = ov[(ov["layer"] == 1) & (ov["head"] == 2)].iloc[0]
    kept = _dense_effective(w, a.W_V[1], a.W_O[2], layernorm=False, reading_right=False)
    centred = _dense_effective(w, a.W_V[1], a.W_O[2], layernorm=True, reading_right=False)
    s = torch.linalg.svdvals(kept)[:8].numpy()
    np.testing.assert_allclose(row["singular_values"], s, rtol=1e-10)
    assert np.abs(torch.linalg.svdvals(centred)[:8].numpy() - s).max() > 1e-3 * s[0]


def test_gqa_rows_share_the_kv_head(tl_models):
    model = tl_models("llama", "bridge")
    adapter = tld.adapt(model)
    ov = ov_invariants(model)
    assert adapter.n_kv_heads == 2 and adapter.n_heads == 4
    assert ov["kv_head"].tolist() == [0, 0, 1, 1] * adapter.n_layers
    attn, w = model.blocks[1].attn, model.blocks[1].ln1.w.detach().double().cpu()
    W_V, W_O = attn.W_V.detach().double().cpu(), attn.W_O.detach().cpu()  # [n_kv, D, d], [H, d, D]
    for h in range(4):
        s, _ = _dense(w[:, None] * W_V[h // 2], W_O[h])
        row = ov[(ov["layer"] == 1) & (ov["head"] == h)].iloc[0]
        np.testing.assert_allclose(row["singular_values"], s[: row["rank"]].numpy(), rtol=1e-9)
    assert qk_invariants(model)["rotary"].all()


# ---------------------------------------------------------------------------------------------- rank rule
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ranks_do_not_depend_on_the_storage_dtype(hf_dirs, arch):
    """Issue 14 item 4: float32, float16 and bfloat16 loads of one checkpoint give the same ranks
    (d_head everywhere): the products are formed in float64 from numbers exact in float64, so the
    cut-off is float64's, not the storage dtype's (bfloat16's gave ranks 8–11 of 12 at d_model 48)."""
    ranks = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = tld.load_model(hf_dirs[arch], device=test_device(), dtype=dtype)
        assert tld.adapt(model).dtype == dtype
        ov, qk = ov_invariants(model), qk_invariants(model)
        ranks[dtype] = (ov["rank"].tolist(), qk["rank"].tolist(), ov["rtol"].iloc[0])
    assert ranks[torch.float16] == ranks[torch.bfloat16] == ranks[torch.float32]
    assert set(ranks[torch.float32][0]) == set(ranks[torch.float32][1]) == {8}
    assert ranks[torch.float32][2] == 32 * torch.finfo(torch.float64).eps  # max(D, d)·eps(float64)


def test_gpt2_small_width_bfloat16_is_full_rank():
    """Issue 14 item 4: a random model at GPT-2-small width (D = 768, d = 64) stored in bfloat16 has
    every head at rank 64 (the bfloat16 cut-off 768·eps(bf16) > 1 gave rank 0)."""
    from tl_degeneracy.models.toys.transformer import ToyTransformer

    model = ToyTransformer(n_layers=1, d_model=768, n_heads=12, d_head=64, d_mlp=64, d_vocab=16, n_ctx=8, seed=0)
    model = model.to(torch.bfloat16).eval()
    for frame in (ov_invariants(model), qk_invariants(model)):
        assert len(frame) == 12 and (frame["rank"] == 64).all()
        assert (frame["free_directions"] == 64 * 64).all()


def test_plot_spectra(tiny_toy_transformer):
    fig = plot_spectra(ov_invariants(tiny_toy_transformer))
    assert len(fig.data) == 2 * 2  # one trace per (layer, head)
    assert "OV" in fig.layout.title.text
    with pytest.raises(ValueError, match="singular_values"):
        plot_spectra(ov_invariants(tiny_toy_transformer).drop(columns="singular_values"))


def test_not_a_transformer():
    with pytest.raises(TypeError, match="cannot adapt"):
        ov_invariants(nn.Linear(3, 3))


def test_non_finite_weights_are_refused_naming_the_tensor():
    # NaN weights used to surface as a raw LinAlgError from the SVD (and a misleading message from the
    # gauge tools); every weight-space analysis now names the tensor first.
    import tl_degeneracy as tld
    from tests.fixtures.toys import make_tiny_toy_transformer

    model = make_tiny_toy_transformer()
    with torch.no_grad():
        model.blocks[1].attn.W_V[0, 2, 3] = float("nan")
    for analysis in (tld.ov_invariants, tld.qk_invariants, tld.random_gauge, tld.canonicalize_heads):
        with pytest.raises(tld.NumericalError, match=r"not finite: parameter blocks\.1\.attn\.W_V .* 1 NaN"):
            analysis(model)


def _shortformer(seed: int = 0):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=20, n_ctx=8,
                                  act_fn="gelu", normalization_type="LN", positional_embedding_type="shortformer",
                                  seed=seed, device="cpu")
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():  # random LN gain and bias, so that folding them wrongly would show
        g = torch.Generator().manual_seed(seed)
        model.blocks[0].ln1.w.copy_(1 + 0.3 * torch.randn(16, generator=g))
        model.blocks[0].ln1.b.copy_(0.3 * torch.randn(16, generator=g))
        model.blocks[0].attn.b_Q.copy_(0.3 * torch.randn(2, 8, generator=g))
        model.blocks[0].attn.b_K.copy_(0.3 * torch.randn(2, 8, generator=g))
    return model


@pytest.mark.skipif(not has_hooked_transformer(), reason="shortformer: HookedTransformer (TransformerLens 3.x) only")
def test_shortformer_qk_is_the_form_on_the_input_the_queries_and_keys_read():
    """Audit 13a F2: a shortformer block's queries and keys read x̃ = ln1(x) + W_pos[p] (TransformerLens
    cannot fold ln1 there), the values ln1(x). QK from P diag(w) W_Q missed what W_Q reads through
    W_pos (rank 7 where the 8th query direction moves the pattern by 0.15); QK is now W_Q W_Kᵀ on x̃,
    whose affine form gives every score exactly."""
    model = _shortformer()
    with torch.no_grad():  # head 0's first query column reads only the mean direction, which P removes
        model.blocks[0].attn.W_Q[0, :, 0] = 0.5
    tokens = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(0))
    qk = tld.qk_invariants(model)
    assert qk["rank"].tolist() == [8, 8] and (qk["norm"].isna()).all() and not qk["centered"].any()
    assert qk["free_directions"].tolist() == [64, 64]  # d² at full rank: the GL(8) gauge
    # that direction moves the pattern: it is read, through W_pos (and ln1's bias)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "pattern" in n or "scores" in n
                                    or n.endswith(("ln1.hook_normalized", "hook_pos_embed")))
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0, :, 0] = 0.0
    _, moved = model.run_with_cache(tokens, names_filter=lambda n: "pattern" in n)
    assert (cache["blocks.0.attn.hook_pattern"] - moved["blocks.0.attn.hook_pattern"])[:, 0].abs().max() > 1e-3
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0, :, 0] = 0.5
    # the affine form [x̃, 1] QK [x̃', 1]ᵀ / √d_head is every (causal) score
    ln1 = model.blocks[0].ln1
    x = (cache["blocks.0.ln1.hook_normalized"] * ln1.w + ln1.b + cache["hook_pos_embed"]).double()
    x1 = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)
    form = qk_circuits(model, affine=True)
    AB = (form.A @ form.B)[0]  # [H, D+1, D+1]
    scores = torch.einsum("bqi,hij,bkj->bhqk", x1, AB, x1) / math.sqrt(8)
    causal = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    torch.testing.assert_close(scores[..., causal], cache["blocks.0.attn.hook_attn_scores"].double()[..., causal],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not has_hooked_transformer(), reason="shortformer: HookedTransformer (TransformerLens 3.x) only")
def test_shortformer_gauges_keep_the_model_and_its_qk_invariants():
    model = _shortformer(1)
    tokens = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(1))
    before = tld.qk_invariants(model, affine=True)
    for gauge in (lambda m: tld.random_gauge(m, seed=3), tld.canonicalize_heads):
        moved = gauge(model)
        torch.testing.assert_close(moved(tokens), model(tokens), rtol=1e-4, atol=1e-4)
        after = tld.qk_invariants(moved, affine=True)
        assert after["rank"].tolist() == before["rank"].tolist()
        for s, t in zip(before["singular_values"], after["singular_values"]):
            np.testing.assert_allclose(t, s, rtol=1e-4)


@pytest.mark.skipif(not has_hooked_transformer(), reason="shortformer: HookedTransformer (TransformerLens 3.x) only")
def test_shortformer_counts_read_what_the_queries_keys_and_values_read():
    """Audit 13a F3: degeneracy_counts read a shortformer's query/key input as ln1's output (rank_G 15
    of 16: ln1(x) is mean-free up to its bias, x̃ = ln1(x) + W_pos[p] is not). W_Q and W_K now read
    x̃ (their covariance: they have biases), W_V ln1(x); the report's counts section runs (it was
    skipped, and its invariants section too, OV included: review 35 #10)."""
    model = _shortformer()
    tokens = torch.randint(0, 20, (6, 8), generator=torch.Generator().manual_seed(0))
    counts = tld.degeneracy_counts(model, tokens, progress=False)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("ln1.hook_normalized",
                                                                               "hook_pos_embed")))
    ln1 = model.blocks[0].ln1
    values = (cache["blocks.0.ln1.hook_normalized"] * ln1.w + ln1.b).double().reshape(-1, 16)
    queries = values + cache["hook_pos_embed"].double().expand(6, 8, 16).reshape(-1, 16)

    def rank(x):
        return int(torch.linalg.matrix_rank(torch.cov(x.T), rtol=1e-6))

    assert (rank(queries), rank(values)) == (16, 15)
    rank_G = counts.groupby("map")["rank_G"].unique().map(list).to_dict()
    assert rank_G["W_Q"] == [16] and rank_G["W_K"] == [16] and rank_G["W_V"] == [15]
    report = tld.degeneracy_report(model, tokens, sections=["invariants", "counts"], progress=False)
    assert report["invariants"].status == "ok" and report["counts"].status == "ok"
