"""Head and neuron synchronization (METHODS §3): exact cases with known answers, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tl_degeneracy.errors import DataError
from tl_degeneracy.synchronization import head_synchronization, synchronized_blocks

from .fixtures.toys import make_tiny_toy_transformer


def _tokens(n=24, pos=12, vocab=20, seed=0):
    return torch.randint(0, vocab, (n, pos), generator=torch.Generator().manual_seed(seed))


def _synchronize_layer0(model):
    """Head 1 of layer 0 gets head 0's W_Q, W_K, b_Q, b_K: identical attention patterns."""
    a = model.blocks[0].attn
    with torch.no_grad():
        for name in ("W_Q", "W_K", "b_Q", "b_K"):
            getattr(a, name)[1] = getattr(a, name)[0]
    return model


def test_shared_qk_pair_is_one_block_with_2d2_extra():
    model = _synchronize_layer0(make_tiny_toy_transformer())
    res = head_synchronization(model, _tokens(), tol=0.01)
    d = model.cfg.d_head
    assert res.distance.shape == (2, 2, 2)
    assert res.distance[0, 0, 1] < 1e-6 and res.distance[0, 1, 0] < 1e-6
    assert res.blocks[0] == [[0, 1]]
    assert res.distance[1, 0, 1] > 0.05 and res.blocks[1] == [[0], [1]]  # independent random heads
    frame = res.to_frame()
    pair = frame[frame["layer"] == 0].iloc[0]
    assert pair["s_heads"] == (d, d) and pair["s_block"] == 2 * d
    assert pair["extra_freedom"] == 2 * d * d
    assert (frame[frame["layer"] == 1]["extra_freedom"] == 0).all()
    assert res.extra_freedom == 2 * d * d
    assert res.n_samples == 24 * 12
    fig = res.plot()
    assert len(fig.data) == 2


def test_rank_deficient_values_give_less():
    """W_V of head 1 of rank 3 (and b_V = 0): s_1 = 3, s_S = d + 3, extra = (d+3)² − d² − 9."""
    model = _synchronize_layer0(make_tiny_toy_transformer())
    a = model.blocks[0].attn
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        a.W_V[1] = torch.randn(a.W_V.shape[1], 3, generator=g) @ torch.randn(3, a.W_V.shape[2], generator=g)
        a.b_V[1] = 0
    res = head_synchronization(model, _tokens(), tol=0.01)
    d = model.cfg.d_head
    pair = res.to_frame().iloc[0]
    assert pair["heads"] == (0, 1)
    assert pair["s_heads"] == (d, 3) and pair["s_block"] == d + 3
    assert pair["extra_freedom"] == (d + 3) ** 2 - d * d - 9


def test_streaming_equals_one_batch():
    model = make_tiny_toy_transformer()
    tokens = _tokens(n=10)
    a = head_synchronization(model, tokens, tol=0.01, batch_size=3)
    b = head_synchronization(model, tokens, tol=0.01, batch_size=10)
    np.testing.assert_allclose(a.distance, b.distance, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.value_gram, b.value_gram, rtol=1e-10, atol=1e-12)


def test_distance_matches_a_direct_computation():
    model = make_tiny_toy_transformer()
    tokens = _tokens(n=4)
    _, cache = model.run_with_cache(tokens)
    p = cache["blocks.1.attn.hook_pattern"].double()  # [b, H, q, k]
    direct = 0.5 * (p[:, 0] - p[:, 1]).abs().sum(-1).mean()
    res = head_synchronization(model, tokens, tol=0.0)
    np.testing.assert_allclose(res.distance[1, 0, 1], float(direct), rtol=1e-10)
    assert np.all(np.diagonal(res.distance, axis1=1, axis2=2) == 0)


def test_gqa_bridge(tl_models):
    model = tl_models("llama", "bridge")
    res = head_synchronization(model, _tokens(n=4, pos=8, vocab=100), tol=0.0)
    assert res.distance.shape == (2, 4, 4) and res.value_gram.shape == (2, 16, 16)
    frame = res.to_frame()
    assert (frame["size"] == 1).all() and (frame["extra_freedom"] == 0).all()


def test_greedy_blocks():
    dist = np.array([[0, 0.01, 0.5], [0.01, 0, 0.5], [0.5, 0.5, 0]])
    assert synchronized_blocks(dist, 0.02) == [[0, 1], [2]]
    assert synchronized_blocks(dist, 0.0) == [[0], [1], [2]]
    assert synchronized_blocks(dist, 1.0) == [[0, 1, 2]]


