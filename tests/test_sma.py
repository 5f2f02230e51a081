"""Sparse modular addition toy (METHODS §7): model, hooks, weight readers, symmetry, data, trainer,
and the two shipped checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tl_degeneracy as tld
from tl_degeneracy.errors import DataError, MissingHookError
from tl_degeneracy.models.hooks import HOOK_KINDS, MODEL_KINDS
from tl_degeneracy.models.toys.data import toy_data
from tl_degeneracy.models.toys.sma import (
    SparseModularAddition,
    evaluate_sma,
    main,
    sma_data,
    train_sma,
)

#: Seed of "fresh" evaluation data: none of the shipped runs trained or tested on it.
FRESH_SEED = 987_654


def _model(seed=0, dtype=torch.float64, **kw):
    return SparseModularAddition(seed=seed, **kw).to(dtype).eval()


def _tokens(n=16, p=4, T=12, seed=0):
    return sma_data(n, p, T=T, seed=seed)[0]


# ------------------------------------------------------------------ architecture
@pytest.mark.parametrize(
    "V, T, d, F_, expected",
    [(4, 12, 32, 128, 9920), (4, 12, 2, 32, 200)],  # research/toy_tasks.md §0 and §1.3
)
def test_parameter_count(V, T, d, F_, expected):
    model = SparseModularAddition(p_max=V, d=d, d_mlp=F_, seq_len=T)
    # E + P + q + W_V + W_in + b_in + W_out + b_out; the tied unembedding adds nothing.
    formula = V * d + T * d + d + d * d + d * F_ + F_ + F_ * d + d
    assert formula == expected
    assert sum(p.numel() for p in model.parameters()) == expected
    assert tld.adapt(model).live_parameters().numel == expected


def test_config_and_output_shape():
    model = _model()
    cfg = tld.adapt(model).cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head, cfg.d_mlp) == (1, 1, 1, 32, 32, 128)
    assert (cfg.d_vocab, cfg.n_ctx, cfg.act_fn, cfg.normalization) == (4, 12, "gelu", "RMS")
    assert cfg.tied_embeddings and not cfg.parallel_attn_mlp and not cfg.gated_mlp
    assert cfg.positional_embedding == "standard"
    assert model(_tokens(5)).shape == (5, 1, 4)  # one prediction per sequence
    # Shorter sequences use the first positions of W_pos (as in TransformerLens); the adapter's
    # probes rely on it.
    assert model(_tokens(5, T=8)).shape == (5, 1, 4)


def test_bad_tokens_raise_clear_errors():
    model = _model()
    with pytest.raises(DataError, match=r"0\.\.3 \(nb_emb=4\).*max 4"):
        model(torch.full((2, 12), 4))
    with pytest.raises(DataError, match="min -1"):
        model(torch.full((2, 12), -1))
    with pytest.raises(DataError, match="13 positions; this model has n_ctx=12"):
        model(torch.zeros(2, 13, dtype=torch.long))
    with pytest.raises(DataError, match=r"shape \[batch, pos\]"):
        model(torch.zeros(12, dtype=torch.long))
    with pytest.raises(DataError, match="integer tensor"):
        model(torch.zeros(2, 12))


def test_hooks_match_forward_computed_from_weight_readers():
    model = _model(seed=3)
    with torch.no_grad():  # the initial q is small (U(±1/√d)); sharpen it so the softmax matters
        model.blocks[0].attn.q.mul_(30)
    adapter = tld.adapt(model)
    tokens = _tokens(32, seed=1)
    logits, cache = model.run_with_cache(tokens)
    att, mlp, emb = adapter.attention_weights(), adapter.mlp_weights(), adapter.embedding_weights()
    # The weight readers' representation: W_Q = 0 with b_Q = q, W_K = W_O = I, no value/output bias.
    eye = torch.eye(32, dtype=torch.float64)
    assert torch.equal(att.W_Q[0, 0], torch.zeros(32, 32, dtype=torch.float64))
    assert torch.equal(att.W_K[0, 0], eye) and torch.equal(att.W_O[0, 0], eye)
    assert torch.equal(att.b_K, torch.zeros_like(att.b_K)) and torch.equal(att.b_V, torch.zeros_like(att.b_V))
    assert torch.equal(emb.W_U, emb.W_E.T) and torch.equal(emb.b_U, torch.zeros(4, dtype=torch.float64))

    def rms(x):
        return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 1e-5)

    def close(name, expected):
        assert cache[name].shape == expected.shape, name
        torch.testing.assert_close(cache[name], expected, atol=1e-5, rtol=0, msg=name)

    resid_pre = emb.W_E[tokens] + emb.W_pos
    close("blocks.0.hook_resid_pre", resid_pre)
    h = rms(resid_pre)
    # TL form of the scores: (h W_Q + b_Q)·(h W_K + b_K)/√d_head. The query is the same at every
    # position (W_Q = 0), so the single query row is any of them.
    q = h @ att.W_Q[0, 0] + att.b_Q[0, 0]
    k = h @ att.W_K[0, 0] + att.b_K[0, 0]
    v = h @ att.W_V[0, 0] + att.b_V[0, 0]
    scores = torch.einsum("bd,btd->bt", q[:, 0], k) / math.sqrt(32)
    close("blocks.0.attn.hook_attn_scores", scores[:, None, None, :])
    pattern = scores.softmax(-1)
    close("blocks.0.attn.hook_pattern", pattern[:, None, None, :])
    close("blocks.0.attn.hook_v", v[:, :, None, :])
    z = torch.einsum("bt,btd->bd", pattern, v)[:, None, :]
    close("blocks.0.attn.hook_z", z[:, :, None, :])
    attn_out = z @ att.W_O[0, 0] + att.b_O[0]
    close("blocks.0.hook_attn_out", attn_out)
    pre = rms(attn_out) @ mlp.W_in[0] + mlp.b_in[0]
    close("blocks.0.mlp.hook_pre", pre)
    close("blocks.0.mlp.hook_post", F.gelu(pre))
    mlp_out = F.gelu(pre) @ mlp.W_out[0] + mlp.b_out[0]
    close("blocks.0.hook_mlp_out", mlp_out)
    resid_post = attn_out + mlp_out  # the residual around the MLP only
    close("blocks.0.hook_resid_post", resid_post)
    torch.testing.assert_close(logits, resid_post @ emb.W_U + emb.b_U, atol=1e-5, rtol=0)
    # The reference must not be trivially satisfied: the pattern is far from uniform.
    assert pattern.max() > 3 / 12


def test_adapter_hook_kinds():
    model = _model()
    adapter = tld.adapt(model)
    _, cache = model.run_with_cache(_tokens(3))
    reasons = {"resid_mid": "no residual connection around the attention",
               "q": "no query projection", "k": "no key projection", "ln_final": "no final norm"}
    expected_shapes = {
        "embed": (3, 12, 32), "resid_pre": (3, 12, 32), "v": (3, 12, 1, 32),
        "attn_scores": (3, 1, 1, 12), "attn_pattern": (3, 1, 1, 12), "z": (3, 1, 1, 32),
        "attn_out": (3, 1, 32), "mlp_pre": (3, 1, 128), "mlp_post": (3, 1, 128),
        "mlp_out": (3, 1, 32), "resid_post": (3, 1, 32),
    }
    assert set(reasons) | set(expected_shapes) == set(HOOK_KINDS)
    for kind, reason in reasons.items():
        layer = None if kind in MODEL_KINDS else 0
        with pytest.raises(MissingHookError, match=reason):
            adapter.hook_name(kind, layer)
    for kind, shape in expected_shapes.items():
        layer = None if kind in MODEL_KINDS else 0
        name = adapter.hook_name(kind, layer)
        assert name in model.hook_dict and cache[name].shape == shape, kind
        assert adapter.hook_kind(name) == (kind, layer)
    assert adapter.hook_names("resid_post") == ["blocks.0.hook_resid_post"]
    with pytest.raises(MissingHookError, match="no key projection"):
        adapter.hook_names(["resid_pre", "k"])


# ------------------------------------------------------------------ symmetry (known answer)
def _transformed(model: SparseModularAddition, A: torch.Tensor, A_inv: torch.Tensor) -> SparseModularAddition:
    """Every d-dimensional axis mapped by A (research/toy_tasks.md §1.6, TL row-vector layout):
    E→EA, P→PA, q→q A⁻ᵀ, W_V→A⁻¹W_V A, W_in→A⁻¹W_in, W_out→W_out A, b_out→b_out A.
    For A = R ∈ O(d) (A⁻¹ = Rᵀ, A⁻ᵀ = R) this is the exact symmetry of the model."""
    out = SparseModularAddition(**model.init_kwargs()).to(A.dtype)
    sd = model.state_dict()
    new = {
        "embed.W_E": sd["embed.W_E"] @ A,
        "pos_embed.W_pos": sd["pos_embed.W_pos"] @ A,
        "blocks.0.attn.q": sd["blocks.0.attn.q"] @ A_inv.T,
        "blocks.0.attn.W_V": A_inv @ sd["blocks.0.attn.W_V"] @ A,
        "blocks.0.mlp.W_in": A_inv @ sd["blocks.0.mlp.W_in"],
        "blocks.0.mlp.b_in": sd["blocks.0.mlp.b_in"],
        "blocks.0.mlp.W_out": sd["blocks.0.mlp.W_out"] @ A,
        "blocks.0.mlp.b_out": sd["blocks.0.mlp.b_out"] @ A,
    }
    assert set(new) == set(sd)
    out.load_state_dict(new)
    return out.eval()


@pytest.mark.parametrize("d, d_mlp", [(32, 128), (2, 32)])
def test_orthogonal_rotation_leaves_logits_unchanged(d, d_mlp):
    model = _model(seed=7, d=d, d_mlp=d_mlp)
    g = torch.Generator().manual_seed(1)
    R, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    R[:, 0] = -R[:, 0]  # include a reflection: the symmetry group is O(d), not only SO(d)
    tokens = _tokens(64, seed=2)
    rotated = _transformed(model, R, R.T)
    assert (rotated.embed.W_E - model.embed.W_E).abs().max() > 0.1  # the weights did move
    torch.testing.assert_close(rotated(tokens), model(tokens), atol=1e-10, rtol=0)
    # Teeth: the same reparametrisation with an invertible, non-orthogonal A changes the function
    # (neither the norm nor the tied unembedding commutes with it), so the equality above is a
    # property of R, not of the test.
    A = R @ torch.diag(torch.linspace(0.5, 2.0, d, dtype=torch.float64))
    assert (_transformed(model, A, torch.linalg.inv(A))(tokens) - model(tokens)).abs().max() > 1e-3


# ------------------------------------------------------------------ data
def test_data_labels_and_determinism():
    tokens, labels = sma_data(500, 4, T=12, k=5, seed=3)
    assert tokens.shape == (500, 12) and labels.shape == (500,)
    assert tokens.dtype == labels.dtype == torch.long
    assert tokens.min() == 0 and tokens.max() == 3
    assert torch.equal(labels, tokens[:, :5].sum(1) % 4)
    # Known answer, by hand, for one row.
    row = tokens[0].tolist()
    assert labels[0].item() == sum(row[:5]) % 4
    again, labels_again = sma_data(500, 4, T=12, k=5, seed=3)
    assert torch.equal(again, tokens) and torch.equal(labels_again, labels)
    assert not torch.equal(sma_data(500, 4, seed=4)[0], tokens)
    t7, y7 = sma_data(100, 7, T=9, k=3, seed=0)
    assert t7.shape == (100, 9) and t7.max() == 6 and torch.equal(y7, t7[:, :3].sum(1) % 7)
    with pytest.raises(ValueError, match="k=13"):
        sma_data(10, 4, T=12, k=13)
    with pytest.raises(ValueError, match="p=1"):
        sma_data(10, 1)


def test_toy_data_registration():
    tokens = toy_data("sma", n=64, seed=5)
    assert torch.equal(tokens, sma_data(64, 4, seed=5)[0])
    tokens2, labels2 = toy_data("sma", n=64, seed=5, p=2, labels=True)
    assert tokens2.max() == 1 and torch.equal(labels2, tokens2[:, :5].sum(1) % 2)
    assert toy_data("toy:sma").shape == (2048, 12)


# ------------------------------------------------------------------ shipped checkpoints
@pytest.mark.parametrize("spec, recipe", [("toy:sma", "curriculum"), ("toy:sma-scratch", "scratch")])
def test_shipped_checkpoints(spec, recipe):
    model = tld.load_model(spec)
    meta = model.metadata
    assert isinstance(model, SparseModularAddition) and not model.training
    assert meta["recipe"] == recipe and meta["p_schedule"][-1][0] == 4
    assert sum(p.numel() for p in model.parameters()) == 9920
    for key in ("command", "seed", "data_seed", "test_seed", "steps", "final", "wall_s", "torch_version"):
        assert key in meta, key
    # Training accuracy on the training set, regenerated from the recorded data seed.
    train_acc = evaluate_sma(model, *sma_data(meta["n_train"], 4, seed=meta["data_seed"]), 4)[1]
    assert train_acc >= 0.99
    # The checkpoint is the run it says (one sample of slack for a different thread count).
    assert abs(train_acc - meta["final"]["train_acc"]) <= 1.5 / meta["n_train"]
    assert FRESH_SEED not in (meta["data_seed"], meta["test_seed"])
    test_acc = evaluate_sma(model, *sma_data(4096, 4, seed=FRESH_SEED), 4)[1]
    if spec == "toy:sma":
        assert test_acc >= 0.95  # generalises
    else:
        assert test_acc <= 0.4  # memorises: chance is 0.25


# ------------------------------------------------------------------ trainer
def test_short_retrain_is_deterministic_and_learns(tmp_path):
    # One thread: deterministic, and several times faster than two on a shared CPU.
    kw = dict(d=32, d_mlp=128, seed=11, data_seed=2, n_train=256, n_test=128, eval_every=50, num_threads=1)
    m1, h1 = train_sma([(2, 200, 1e-3)], **kw, checkpoint_dir=tmp_path, checkpoint_every=100)
    m2, h2 = train_sma([(2, 200, 1e-3)], **kw)
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    cols = ["step", "p", "train_loss", "train_acc", "test_loss", "test_acc"]
    assert h1[cols].equals(h2[cols])
    assert h1.step.tolist() == [0, 50, 100, 150, 200]
    assert h1.train_loss.iloc[-1] < 0.9 * h1.train_loss.iloc[0]
    # Checkpoints every 100 steps, loadable, the last one equal to the returned model.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000.pt", "step_000100.pt", "step_000200.pt"]
    last = SparseModularAddition.load(tmp_path / "step_000200.pt")
    assert last.metadata["step"] == 200 and last.metadata["p"] == 2
    for n, p in m1.state_dict().items():
        assert torch.equal(last.state_dict()[n], p), n


def test_curriculum_phases_use_a_fresh_optimizer_and_leave_unused_rows():
    kw = dict(n_train=64, n_test=64, num_threads=1)
    full, hist = train_sma([(2, 20, 1e-3), (4, 1, 1e-2)], seed=0, eval_every=10, **kw)
    assert hist.step.tolist() == [0, 10, 20, 20, 21] and hist.p.tolist() == [2, 2, 2, 4, 4]
    init = SparseModularAddition(seed=0)
    after_p2, _ = train_sma([(2, 20, 1e-3)], seed=0, **kw)
    # At p = 2 the rows 2 and 3 are neither inputs nor (in the loss) outputs: exactly untouched.
    assert torch.equal(after_p2.embed.W_E[2:], init.embed.W_E[2:])
    assert not torch.equal(after_p2.embed.W_E[:2], init.embed.W_E[:2])
    before = {n: t.clone() for n, t in after_p2.state_dict().items()}
    continued, _ = train_sma([(4, 1, 1e-2)], model=after_p2, **kw)
    # The second phase is the same as a separate run continuing from the phase-1 weights, so no
    # optimiser state crosses the switch ...
    for n, t in full.state_dict().items():
        assert torch.equal(t, continued.state_dict()[n]), n
    # ... and its first step is a fresh Adam's: |Δθ| = lr·|g|/(|g|+1e-8) ≈ lr for every weight.
    delta = (continued.blocks[0].mlp.W_in - before["blocks.0.mlp.W_in"]).abs()
    assert delta.median().item() == pytest.approx(1e-2, rel=1e-3)
    with pytest.raises(ValueError, match="p_max=4"):
        train_sma([(5, 1, 1e-3)], model=SparseModularAddition())


def test_command_line(tmp_path):
    out = tmp_path / "m.pt"
    meta = main(["--schedule", "2:30:1e-3,4:20:1e-2", "--seed", "2", "--n-train", "64", "--n-test", "32",
                 "--out", str(out), "--history", str(tmp_path / "h.csv")])
    model = SparseModularAddition.load(out)
    assert model.metadata == meta and meta["steps"] == 50 and meta["p_schedule"] == [[2, 30, 0.001], [4, 20, 0.01]]
    assert meta["command"].startswith("python -m tl_degeneracy.models.toys.sma --schedule 2:30:1e-3,4:20:1e-2")
    train = sma_data(64, 4, seed=0)
    assert evaluate_sma(model, *train, 4) == pytest.approx((meta["final"]["train_loss"], meta["final"]["train_acc"]))
    assert (tmp_path / "h.csv").read_text().startswith("step,phase,p,lr,train_loss")


# ------------------------------------------------------------------ perturbed forward
def test_perturbed_forward_matches_in_place_and_does_not_leak():
    model = _model(seed=5)
    adapter = tld.adapt(model)
    live = adapter.live_parameters()
    assert live.names == ["embed.W_E", "pos_embed.W_pos", "blocks.0.attn.q", "blocks.0.attn.W_V",
                          "blocks.0.mlp.W_in", "blocks.0.mlp.b_in", "blocks.0.mlp.W_out", "blocks.0.mlp.b_out"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    deltas = {n: 0.05 * torch.randn(3, *t.shape, generator=g, dtype=torch.float64) for n, t in live.tensors().items()}
    tokens = _tokens(8, seed=9)
    out = adapter.perturbed_forward(deltas, tokens, chains=True)
    assert out.shape == (3, 8, 1, 4)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # nothing leaked into the model
    for c in range(3):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(deltas[n][c])  # the tied unembedding moves with W_E, as it must
            expected = model(tokens)
            for n, p in model.named_parameters():
                p.copy_(before[n])
        torch.testing.assert_close(out[c], expected, atol=1e-10, rtol=0)
    assert (out[0] - model(tokens)).abs().max() > 1e-4  # the deltas do change the output
