"""Modular-addition toy (METHODS §7, Nanda et al. configuration at reduced p): data split, the
no-LayerNorm / no-bias ToyTransformer it uses, the adapter over it, the shipped grokked checkpoint,
the trainer (determinism, checkpoints, command line) and the Fourier structure of the embedding."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import tl_degeneracy as tld
from tl_degeneracy.errors import DataError, MissingHookError
from tl_degeneracy.models.hooks import LAYER_KINDS
from tl_degeneracy.models.toys import BUNDLED_TOYS
from tl_degeneracy.models.toys.data import toy_data
from tl_degeneracy.models.toys.modadd import (
    DATA_SEED,
    FRAC_TRAIN,
    P,
    crossing_epoch,
    evaluate_modadd,
    main,
    modadd_data,
    modadd_model,
    train_modadd,
)
from tl_degeneracy.models.toys.transformer import ToyTransformer


def n_parameters(p: int) -> int:
    """W_E + W_pos + W_Q, W_K, W_V, W_O + W_in, W_out + W_U; no biases (research/toy_tasks.md §2.3)."""
    d, h, dh, f = 128, 4, 32, 512
    return (p + 1) * d + 3 * d + 4 * h * d * dh + 2 * d * f + d * p


@pytest.fixture(scope="module")
def shipped():
    return tld.load_model("toy:modadd")


# ------------------------------------------------------------------ data
def test_split_is_deterministic_disjoint_and_labelled():
    p = 13
    split = modadd_data(p, 0.4, seed=3)
    assert len(split.train_labels) == int(0.4 * p * p) == 67 and len(split.test_labels) == p * p - 67
    both = torch.cat([split.train_index, split.test_index])
    assert torch.equal(both.sort().values, torch.arange(p * p))  # disjoint and covering
    for tokens, labels, index in ((split.train_tokens, split.train_labels, split.train_index),
                                  (split.test_tokens, split.test_labels, split.test_index)):
        assert tokens.dtype == labels.dtype == torch.long and tokens.shape == (len(index), 3)
        a, b = index // p, index % p
        assert torch.equal(tokens[:, 0], a) and torch.equal(tokens[:, 1], b)
        assert (tokens[:, 2] == p).all()  # the "=" token
        assert torch.equal(labels, (a + b) % p)
    again = modadd_data(p, 0.4, seed=3)
    assert torch.equal(again.train_index, split.train_index) and torch.equal(again.test_tokens, split.test_tokens)
    assert not torch.equal(modadd_data(p, 0.4, seed=4).train_index, split.train_index)
    with pytest.raises(ValueError, match="frac_train"):
        modadd_data(p, 1.0)
    with pytest.raises(ValueError, match="empty"):
        modadd_data(p, 0.001)
    with pytest.raises(ValueError, match="p=1"):
        modadd_data(1, 0.5)


def test_toy_data_registration():
    every = toy_data("modadd")
    assert every.shape == (P * P, 3) and torch.equal(every[P + 2], torch.tensor([1, 2, P]))
    split = modadd_data(P, FRAC_TRAIN, DATA_SEED)
    tokens, labels = toy_data("toy:modadd", split="test", labels=True)
    assert torch.equal(tokens, split.test_tokens) and torch.equal(labels, split.test_labels)
    some, some_labels = toy_data("modadd", n=100, seed=1, split="train", labels=True)
    assert some.shape == (100, 3) and len(torch.unique(some, dim=0)) == 100  # distinct rows
    assert torch.equal(some_labels, (some[:, 0] + some[:, 1]) % P)
    assert torch.equal(some, toy_data("modadd", n=100, seed=1, split="train"))
    assert not torch.equal(some, toy_data("modadd", n=100, seed=2, split="train"))
    with pytest.raises(DataError, match="split"):
        toy_data("modadd", split="val")
    with pytest.raises(DataError, match="distinct rows"):
        toy_data("modadd", n=P * P + 1)


# ------------------------------------------------------------------ architecture
def test_forward_matches_the_nanda_architecture_by_hand():
    """No LayerNorm, no biases, ReLU, causal attention, logits at every position onto p residues."""
    p = 7
    model = modadd_model(p, seed=2).double().eval()
    with torch.no_grad():  # O(1) weights so the attention pattern and the ReLU are far from trivial
        for param in model.parameters():
            param.mul_(30)
    tokens = modadd_data(p, 0.5, seed=0).train_tokens[:6]
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    assert not any(k.rsplit(".", 1)[-1].startswith("b_") or ".ln" in k for k in sd)  # nothing but the W_s
    resid = sd["embed.W_E"][tokens] + sd["pos_embed.W_pos"]
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    attn_out = torch.zeros_like(resid)
    for h in range(4):
        q, k, v = (resid @ sd[f"blocks.0.attn.W_{x}"][h] for x in "QKV")
        scores = (q @ k.transpose(-1, -2) / math.sqrt(32)).masked_fill(~causal, -math.inf)
        attn_out = attn_out + scores.softmax(-1) @ v @ sd["blocks.0.attn.W_O"][h]
    resid = resid + attn_out
    resid = resid + F.relu(resid @ sd["blocks.0.mlp.W_in"]) @ sd["blocks.0.mlp.W_out"]
    logits = model(tokens)
    assert logits.shape == (6, 3, p)
    torch.testing.assert_close(logits, resid @ sd["unembed.W_U"], atol=1e-9, rtol=1e-9)
    _, cache = model.run_with_cache(tokens)
    assert (cache["blocks.0.mlp.hook_pre"] < 0).any() and cache["blocks.0.attn.hook_pattern"][:, :, 2].max() > 0.5


def test_adapter_config_hooks_and_live_parameters(shipped):
    adapter = tld.adapt(shipped)
    cfg = adapter.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head, cfg.d_mlp) == (1, 4, 4, 128, 32, 512)
    assert (cfg.d_vocab, cfg.n_ctx, cfg.act_fn, cfg.normalization) == (P + 1, 3, "relu", None)
    assert cfg.positional_embedding == "standard" and not cfg.tied_embeddings
    for kind in LAYER_KINDS:
        name = adapter.hook_name(kind, 0)
        assert name in shipped.hook_dict and adapter.hook_kind(name) == (kind, 0)
    assert adapter.hook_name("embed") in shipped.hook_dict
    with pytest.raises(MissingHookError, match="no normalization layers"):
        adapter.hook_name("ln_final")
    live = adapter.live_parameters()
    assert live.numel == n_parameters(P) == sum(t.numel() for t in shipped.parameters())
    assert set(live.names) == {
        "embed.W_E", "pos_embed.W_pos", "blocks.0.attn.W_Q", "blocks.0.attn.W_K", "blocks.0.attn.W_V",
        "blocks.0.attn.W_O", "blocks.0.mlp.W_in", "blocks.0.mlp.W_out", "unembed.W_U"}
    att, emb = adapter.attention_weights(), adapter.embedding_weights()
    assert torch.equal(att.b_Q, torch.zeros(1, 4, 32)) and torch.equal(att.b_O, torch.zeros(1, 128))
    assert emb.W_U.shape == (128, P) and torch.equal(emb.b_U, torch.zeros(P))


def test_perturbed_forward_matches_in_place_and_does_not_leak(shipped):
    model = ToyTransformer(**shipped.init_kwargs()).double().eval()
    model.load_state_dict(shipped.state_dict())
    adapter = tld.adapt(model)
    live = adapter.live_parameters()
    g = torch.Generator().manual_seed(0)
    deltas = {n: 0.01 * torch.randn(2, *t.shape, generator=g, dtype=torch.float64) for n, t in live.tensors().items()}
    tokens = toy_data("modadd", n=16, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = adapter.perturbed_forward(deltas, tokens, chains=True)
    assert out.shape == (2, 16, 3, P)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    for c in range(2):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(deltas[n][c])
            expected = model(tokens)
            for n, p in model.named_parameters():
                p.copy_(before[n])
        torch.testing.assert_close(out[c], expected, atol=1e-10, rtol=0)
    assert (out[0] - model(tokens)).abs().max() > 1e-3


# ------------------------------------------------------------------ shipped checkpoint
def test_shipped_checkpoint_generalises_and_matches_its_record(shipped):
    assert any(entry[0] == "toy:modadd" for entry in BUNDLED_TOYS)
    assert isinstance(shipped, ToyTransformer) and not shipped.training
    meta = shipped.metadata
    assert meta["command"].startswith("python -m tl_degeneracy.models.toys.modadd")
    assert (meta["p"], meta["frac_train"], meta["data_seed"]) == (P, FRAC_TRAIN, DATA_SEED)
    assert shipped.init_kwargs() == {**modadd_model(P).init_kwargs(), "seed": meta["seed"]}
    split = modadd_data(P, FRAC_TRAIN, DATA_SEED)
    assert (meta["n_train"], meta["n_test"]) == (len(split.train_labels), len(split.test_labels))
    train = evaluate_modadd(shipped, split.train_tokens, split.train_labels)
    test = evaluate_modadd(shipped, split.test_tokens, split.test_labels)
    assert train.acc == 1.0 and test.acc >= 0.99  # grokked: generalises to the held-out pairs
    # The checkpoint is the run it records (one pair of slack: another CPU may round differently).
    assert abs(test.acc - meta["final"]["test_acc"]) <= 1 / meta["n_test"]
    history = meta["history"]
    assert history[-1]["epoch"] == meta["epochs"] and history[-1]["test_acc"] == meta["final"]["test_acc"]
    # Memorisation before generalisation: the training set is fitted well before the test set.
    frame = pd.DataFrame(history)
    assert meta["grok_epoch_test_acc_0.99"] == crossing_epoch(frame, 0.99)
    assert crossing_epoch(frame, 0.99, "train_acc") < meta["grok_epoch_test_acc_0.5"] < meta["grok_epoch_test_acc_0.99"]


def test_embedding_concentrates_on_a_few_fourier_frequencies(shipped):
    """Nanda et al.: the grokked embedding is sparse in the Fourier basis of Z_p (a few key
    frequencies); a random embedding spreads its energy evenly over the (p - 1)/2 frequencies."""

    def top_share(W_E: torch.Tensor, k: int) -> float:
        spectrum = torch.fft.rfft(W_E[:P].double(), dim=0).abs().pow(2).sum(-1)[1:]  # drop frequency 0
        return float(spectrum.sort(descending=True).values[:k].sum() / spectrum.sum())

    trained = top_share(shipped.embed.W_E.detach(), 3)
    untrained = top_share(modadd_model(P, seed=shipped.metadata["seed"]).embed.W_E.detach(), 3)
    # Random: 3 of the 15 frequencies of Z_31 hold ≈ 3/15 = 0.2 (each frequency's energy is a sum
    # of 256 squares, ~9 % noise; the largest 3 of 15 reach ≈ 0.22). Shipped model: 0.946, on
    # frequencies 1, 3 and 11.
    assert untrained < 0.35
    assert trained > 0.85


# ------------------------------------------------------------------ trainer
def test_short_retrain_is_reproducible_checkpointed_and_equals_the_stored_start(shipped, tmp_path):
    meta = shipped.metadata
    kw = dict(p=P, frac_train=meta["frac_train"], weight_decay=meta["weight_decay"], seed=meta["seed"],
              data_seed=meta["data_seed"], epochs=10, eval_every=10, num_threads=1)
    first = train_modadd(**kw, checkpoint_every=5, checkpoint_dir=tmp_path)
    second = train_modadd(**kw)
    for (n1, p1), (n2, p2) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    cols = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc"]
    # A checkpoint also records a history row (epoch 5 here), so the checkpointed run has one more.
    assert first.history.epoch.tolist() == [0, 5, 10] and second.history.epoch.tolist() == [0, 10]
    assert first.history[cols].iloc[[0, 2]].reset_index(drop=True).equals(second.history[cols])
    # The first rows of the shipped run's history; equal on the machine that made it, and within
    # float32 rounding noise amplified by ten Adam steps elsewhere.
    stored = {row["epoch"]: row for row in meta["history"] if row["epoch"] <= 10}
    assert sorted(stored) == [0, 10]
    for row in second.history.to_dict("records"):
        for col in cols[1:]:
            assert row[col] == pytest.approx(stored[row["epoch"]][col], rel=1e-4, abs=1e-6), (row["epoch"], col)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_000000.pt", "epoch_000005.pt", "epoch_000010.pt"]
    last = ToyTransformer.load(tmp_path / "epoch_000010.pt")
    assert last.metadata["epoch"] == 10 and last.metadata["weight_decay"] == meta["weight_decay"]
    for n, p in first.model.state_dict().items():
        assert torch.equal(last.state_dict()[n], p), n


def test_command_line(tmp_path):
    out = tmp_path / "m.pt"
    meta = main(["--p", "11", "--epochs", "4", "--eval-every", "2", "--seed", "1", "--out", str(out),
                 "--history", str(tmp_path / "h.csv")])
    model = ToyTransformer.load(out)
    assert model.metadata == meta and meta["command"].startswith("python -m tl_degeneracy.models.toys.modadd --p 11")
    assert [row["epoch"] for row in meta["history"]] == [0, 2, 4] and meta["n_parameters"] == n_parameters(11)
    split = modadd_data(11, FRAC_TRAIN, DATA_SEED)
    final = evaluate_modadd(model, split.train_tokens, split.train_labels)
    assert final.loss == pytest.approx(meta["final"]["train_loss"], rel=1e-6)
    assert (tmp_path / "h.csv").read_text().startswith("epoch,train_loss,train_acc,test_loss,test_acc")


def test_trainer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="together"):
        train_modadd(p=5, epochs=1, checkpoint_every=1)
    with pytest.raises(ValueError, match="eval_every"):
        train_modadd(p=5, epochs=1, eval_every=0)