def test_bad_input(tiny_toy_transformer):
    with pytest.raises(ValueError, match=r"tol must lie in \[0, 1\]"):
        head_synchronization(tiny_toy_transformer, _tokens(), tol=1.5)
    with pytest.raises(ValueError, match=r"tol must lie in \[0, 1\]"):
        head_synchronization(tiny_toy_transformer, _tokens(), tol=-0.1)
    with pytest.raises(DataError):
        head_synchronization(tiny_toy_transformer, torch.zeros(0, 5, dtype=torch.long), tol=0.1)
    with pytest.raises(TypeError, match="cannot adapt"):
        head_synchronization(torch.nn.Linear(2, 2), _tokens(), tol=0.1)


# ---------------------------------------------------------------------------------------------- neurons
from tl_degeneracy.synchronization import neuron_synchronization  # noqa: E402


def _relu_model_with_duplicate(c: float = 2.5):
    """ReLU MLP; neuron 5 of layer 0 is 2.5 × neuron 3 (W_in column and b_in): same firing pattern."""
    model = make_tiny_toy_transformer(act_fn="relu")
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        mlp.W_in[:, 5] = c * mlp.W_in[:, 3]
        mlp.b_in[5] = c * mlp.b_in[3]
    return model


def test_duplicated_relu_neuron_is_synchronized():
    model = _relu_model_with_duplicate()
    res = neuron_synchronization(model, _tokens(), tol=0.0)
    assert not res.approximate and res.act_fn == "relu"
    assert res.distance.shape == (2, 32, 32)
    assert res.distance[0, 3, 5] == 0
    frame = res.to_frame()
    assert frame[["layer", "neurons"]].values.tolist() == [[0, (3, 5)]]
    row = frame.iloc[0]
    # METHODS §3: block freedom s_a² with s_a the rank of the block's pre-activations: p_5 = 2.5 p_3,
    # so s_a = 1; separately each neuron has its own rescaling (1 + 1).
    assert row["s_block"] == 1 and row["free_block"] == 1 and row["free_separate"] == 2
    assert res.blocks[1] == [[i] for i in range(32)] or all(len(b) == 1 for b in res.blocks[1])
    # for ReLU the distance is the fraction of samples on which two neurons disagree
    _, cache = model.run_with_cache(_tokens())
    fire = (cache["blocks.0.mlp.hook_pre"] > 0).double().flatten(0, 1)
    np.testing.assert_allclose(res.distance[0, 0, 1], float((fire[:, 0] != fire[:, 1]).double().mean()), rtol=1e-12)
    assert len(res.plot().data) == 2


def test_gelu_is_labelled_approximate(tiny_toy_transformer):
    res = neuron_synchronization(tiny_toy_transformer, _tokens(), tol=0.01)
    assert res.approximate and bool(res.to_frame(singletons=True)["approximate"].all())
    assert np.all(res.distance >= 0) and np.all(res.distance <= 1)


def test_gated_mlp_bridge(tl_models):
    res = neuron_synchronization(tl_models("llama", "bridge"), _tokens(n=4, pos=8, vocab=100), tol=0.0)
    assert res.approximate and res.distance.shape == (2, 64, 64)


def test_neuron_bad_input(tiny_toy_transformer):
    with pytest.raises(ValueError, match=r"tol must lie in \[0, 1\]"):
        neuron_synchronization(tiny_toy_transformer, _tokens(), tol=2)
    with pytest.raises(DataError):
        neuron_synchronization(tiny_toy_transformer, [], tol=0.1)


def test_sma_toy_one_sample_per_sequence():
    """SMA: one learned query per sequence, so one sample per sequence; GELU MLP → approximate."""
    import tl_degeneracy as tld

    sma, data = tld.load_model("toy:sma"), tld.toy_data("sma", 32)
    heads = head_synchronization(sma, data, tol=0.05)
    assert heads.n_samples == 32 and heads.distance.shape == (1, 1, 1) and heads.blocks == [[[0]]]
    assert heads.to_dict()["blocks"][0]["s_block"] == heads.head_rank[0, 0] > 0
    neurons = neuron_synchronization(sma, data, tol=0.0)
    assert neurons.n_samples == 32 and neurons.approximate
