"""Head and neuron synchronization (METHODS §3): exact cases with known answers, and bad input."""

from __future__ import annotations

import copy
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import tl_degeneracy as tld
from tl_degeneracy import synchronization as sync_module
from tl_degeneracy.errors import DataError
from tl_degeneracy.synchronization import head_synchronization, synchronized_blocks

from .fixtures.device import test_device
from .fixtures.distributed import rank_results, run_two_processes
from .fixtures.jacobian import jacobian_rank
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


def _wide_toy():
    """The tiny toy with d_model 24: LayerNorm leaves D − 1 = 23 ≥ 2·d_head input and output
    dimensions, room for two independent heads."""
    return make_tiny_toy_transformer(d_model=24)


def test_shared_qk_pair_is_one_block_with_2d2_extra():
    """Two heads with one pattern and independent values: the paper's 2·d² (METHODS §3)."""
    model = _synchronize_layer0(_wide_toy())
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
    """W_V of head 1 of rank 3 (and b_V = 0): s_1 = 3, s_S = d + 3. METHODS §3 with
    D_in = D_out = E = D − 1 (LayerNorm) and full-rank W_O: J_apart = (E·d + E·d − d²) + (E·d + 3·E − 3·d),
    J_sync = E·2d + E·(d + 3) − 2d·(d + 3), so extra = d² + 3·d = 88 (the paper's s_S² − Σ s_h² = 6·d
    = 48 assumed full-rank value maps)."""
    model = _synchronize_layer0(_wide_toy())
    a = model.blocks[0].attn
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        a.W_V[1] = torch.randn(a.W_V.shape[1], 3, generator=g) @ torch.randn(3, a.W_V.shape[2], generator=g)
        a.b_V[1] = 0
    res = head_synchronization(model, _tokens(), tol=0.01)
    d, D = model.cfg.d_head, model.cfg.d_model
    pair = res.to_frame().iloc[0]
    assert pair["heads"] == (0, 1) and pair["input_rank"] == D - 1
    assert pair["s_heads"] == (d, 3) and pair["s_block"] == d + 3
    assert pair["extra_freedom"] == d * d + 3 * d == 88


def test_streaming_equals_one_batch():
    model = make_tiny_toy_transformer()
    tokens = _tokens(n=10)
    a = head_synchronization(model, tokens, tol=0.01, batch_size=3)
    b = head_synchronization(model, tokens, tol=0.01, batch_size=10)
    # On the CPU a batch split leaves the float32 forward bit-identical; GPU kernels chosen by batch
    # shape round the patterns differently, by a few float32 ulps.
    on_cpu = next(model.parameters()).device.type == "cpu"
    rtol = 1e-10 if on_cpu else 16 * torch.finfo(torch.float32).eps
    np.testing.assert_allclose(a.distance, b.distance, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(a.value_gram, b.value_gram, rtol=rtol, atol=1e-12)


def test_distance_matches_a_direct_computation():
    model = make_tiny_toy_transformer()
    tokens = _tokens(n=4)
    _, cache = model.run_with_cache(tokens)
    p = cache["blocks.1.attn.hook_pattern"].double()  # [b, H, q, k]
    direct = 0.5 * (p[:, 0] - p[:, 1]).abs().sum(-1).mean()
    res = head_synchronization(model, tokens, tol=0.0)
    np.testing.assert_allclose(res.distance[1, 0, 1], float(direct), rtol=1e-10)
    assert np.all(np.diagonal(res.distance, axis1=1, axis2=2) == 0)


class _LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor any torch operation returns while active."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


def _direct_tv_sums(pattern, mask):
    """Σ over counted rows of ½ Σ_k |p_h − p_h'|, from all rows at once (the unchunked computation)."""
    rows = pattern.transpose(1, 2)[mask].double()  # [n, H, K]
    return 0.5 * (rows[:, :, None] - rows[:, None]).abs().sum(-1).sum(0)


def test_chunked_pattern_distances_equal_unchunked():
    """Any chunk size, from one row to all rows, gives the same float64 sums up to the summation
    order's rounding (n·K terms of size ≤ 1: relative 1e-12 is ~10⁴ × eps)."""
    g = torch.Generator().manual_seed(0)
    pattern = torch.randn(3, 4, 9, 9, generator=g).softmax(-1)
    mask = torch.rand(3, 9, generator=g) > 0.3
    direct = _direct_tv_sums(pattern, mask)
    for chunk_bytes in (1, 4 * 9 * 12 * 5, None):
        torch.testing.assert_close(sync_module.pattern_tv_sums(pattern, mask, chunk_bytes), direct, rtol=1e-12, atol=0)
    model = make_tiny_toy_transformer()
    tokens = _tokens(n=6, pos=10)
    whole = head_synchronization(model, tokens, tol=0.01, batch_size=3)
    sync_module.PATTERN_CHUNK_BYTES, default = 1, sync_module.PATTERN_CHUNK_BYTES  # one row per chunk
    try:
        rowwise = head_synchronization(model, tokens, tol=0.01, batch_size=3)
    finally:
        sync_module.PATTERN_CHUNK_BYTES = default
    np.testing.assert_allclose(rowwise.distance, whole.distance, rtol=1e-12, atol=1e-15)
    assert rowwise.n_samples == whole.n_samples == 60


def test_pattern_memory_does_not_grow_with_positions(monkeypatch):
    """The largest tensor the distance accumulation allocates stays within one chunk's budget at
    16 and at 128 positions (the unchunked float64 rows [n, H, K] of 8 × 128 positions would be
    8·128·2·128·8 B = 2 MiB, 32 × the budget)."""
    budget = 1 << 16
    monkeypatch.setattr(sync_module, "PATTERN_CHUNK_BYTES", budget)
    inner, largest = sync_module.pattern_tv_sums, {}

    def recorded(pattern, mask, chunk_bytes=None, **kwargs):
        with _LargestTensor() as mode:
            out = inner(pattern, mask, chunk_bytes, **kwargs)
        largest[pattern.shape[-1]] = max(largest.get(pattern.shape[-1], 0), mode.bytes)
        return out

    monkeypatch.setattr(sync_module, "pattern_tv_sums", recorded)
    model = make_tiny_toy_transformer(n_ctx=128)
    for pos in (16, 128):
        head_synchronization(model, _tokens(n=8, pos=pos), tol=0.01, batch_size=8)
    assert set(largest) == {16, 128}
    assert max(largest.values()) <= budget, largest


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


def _relu_model_with_duplicate(c: float = 2.5, dtype: torch.dtype = torch.float32):
    """ReLU MLP; neuron 5 of layer 0 is 2.5 × neuron 3 (W_in column and b_in): same firing pattern."""
    model = make_tiny_toy_transformer(act_fn="relu").to(dtype)
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
    # METHODS §3 (corrected): f_5 = 2.5 f_3, so s = 1, and the block computes r·p_3·(w_3 + 2.5 w_5):
    # only that sum of output rows is pinned down, d_out = D − 1 (LayerNorm) extra directions. The
    # paper's s_a² − Σ 1 would say 1 − 2 = −1.
    assert row["s_block"] == 1 and row["count_exact"] and row["extra_freedom"] == 16 - 1 == res.extra_freedom
    assert res.blocks[1] == [[i] for i in range(32)] or all(len(b) == 1 for b in res.blocks[1])
    # for ReLU the firing distance is the fraction of samples on which two neurons disagree
    _, cache = model.run_with_cache(_tokens())
    fire = (cache["blocks.0.mlp.hook_pre"] > 0).double().flatten(0, 1)
    np.testing.assert_allclose(res.firing_distance[0, 0, 1], float((fire[:, 0] != fire[:, 1]).double().mean()),
                               rtol=1e-12)
    assert len(res.plot().data) == 2


def _eq20_distance(p: torch.Tensor, f: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    """Paper eq. 20's distance of every pair, directly from the samples [n, F]: the share of the pair's
    output energy that changes when each neuron fires with the other's pattern r = f/p."""
    p, f = p.double(), f.double()
    g = p if g is None else g.double()
    r = torch.where(p == 0, torch.ones_like(p), f / torch.where(p == 0, torch.ones_like(p), p))
    diff2 = (r[:, :, None] - r[:, None, :]) ** 2  # [n, i, j]
    g2 = g**2
    num = (g2[:, :, None] * diff2).sum(0) + (g2[:, None, :] * diff2).sum(0)
    energy = (f**2).sum(0)
    return num / (energy[:, None] + energy[None, :])


@pytest.mark.parametrize("act_fn", ["relu", "gelu"])
def test_neuron_distance_is_eq20(act_fn):
    """The streamed distance (batches of 5 sequences, two F×F products per batch) equals paper eq. 20's
    output-weighted distance computed pair by pair from all samples at once."""
    model, tokens = make_tiny_toy_transformer(act_fn=act_fn), _tokens()
    res = neuron_synchronization(model, tokens, tol=0.05, batch_size=5)
    _, cache = model.run_with_cache(tokens)
    for layer in range(2):
        p, f = (cache[f"blocks.{layer}.mlp.hook_{k}"].flatten(0, 1) for k in ("pre", "post"))
        direct = _eq20_distance(p, f).fill_diagonal_(0).cpu().numpy()
        np.testing.assert_allclose(res.output_distance[layer], direct, rtol=1e-9, atol=1e-13)
        np.testing.assert_array_equal(res.distance[layer], np.maximum(res.output_distance[layer],
                                                                      res.firing_distance[layer]))


def test_gated_neuron_distance_weighs_by_gate_times_linear(tl_models):
    """Gated MLP (f = act(p)·l): the output per unit of firing is p·l, so eq. 20 weighs by (p·l)²."""
    model, tokens = tl_models("llama", "bridge"), _tokens(n=4, pos=8, vocab=100)
    res = neuron_synchronization(model, tokens, tol=0.0)
    _, cache = model.run_with_cache(tokens)
    p, l, f = (cache[f"blocks.0.mlp.hook_{k}"].flatten(0, 1) for k in ("pre", "pre_linear", "post"))
    r = torch.sigmoid(p.double())  # SiLU: r = σ(p)
    g = p.double() * l.double()
    diff2 = (r[:, :, None] - r[:, None, :]) ** 2
    num = ((g**2)[:, :, None] * diff2).sum(0) + ((g**2)[:, None, :] * diff2).sum(0)
    energy = ((r * g) ** 2).sum(0)
    direct = (num / (energy[:, None] + energy[None, :])).fill_diagonal_(0).cpu().numpy()
    np.testing.assert_allclose(res.output_distance[0], direct, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose((r * g).cpu().numpy(), f.double().cpu().numpy(), rtol=1e-4, atol=1e-6)


def test_mostly_silent_gelu_neurons_that_fire_apart_are_not_synchronized():
    """Corrected criterion (paper eq. 20): two GELU neurons p_0 = 2z − 4, p_1 = −2z − 4 (z a
    standardised direction of the MLP input) are off on most samples and fire on opposite inputs.
    r = Φ(p) is nearly 0 for both on most samples, so the unweighted E[(r_0 − r_1)²] used before put
    them in one block at tol 0.05; what they output is unrelated (one fires where the other is
    silent), and the output-weighted distance says so."""
    model, tokens = make_tiny_toy_transformer(act_fn="gelu"), _tokens()
    mlp = model.blocks[0].mlp
    _, cache = model.run_with_cache(tokens)
    ln = model.blocks[0].ln2  # hook_normalized is x/σ, before the gain and bias
    x = (cache["blocks.0.ln2.hook_normalized"] * ln.w + ln.b).flatten(0, 1)
    with torch.no_grad():
        z = x @ mlp.W_in[:, 0]
        w, mean = mlp.W_in[:, 0] / z.std(), float(z.mean() / z.std())
        mlp.W_in[:, 0], mlp.W_in[:, 1] = 2 * w, -2 * w
        mlp.b_in[0], mlp.b_in[1] = -4 - 2 * mean, -4 + 2 * mean
    res = neuron_synchronization(model, tokens, tol=0.05)
    _, cache = model.run_with_cache(tokens)
    f, p = (cache[f"blocks.0.mlp.hook_{k}"].flatten(0, 1).double() for k in ("post", "pre"))
    assert float((p[:, :2] > 0).double().mean()) < 0.05  # mostly off
    assert res.firing_distance[0, 0, 1] <= 0.05  # the old criterion's block
    assert not any({0, 1} <= set(b) for b in res.blocks[0])
    assert res.output_distance[0, 0, 1] > 1.0  # more than their whole output energy would change
    # ground truth: where one fires (f above a tenth of its largest), the other is silent
    fires = f[:, :2] > 0.1 * f[:, :2].max(0).values
    assert fires.any(0).all() and not (fires[:, 0] & fires[:, 1]).any()


def test_relu_disagreements_where_outputs_are_small_stay_in_a_block():
    """ReLU neurons 3 and 5 = neuron 3 with its bias lowered a little disagree about firing only
    where p_3 is below the shift, so their outputs differ there by at most the shift: on few samples
    and by little, they stay in one (approximate) block, and the label gives both the share of
    samples and the change."""
    model = _relu_model_with_duplicate(c=1.0)
    mlp = model.blocks[0].mlp
    _, cache = model.run_with_cache(_tokens())
    p3 = cache["blocks.0.mlp.hook_pre"][..., 3].flatten()
    shift = float(p3[p3 > 0].quantile(0.05))  # a twentieth of neuron 3's firing samples change side
    with torch.no_grad():
        mlp.b_in[5] -= shift
    res = neuron_synchronization(model, _tokens(), tol=0.05)
    block = next(b for b in res.blocks[0] if 3 in b)
    assert 5 in block and res.firing_distance[0, 3, 5] > 0 and res.approximate
    frame = res.to_frame().set_index("neurons")
    assert frame.loc[[tuple(block)], "approximate"].item()
    n_dis = round(res._block_max(res.firing_distance) * res.n_samples)
    assert f"differ on up to {n_dis / res.n_samples:.2%} of samples" in res.approximation
    assert f"by up to {np.sqrt(res._block_max(res.output_distance)):.2g} RMS (relative)" in res.approximation


def test_relu_blocks_need_few_disagreements_as_well():
    """(3.6a) alone admits ReLU neurons that disagree about firing on most samples where their outputs
    are small (toy:modadd at tol 0.05: up to 59 % of the samples); the blocks also require the firing
    distance, the share of disagreeing samples, within tol. And neurons that never output anything
    ((3.6a) = 0/0, set to 0) but fire differently (a dead neuron, r = 0, against one with zero input
    weights, r = 1 where p = 0) are not a block at tol 0."""
    model = _relu_model_with_duplicate()
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        mlp.W_in[:, 9], mlp.b_in[9] = 0.0, -5.0  # dead: p < 0 everywhere, r = 0
        mlp.W_in[:, 10], mlp.b_in[10] = 0.0, 0.0  # p = 0 everywhere, r = 1 by (3.6)
    tokens = _tokens()
    res = neuron_synchronization(model, tokens, tol=0.0)
    assert res.output_distance[0, 9, 10] == 0 and res.firing_distance[0, 9, 10] == 1.0
    assert not any({9, 10} <= set(b) for b in res.blocks[0]) and res.distance[0, 9, 10] == 1.0
    loose = neuron_synchronization(model, tokens, tol=0.3)
    for layer, blocks in enumerate(loose.blocks):
        for b in blocks:
            sub = np.ix_(b, b)
            assert loose.firing_distance[layer][sub].max() <= 0.3 and loose.output_distance[layer][sub].max() <= 0.3


def test_duplicated_neuron_in_float64_has_one_direction():
    """Audit 5: in a float64 model, neuron 5 = 1.3 × neuron 3 leaves the block's 2 × 2 post-activation
    Gram an eigenvalue ratio of about 1e-15 (rounding of 1.3·W_in), above the 2 × 2 block's own float64
    floor 2·eps: s read 2 and the extra freedom 2 (count_exact True). A block keeps the floor of the
    layer's whole Gram (32 neurons: 32·eps), so s = 1 and the count is d_out, as for c = 2.5."""
    res = neuron_synchronization(_relu_model_with_duplicate(1.3, torch.float64), _tokens(), tol=0.0)
    gram = res.value_gram[0][[3, 5]][:, [3, 5]]
    ratio = float(torch.linalg.eigvalsh(gram)[0] / torch.linalg.eigvalsh(gram)[1])
    assert 2 * torch.finfo(torch.float64).eps < ratio < 32 * torch.finfo(torch.float64).eps  # the case audited
    row = res.to_frame().set_index("neurons").loc[[(3, 5)]].iloc[0]
    assert row["s_block"] == 1 and row["count_exact"] and row["extra_freedom"] == 16 - 1


def _mlp_input(model, tokens, layer: int = 0) -> torch.Tensor:
    """A layer's MLP input x̃ = [x, 1] at every position, float64 (x = n·w + b from the hooked n)."""
    import tl_degeneracy as tld
    from tl_degeneracy.counts import block_input_affine, block_input_hook

    adapter = tld.adapt(model)
    name = block_input_hook(adapter, layer, "ln2")
    w, b = block_input_affine(adapter, layer, "ln2")
    _, cache = model.run_with_cache(tokens, names_filter=name)
    x = cache[name].flatten(0, 1).double()
    x = x * (1 if w is None else w.double()) + (0 if b is None else b.double())
    return torch.cat([x, torch.ones_like(x[:, :1])], 1)


def _neuron_block_jacobians(model, tokens, layer: int, neurons: list[int], act=torch.relu) -> tuple[int, int]:
    """Brute force (METHODS §3): ranks of the Jacobians of a block's output from its W̃_in columns
    and W_out rows, with the neurons' outputs apart (one output each) and summed, on every position,
    P-projected (LayerNorm never reads the mean direction)."""
    X = _mlp_input(model, tokens, layer)
    mlp = model.blocks[layer].mlp
    Wt = torch.cat([mlp.W_in.detach(), mlp.b_in.detach()[None]]).double()[:, neurons]
    B = mlp.W_out.detach().double()[neurons]
    P = torch.eye(B.shape[1], dtype=torch.float64) - 1 / B.shape[1]
    synced = jacobian_rank(lambda t: act(X @ t[0]) @ t[1] @ P, [Wt, B])
    apart = jacobian_rank(lambda t: act(X @ t[0]).T[:, :, None] * (t[1] @ P)[:, None, :], [Wt, B])
    return apart, synced


def test_neuron_block_freedom_is_the_jacobian_rank_drop():
    """A block of three ReLU neurons firing alike, neuron 5 = 2.5 × neuron 3 and neuron 7 = neuron 3
    plus a small independent direction that changes no sign on the data, and two neurons that never
    fire: extra_freedom equals the brute-force drop of the Jacobian rank, d_out·(m − s) + s·m − m =
    15 + 6 − 3 = 18 for the first block, 0 for the dead pair (the paper's s_a² − Σ 1 gives 4 − 3 = 1 and
    s_a² − 0 = 4 from the never-firing pre-activations)."""
    # float64: the ground truth's ranks (float64 SVD) then see LayerNorm's lost direction as zero
    model, tokens = _relu_model_with_duplicate(dtype=torch.float64), _tokens()
    mlp = model.blocks[0].mlp
    X = _mlp_input(model, tokens)
    g = torch.Generator().manual_seed(11)
    v = torch.randn(X.shape[1], generator=g, dtype=torch.float64).to(X.device)
    with torch.no_grad():
        p3 = X @ torch.cat([mlp.W_in[:, 3], mlp.b_in[3:4]]).double()
        eps = 0.5 * float(p3.abs().min() / (X @ v).abs().max())  # keeps sign(p_7) = sign(p_3) on every sample
        mlp.W_in[:, 7] = mlp.W_in[:, 3] + eps * v[:-1].to(mlp.W_in)
        mlp.b_in[7] = mlp.b_in[3] + eps * v[-1].to(mlp.b_in)
        mlp.b_in[[10, 11]] = -100.0
    res = neuron_synchronization(model, tokens, tol=0.0)
    frame = res.to_frame().set_index("neurons")
    assert {(3, 5, 7), (10, 11)} <= set(frame.index) and frame["count_exact"].all()
    for block, layer in frame["layer"].items():  # the random toy has a block of its own in layer 1
        apart, synced = _neuron_block_jacobians(model, tokens, layer, list(block))
        assert frame.loc[[block], "extra_freedom"].item() == apart - synced, block
    assert frame.loc[[(3, 5, 7)], "extra_freedom"].item() == 18 and frame.loc[[(10, 11)], "extra_freedom"].item() == 0
    assert frame.loc[[(3, 5, 7)], "s_block"].item() == 2 and frame.loc[[(10, 11)], "s_block"].item() == 0


@pytest.mark.parametrize("silence", ["dead", "pruned"])
def test_silent_neurons_with_dependent_output_rows_add_no_freedom(silence):
    """Review 33: neurons that are 0 on every sample move nothing, whatever their W_out rows; with
    W_out[11] = 3·W_out[10] the per-neuron scaling had left those rows in the count, which read 16
    (count_exact True for the pruned pair, W_in = b_in = 0) where the Jacobian's rank drops by 0."""
    model, tokens = _relu_model_with_duplicate(dtype=torch.float64), _tokens()
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        if silence == "dead":
            mlp.b_in[[10, 11]] = -100.0
        else:
            mlp.W_in[:, [10, 11]] = 0.0
            mlp.b_in[[10, 11]] = 0.0
        mlp.W_out[11] = 3 * mlp.W_out[10]
    frame = neuron_synchronization(model, tokens, tol=0.0).to_frame().set_index("neurons")
    apart, synced = _neuron_block_jacobians(model, tokens, 0, [10, 11])
    assert apart - synced == 0 and frame.loc[[(10, 11)], "extra_freedom"].item() == 0


def test_gated_neuron_blocks_have_no_count(tl_models):
    """A gated MLP's block computes r·Σ_k w_k g_k l_k, quadratic in the input: no bilinear count, so
    the frame leaves extra_freedom empty, count_exact False, and says so once."""
    res = neuron_synchronization(tl_models("llama", "bridge"), _tokens(n=4, pos=8, vocab=100), tol=1.0)
    with pytest.warns(sync_module.SyncCountWarning, match="gated MLP"):
        frame = res.to_frame()
    assert len(frame) and not frame["count_exact"].any() and frame["extra_freedom"].isna().all()
    assert res.extra_freedom is None and not res.count_exact and res.to_dict()["count_exact"] is False


def test_gelu_is_labelled_approximate(tiny_toy_transformer):
    """Blocks of GELU neurons that are not copies are approximate; a neuron alone is its own copy."""
    res = neuron_synchronization(tiny_toy_transformer, _tokens(), tol=0.01)
    frame = res.to_frame(singletons=True)
    assert res.approximate and (frame["approximate"] == (frame["size"] > 1)).all() and (frame["size"] > 1).any()
    assert np.all(res.distance >= 0) and np.all(res.firing_distance >= 0) and np.all(res.firing_distance <= 1)


def test_gated_mlp_bridge(tl_models):
    res = neuron_synchronization(tl_models("llama", "bridge"), _tokens(n=4, pos=8, vocab=100), tol=0.0)
    frame = res.to_frame(singletons=True)  # a neuron alone is its own copy: no approximation
    assert res.distance.shape == (2, 64, 64) and (frame["approximate"] == (frame["size"] > 1)).all()


def test_neuron_bad_input(tiny_toy_transformer):
    with pytest.raises(ValueError, match=r"tol must lie in \[0, 1\]"):
        neuron_synchronization(tiny_toy_transformer, _tokens(), tol=2)
    with pytest.raises(DataError):
        neuron_synchronization(tiny_toy_transformer, [], tol=0.1)


def test_sma_toy_one_sample_per_sequence():
    """SMA: one learned query per sequence, so one sample per sequence; its GELU neurons stay apart at
    tol 0, and a neuron alone is no approximation."""
    import tl_degeneracy as tld

    sma, data = tld.load_model("toy:sma", device=test_device()), tld.toy_data("sma", 32)
    heads = head_synchronization(sma, data, tol=0.05)
    assert heads.n_samples == 32 and heads.distance.shape == (1, 1, 1) and heads.blocks == [[[0]]]
    assert heads.to_dict()["blocks"][0]["s_block"] == heads.head_rank[0, 0] > 0
    neurons = neuron_synchronization(sma, data, tol=0.0)
    frame = neurons.to_frame(singletons=True)
    assert neurons.n_samples == 32 and frame["size"].eq(1).all() and not frame["approximate"].any()


# ---------------------------------------------------------------------------------------------- J_apart − J_sync
from tl_degeneracy.synchronization import component_freedom  # noqa: E402

# Small block sizes: n samples of a D-dimensional input of rank D_IN < D (so D_in ≠ D is exercised),
# heads of width d writing into D_OUT dimensions.
N, D, D_IN, d, D_OUT = 14, 8, 6, 2, 5
#: P = I − 11ᵀ/D_OUT: what a LayerNorm reads of the heads' output (its mean direction never).
MEAN_FREE = torch.eye(D_OUT, dtype=torch.float64) - 1 / D_OUT


def _block(case: str, g: torch.Generator):
    """Input X [N, D] of rank D_IN, value weights W_V per value group and (group, W_O) per head."""
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    X = rand(N, D_IN) @ rand(D_IN, D)
    V1, V2, O1, O2, O3 = rand(D, d), rand(D, d), rand(d, D_OUT), rand(d, D_OUT), rand(d, D_OUT)
    overlap = torch.cat([V1[:, :1], rand(D, d - 1)], 1)  # shares one value direction with V1
    if case == "independent":
        return X, [V1, V2], [(0, O1), (1, O2)]
    if case == "exact copy":  # a second head with its own, identical, weights
        return X, [V1, V1.clone()], [(0, O1), (1, O1.clone())]
    if case == "gqa pair":  # two query heads reading one value head
        return X, [V1], [(0, O1), (0, O2)]
    if case == "partial overlap":
        return X, [V1, overlap], [(0, O1), (1, O2)]
    if case == "rank-deficient value":
        return X, [V1, rand(D, 1) @ rand(1, d)], [(0, O1), (1, O2)]
    if case == "block of 3":  # a GQA pair and a third head whose values overlap theirs
        return X, [V1, overlap], [(0, O1), (0, O2), (1, O3)]
    if case == "mean-free outputs":  # W_O P, as under LayerNorm: D_out = D − 1
        return X, [V1, V1.clone()], [(0, O1 @ MEAN_FREE), (1, O1 @ MEAN_FREE)]
    raise ValueError(case)


def _ranks_and_jacobians(X, W_V, heads):
    """(our count, J_apart, J_sync): the count from ranks alone, the J's by torch.func. Heads whose
    W_O is mean-free are read through P (the function sees only D_out = D_OUT − 1 directions)."""
    G = len(W_V)
    mean_free = torch.allclose(heads[0][1].sum(-1), torch.zeros((), dtype=X.dtype))
    readout, d_out = (MEAN_FREE, D_OUT - 1) if mean_free else (torch.eye(D_OUT, dtype=X.dtype), D_OUT)

    def outputs(params):
        V, O = params[:G], params[G:]
        return [X @ V[g] @ O[i] @ readout for i, (g, _) in enumerate(heads)]

    params = [*W_V, *(O for _, O in heads)]
    j_apart = jacobian_rank(lambda p: torch.stack(outputs(p)), params)
    j_sync = jacobian_rank(lambda p: torch.stack(outputs(p)).sum(0), params)
    values = torch.cat([X @ V for V in W_V], 1)  # every value head's vectors on the data, side by side
    count = component_freedom(values.T @ values, [g for g, _ in heads], torch.stack([O for _, O in heads]),
                              [list(range(len(heads)))], int(torch.linalg.matrix_rank(X)), d_out)
    return count, j_apart, j_sync


@pytest.mark.parametrize("case", ["independent", "exact copy", "gqa pair", "partial overlap",
                                  "rank-deficient value", "block of 3", "mean-free outputs"])
def test_count_equals_thejacobian_rank(case):
    """METHODS §3's J_apart and J_sync are the ranks of the Jacobians of the heads' separate outputs
    and of their sum with respect to (W_V^g, W_O^h), computed here directly with torch.func."""
    X, W_V, heads = _block(case, torch.Generator().manual_seed(0))
    count, j_apart, j_sync = _ranks_and_jacobians(X, W_V, heads)
    assert (count.j_apart, count.j_sync) == (j_apart, j_sync)
    assert count.extra_freedom >= 0


@pytest.mark.parametrize("case", ["independent", "exact copy", "gqa pair", "partial overlap",
                                  "rank-deficient value", "block of 3", "mean-free outputs"])
def test_count_does_not_depend_on_the_value_heads_gauges(case):
    """Each value head g gauged by A_g = 10^(−5g)·(orthogonal · diag(1 … 10⁻²) · orthogonal), its
    readers' W_O by A_g⁻¹ (float64): the same function, so the same J_apart and J_sync as
    :func:`test_count_equals_thejacobian_rank`'s. Before each value head was put at unit scale
    (``balanced_values``) the second one's directions fell under the cut-off relative to the first's."""
    g = torch.Generator().manual_seed(0)
    X, W_V, heads = _block(case, g)
    count = _ranks_and_jacobians(X, W_V, heads)[0]
    gauges = [10.0 ** (-5 * k) * torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
              @ torch.diag(torch.logspace(0, -2, d, dtype=torch.float64))
              @ torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0] for k in range(len(W_V))]
    values = torch.cat([X @ V @ A for V, A in zip(W_V, gauges)], 1)
    W_O = torch.stack([torch.linalg.solve(gauges[k], O) for k, O in heads])
    gauged = component_freedom(values.T @ values, [k for k, _ in heads], W_O, [list(range(len(heads)))],
                               int(torch.linalg.matrix_rank(X)), D_OUT - 1 if case == "mean-free outputs" else D_OUT)
    assert (gauged.j_apart, gauged.j_sync) == (count.j_apart, count.j_sync)


def test_count_closed_forms():
    """The cases METHODS §3 names: independent pair 2·d² (the paper's s_S² − Σ s_h²), exact copy
    d·(D_in + D_out − d) (the old count said −d²), GQA pair d·D_out (the old count said 0), and partly
    overlapping values in between the independent pair and the copy."""
    g = torch.Generator().manual_seed(1)
    extra = {case: _ranks_and_jacobians(*_block(case, g))[0].extra_freedom
             for case in ("independent", "exact copy", "gqa pair", "partial overlap")}
    assert extra["independent"] == 2 * d * d
    assert extra["exact copy"] == d * (D_IN + D_OUT - d)
    assert extra["gqa pair"] == d * D_OUT
    assert 2 * d * d < extra["partial overlap"] < d * (D_IN + D_OUT - d)


def _copy_head(model, layer: int, src: int, dst: int, names=("W_Q", "W_K", "b_Q", "b_K", "W_V", "b_V", "W_O")):
    a = model.blocks[layer].attn
    with torch.no_grad():
        for name in names:
            getattr(a, name)[dst] = getattr(a, name)[src]
    return model


@pytest.mark.parametrize("normalization, input_hook", [("LN", "blocks.0.ln1.hook_normalized"),
                                                       (None, "blocks.0.hook_resid_pre")])
def test_exact_copy_end_to_end(normalization, input_hook):
    """Head 1 of layer 0 becomes an exact copy of head 0: one block, extra = d·(D_in + D − d) with
    D_in the rank of the centred heads' input on the data, computed here from the cache (the
    LayerNorm output, or the residual stream of a model without norms), and D_out = D − 1 under
    LayerNorm (its mean direction is never read), D without norms."""
    model = _copy_head(make_tiny_toy_transformer(normalization=normalization), 0, 0, 1)
    tokens = _tokens()
    res = head_synchronization(model, tokens, tol=1e-6)
    _, cache = model.run_with_cache(tokens)
    x = cache[input_hook].flatten(0, 1).double()
    sv = torch.linalg.svdvals(x - x.mean(0))
    # float32 activations: rounding noise ~1e-7·σ_1, true directions O(σ_1); 1e-4 lies in the gap
    d_in = int((sv > 1e-4 * sv[0]).sum())
    d_, D_ = model.cfg.d_head, model.cfg.d_model
    d_out = D_ - 1 if normalization == "LN" else D_
    assert d_in == d_out  # generic data: D − 1 directions after LayerNorm, D without
    assert res.blocks[0] == [[0, 1]] and res.input_rank[0] == d_in and res.d_out == d_out
    pair = res.to_frame().iloc[0]
    assert pair["s_heads"] == (d_, d_) and pair["s_block"] == d_
    assert pair["extra_freedom"] == d_ * (d_in + d_out - d_) == res.block_freedom(0, [0, 1]).extra_freedom
    assert pair["free_block"] - pair["free_separate"] == pair["extra_freedom"]
    assert res.extra_freedom == pair["extra_freedom"]  # every other block is a singleton


@pytest.mark.parametrize("o_bias", [False, True])
def test_exact_copy_without_b_O_reads_uncentred_ranks(tmp_path, o_bias):
    """Audit 16a F1: a head copy on a Llama (RMSNorm, MHA) with few distinct inputs. Without b_O
    nothing absorbs the constant the mean input reaches the output as, so D_in is the uncentred
    input's rank (10 for 10 distinct tokens) and extra = d·(D_in + D − d) = 272; with an o_proj
    bias the centred rank (9) and 264. The centred count read 264 for both."""
    import transformers as tf

    from .fixtures.hf import boot_bridge, tiny_tokenizer

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=64, max_position_embeddings=64, hidden_act="silu", attention_bias=o_bias,
                         mlp_bias=False, tie_word_embeddings=False, vocab_size=100, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    hf = tf.LlamaForCausalLM(cfg).double().eval()
    d = 8
    with torch.no_grad():
        attn = hf.model.layers[0].self_attn
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight[d : 2 * d] = lin.weight[:d]
            if lin.bias is not None:
                lin.bias[d : 2 * d] = lin.bias[:d]
        attn.o_proj.weight[:, d : 2 * d] = attn.o_proj.weight[:, :d]
    hf.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model = tld.load_model(tmp_path, device="cpu", dtype=torch.float64)
    tokens = torch.randint(3, 13, (16, 8), generator=torch.Generator().manual_seed(1))
    res = head_synchronization(model, tokens, tol=0.0, batch_size=16)
    # TransformerLens 3.x loads a HookedTransformer, which adds a zero b_O that absorbs the constant:
    # the centred count there (methods §3); a bridge has b_O only where the checkpoint has
    centred = tld.adapt(model).map_biases(0)["W_O"]
    assert centred == o_bias or type(model).__name__ == "HookedTransformer"
    d_in = 9 if centred else 10
    pair = res.to_frame().iloc[0]
    assert pair["heads"] == (0, 1) and res.input_rank[0] == d_in and res.d_out == 32
    assert pair["extra_freedom"] == d * (d_in + 32 - d) and pair["count_exact"]


def test_gqa_pair_end_to_end(tmp_path):
    """Llama bridge (2 KV heads for 4 query heads): query heads 0 and 1 read KV head 0; giving head 1
    head 0's W_Q makes their patterns identical, and synchronization adds d·D (the old count said 0)."""
    from .fixtures.hf import boot_bridge, make_hf_model, tiny_tokenizer

    hf = make_hf_model("llama")
    q = hf.model.layers[0].self_attn.q_proj.weight
    dh = hf.config.hidden_size // hf.config.num_attention_heads
    with torch.no_grad():
        q[dh : 2 * dh] = q[:dh]
    directory = tmp_path / "tiny_gqa_synced"
    hf.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    res = head_synchronization(boot_bridge(directory), _tokens(n=8, pos=8, vocab=100), tol=1e-6)
    assert res.blocks[0][0] == [0, 1] and res.distance[0, 0, 1] < 1e-6
    pair = res.to_frame().iloc[0]
    assert pair["s_heads"] == (dh, dh) and pair["s_block"] == dh
    assert res.d_out == hf.config.hidden_size  # RMSNorm reads every direction
    assert pair["extra_freedom"] == dh * hf.config.hidden_size


def test_backends_agree(tl_models):
    """The same GPT-2 checkpoint through every available backend (HookedTransformer's hook_normalized
    precedes the norm's gain and bias; the bridge's ln1.hook_out is the input) gives the same ranks."""
    from .fixtures.hf import BACKENDS, has_hooked_transformer

    tokens = _tokens(n=4, pos=8, vocab=100)
    frames = {b: head_synchronization(tl_models("gpt2", b), tokens, tol=1.0).to_frame()
              for b in BACKENDS if b != "hooked_transformer" or has_hooked_transformer()}
    first = next(iter(frames.values()))
    assert (first["input_rank"] > 0).all()
    for frame in frames.values():
        cols = ["heads", "s_block", "input_rank", "j_apart", "j_sync", "extra_freedom"]
        assert frame[cols].equals(first[cols])



def test_two_processes_equal_one(tmp_path):
    """Under torch.distributed (2 gloo processes) both ranks get the single-process result, also
    when one rank has no batch of its own (``stats.stream`` reduces what ``on_batch`` accumulated)."""
    from .sync_distributed_worker import compute

    run_two_processes("sync_distributed_worker.py", tmp_path)
    single = compute()
    for multi in rank_results(tmp_path):
        assert sorted(multi) == sorted(single)
        for key, b in single.items():
            a = multi[key]
            if a.is_floating_point():  # sums in another order: float64 rounding only
                torch.testing.assert_close(a.double(), b.double(), rtol=1e-10, atol=1e-12, msg=key)
            else:
                assert torch.equal(a, b), key
    assert int(single["one/n_samples"]) == 30 and int(single["three/extra"]) > 0


# ------------------------------------------------------------------------------ blocks that split a KV head
import warnings  # noqa: E402

from tl_degeneracy.synchronization import (  # noqa: E402
    HeadSyncResult,
    NeuronSyncResult,
    SyncCountWarning,
    component_freedom,
)

#: The audit's layer (docs: /work/notes/audit_methods.md, finding 1): 4 query heads, heads 0, 1 read KV
#: head 0 and heads 2, 3 read KV head 1.
GQA_KV = [0, 0, 1, 1]


def _gqa_layer(g: torch.Generator, kv_of_head, n_kv: int, rank_one=(), zero=(), copies=()):
    """Input X [N, D] of rank D_IN, one W_V per KV head, one W_O per head; heads in ``rank_one`` get
    a W_O of rank 1, heads in ``zero`` W_O = 0, and (src, dst) in ``copies`` W_O^dst = W_O^src."""
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    X = rand(N, D_IN) @ rand(D_IN, D)
    W_V = [rand(D, d) for _ in range(n_kv)]
    W_O = [rand(d, 1) @ rand(1, D_OUT) if h in rank_one else rand(d, D_OUT) for h in range(len(kv_of_head))]
    for h in zero:
        W_O[h] = torch.zeros(d, D_OUT, dtype=torch.float64)
    for src, dst in copies:
        W_O[dst] = W_O[src].clone()
    return X, W_V, W_O


def _layerjacobian_rank(X, W_V, W_O, kv_of_head, blocks) -> int:
    """Rank of the Jacobian of the whole layer, (W_V^g, W_O^h) ↦ (Σ_{h∈b} X W_V^{g(h)} W_O^h)_b, by torch.func."""
    G = len(W_V)

    def outputs(params):
        V, O = params[:G], params[G:]
        return torch.stack([sum(X @ V[kv_of_head[h]] @ O[h] for h in block) for block in blocks])

    return jacobian_rank(outputs, [*W_V, *W_O])


def _counted_and_true(X, W_V, W_O, kv_of_head, blocks):
    """(component_freedom's count, (true J_apart, true J_sync)) for one layer given as weights."""
    A = torch.cat([X @ V for V in W_V], 1)
    count = component_freedom(A.T @ A, kv_of_head, torch.stack(W_O), blocks, int(torch.linalg.matrix_rank(X)), D_OUT)
    apart = _layerjacobian_rank(X, W_V, W_O, kv_of_head, [[h] for h in range(len(kv_of_head))])
    return count, (apart, _layerjacobian_rank(X, W_V, W_O, kv_of_head, blocks))


@pytest.mark.parametrize("blocks, extra", [([[0, 2], [1], [3]], 0), ([[0, 2], [1, 3]], 8),
                                           ([[0, 1, 2], [3]], 14), ([[0, 1], [2], [3]], 10)])
def test_blocks_that_split_kv_heads_equal_thejacobian_rank(blocks, extra):
    """A KV head's W_V is shared with its query heads outside the block, so the count is the drop of
    the whole layer's Jacobian rank (METHODS (3.5a)–(3.5c)): the audit's four partitions, whose
    per-block count said 8, 16, 18 and 10."""
    count, true = _counted_and_true(*_gqa_layer(torch.Generator().manual_seed(0), GQA_KV, 2), GQA_KV, blocks)
    assert (count.j_apart, count.j_sync) == true
    assert count.exact and count.extra_freedom == extra


@pytest.mark.parametrize("weights", [dict(rank_one=(1,)), dict(rank_one=(0, 2)), dict(zero=(3,)),
                                     dict(copies=((0, 2),)), dict(rank_one=(1, 3), copies=((0, 2),))])
@pytest.mark.parametrize("blocks", [[[0, 2], [1], [3]], [[0, 2], [1, 3]], [[0, 1, 2], [3]], [[0, 3], [1, 2]]])
def test_rank_deficient_output_weights(blocks, weights):
    """W_O of rank 1, zero, or one head's W_O copied into a head of the other KV head (a summed output
    map of rank d < 2·d): the count still equals the Jacobian rank."""
    count, true = _counted_and_true(*_gqa_layer(torch.Generator().manual_seed(1), GQA_KV, 2, **weights), GQA_KV, blocks)
    assert (count.j_apart, count.j_sync) == true


#: Three KV heads of two query heads each: blocks {0, 2} and {1, 4} read the pairs {0, 1} and {0, 2}
#: of KV heads, whose spans are not all the values', so their constraints on Y are real.
THREE_KV = [0, 0, 1, 1, 2, 2]
THREE_KV_BLOCKS = [[0, 2], [1, 4], [3], [5]]


def test_dense_y_path(monkeypatch):
    """W_O^2 = W_O^0 makes block {0, 2}'s summed output map rank-deficient (d of 2·d): METHODS (3.5b)'s
    closed form does not apply and Y is the dense rank, which equals the Jacobian's. With no room for
    the dense rank (DENSE_Y_LIMIT = 0) the count says it is not exact instead of guessing."""
    layer = _gqa_layer(torch.Generator().manual_seed(2), THREE_KV, 3, copies=((0, 2),))
    count, true = _counted_and_true(*layer, THREE_KV, THREE_KV_BLOCKS)
    assert (count.j_apart, count.j_sync) == true and count.exact
    monkeypatch.setattr(sync_module, "DENSE_Y_LIMIT", 0)
    count, _ = _counted_and_true(*layer, THREE_KV, THREE_KV_BLOCKS)
    assert count.j_apart == true[0] and not count.exact and count.j_sync is None and count.extra_freedom is None
    full_rank, _ = _counted_and_true(*_gqa_layer(torch.Generator().manual_seed(2), THREE_KV, 3), THREE_KV,
                                     THREE_KV_BLOCKS)
    assert full_rank.exact  # full-rank summed maps: the closed form needs no dense rank


@pytest.mark.parametrize("case", ["independent", "exact copy", "gqa pair", "partial overlap",
                                  "rank-deficient value", "block of 3", "mean-free outputs"])
def test_one_block_of_whole_kv_heads_keeps_the_block_count(case):
    """A single block that reads whole KV heads: the component count is (3.3)–(3.4)'s."""
    X, W_V, heads = _block(case, torch.Generator().manual_seed(0))
    old, _, _ = _ranks_and_jacobians(X, W_V, heads)
    A = torch.cat([X @ V for V in W_V], 1)
    d_out = D_OUT - 1 if case == "mean-free outputs" else D_OUT
    new = component_freedom(A.T @ A, [g for g, _ in heads], torch.stack([O for _, O in heads]),
                            [list(range(len(heads)))], int(torch.linalg.matrix_rank(X)), d_out)
    assert (new.j_apart, new.j_sync) == (old.j_apart, old.j_sync)


def test_smollm2_shaped_gqa_pair():
    """README: SmolLM2 layer 18, heads 7 and 8 of the KV group {6, 7, 8} synchronized (d = 64, D = 576,
    RMSNorm so D_out = D): d·D_out = 36,864 extra free directions."""
    g = torch.Generator().manual_seed(3)
    root = torch.randn(64, 64, generator=g, dtype=torch.float64)
    W_O = torch.randn(3, 64, 576, generator=g, dtype=torch.float64)
    count = component_freedom(root @ root.T, [0, 0, 0], W_O, [[0], [1, 2]], 576)
    assert count.extra_freedom == 64 * 576 == 36_864


def test_component_freedom_bad_input():
    W_O = torch.zeros(2, d, D_OUT, dtype=torch.float64)
    gram = torch.eye(2 * d, dtype=torch.float64)
    with pytest.raises(ValueError, match="not a partition"):
        component_freedom(gram, [0, 1], W_O, [[0]], D_IN)
    with pytest.raises(ValueError, match=r"\[G·d, G·d\] value Gram"):
        component_freedom(gram, [0, 2], W_O, [[0], [1]], D_IN)
    with pytest.raises(ValueError, match="d_out must lie in"):
        component_freedom(gram, [0, 1], W_O, [[0, 1]], D_IN, d_out=D_OUT + 1)


def _result_from_weights(X, W_V, W_O, kv_of_head, blocks, distance=None) -> HeadSyncResult:
    """A one-layer HeadSyncResult from weights (what head_synchronization would have measured)."""
    A = torch.cat([X @ V for V in W_V], 1)
    A = A - A.mean(0)
    H, n_kv = len(kv_of_head), len(W_V)
    x = X - X.mean(0)
    rank = lambda m: int(torch.linalg.matrix_rank(m))  # noqa: E731
    return HeadSyncResult(
        distance=np.zeros((1, H, H)) if distance is None else distance[None], tol=0.0, blocks=[blocks],
        value_gram=(A.T @ A / N)[None], head_rank=np.array([[rank(A[:, g * d:(g + 1) * d]) for g in kv_of_head]]),
        n_samples=N, n_kv_heads=n_kv, d_head=d, rank_rtol=None, value_cov=(A.T @ A / N)[None],
        input_rank=np.array([rank(x)]), W_O=torch.stack(W_O)[None], d_out=D_OUT, precision=torch.float64,
    )


def test_frame_gives_each_component_its_count_once():
    """Blocks {0, 2}, {1}, {3} and a third KV head whose heads 4, 5 stay apart: two components. The
    counts stand on the component's first multi-head block's row (else its first row), 0 on its others,
    so the frame sums to the layer's Jacobian ranks; the component column names the heads."""
    X, W_V, W_O = _gqa_layer(torch.Generator().manual_seed(0), THREE_KV, 3)
    blocks = [[0, 2], [1], [3], [4], [5]]
    res = _result_from_weights(X, W_V, W_O, THREE_KV, blocks)
    frame = res.to_frame()
    apart = _layerjacobian_rank(X, W_V, W_O, THREE_KV, [[h] for h in range(6)])
    sync = _layerjacobian_rank(X, W_V, W_O, THREE_KV, blocks)
    assert frame["component"].tolist() == [(0, 1, 2, 3)] * 3 + [(4, 5)] * 2
    assert [bool(j > 0) for j in frame["j_apart"]] == [True, False, False, True, False]
    # jacfwd counts W_V in all D input directions, the frame those the data reach (D_in): same ranks
    assert (int(frame["j_apart"].sum()), int(frame["j_sync"].sum())) == (apart, sync)
    assert res.extra_freedom == apart - sync == 0 and res.count_exact and bool(frame["count_exact"].all())
    assert (frame["free_block"] - frame["free_separate"]).tolist() == frame["extra_freedom"].tolist()
    assert int(frame["n_params"].sum()) == 3 * D_OUT * d + 6 * d * D_OUT  # each KV head's W_V once
    assert res.block_freedom(0, [0, 1]).extra_freedom == 10  # a whole-KV-head block, the rest apart


def test_not_exact_component_is_marked(monkeypatch):
    """A component whose count cannot be computed exactly gets <NA> counts, count_exact False, a
    SyncCountWarning naming the layer and heads, and no total."""
    monkeypatch.setattr(sync_module, "DENSE_Y_LIMIT", 0)
    res = _result_from_weights(*_gqa_layer(torch.Generator().manual_seed(2), THREE_KV, 3, copies=((0, 2),)),
                               THREE_KV, THREE_KV_BLOCKS)
    with pytest.warns(SyncCountWarning, match=r"layer 0, heads \[0, 1, 2, 3, 4, 5\]"):
        frame = res.to_frame()
    assert not frame["count_exact"].any() and frame["extra_freedom"].isna().iloc[0]
    assert frame["j_apart"].iloc[0] > 0  # the heads apart are always exact
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyncCountWarning)
        assert res.extra_freedom is None and not res.count_exact


def test_head_blocks_with_differing_patterns_are_approximate():
    """tol = 1 puts two heads with different patterns into one block: its freedom holds only where
    the patterns agree, so the block and the result are approximate; identical patterns are exact."""
    exact = head_synchronization(_synchronize_layer0(_wide_toy()), _tokens(), tol=0.01)
    assert not exact.approximate and exact.approximation == "" and not exact.to_frame()["approximate"].any()
    loose = head_synchronization(make_tiny_toy_transformer(), _tokens(), tol=1.0)
    frame = loose.to_frame()
    assert frame["approximate"].tolist() == (frame["max_distance"] > 0).tolist() == [True, True]
    assert loose.approximate and f"{frame['max_distance'].max():.2g}" in loose.approximation
    # audit 16a F3: an approximate block's count reads as an upper estimate, not as free directions
    assert loose.approximation.endswith(sync_module.UPPER_ESTIMATE) and "upper estimate" in repr(loose)


def _gauge_head(model, layer: int, head: int, A: torch.Tensor):
    """W_V → W_V A, b_V → b_V A, W_O → A⁻¹ W_O on one head (computed in float64): the same function."""
    a = model.blocks[layer].attn
    A = A.double()
    with torch.no_grad():
        for name, M in (("W_V", None), ("b_V", None), ("W_O", torch.linalg.inv(A))):
            w = getattr(a, name)[head].double()
            getattr(a, name)[head] = (M @ w if M is not None else w @ A).to(getattr(a, name).dtype)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_heads_gauge_does_not_move_its_blocks_count(dtype):
    """Head 0 with 4 value directions and head 1 with full-rank values of its own, one pattern, in a model
    and in the same model with head 1 gauged by A = 10⁻⁷·(orthogonal · diag(1 … 10⁻²) · orthogonal)
    (its values at 10⁻⁷ to 10⁻⁹ of head 0's scale, W_O carrying the inverse): the same function, so
    the same ranks and counts. Relative to the block's largest eigenvalue (audit finding 10's frame,
    before each head's values were put at unit scale) head 1's directions fell under the cut-off:
    s_block 4 instead of 12."""
    model = _copy_head(make_tiny_toy_transformer(), 0, 0, 1).to(dtype)
    a = model.blocks[0].attn
    g = torch.Generator().manual_seed(5)
    d = model.cfg.d_head
    with torch.no_grad():
        a.W_V[0][:, 4:] = 0
        a.b_V[0][4:] = 0
        a.W_V[1] = torch.randn(a.W_V[1].shape, generator=g) / a.W_V.shape[1] ** 0.5
        # W_O of its own: the stored A⁻¹ W_O is rounded to the model's dtype, which a copy of head 0's
        # would no longer be exactly (a float64 weight rank; METHODS §2 on gauges stored in float32)
        a.W_O[1] = torch.randn(a.W_O[1].shape, generator=g) / a.W_O.shape[1] ** 0.5
    q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    A = 1e-7 * q1 @ torch.diag(torch.logspace(0, -2, d, dtype=torch.float64)) @ q2
    gauged = _gauge_head(copy.deepcopy(model), 0, 1, A)
    tokens = _tokens()
    torch.testing.assert_close(gauged(tokens), model(tokens), rtol=1e-4, atol=1e-4)
    frames = [head_synchronization(m, tokens, tol=1e-6).to_frame() for m in (model, gauged)]
    row = frames[0].iloc[0]
    assert row["heads"] == (0, 1) and row["s_heads"] == (4, d) and row["s_block"] == 4 + d
    columns = ["heads", "s_heads", "s_block", "j_apart", "j_sync", "extra_freedom"]
    pd.testing.assert_frame_equal(frames[1][columns], frames[0][columns])


def test_relu_blocks_at_positive_tol_are_approximate():
    """ReLU at tol = 0.05: blocks whose neurons disagree on some samples are approximate (their
    firing distance is that fraction of samples), the exact duplicate is not, and the label says how much."""
    res = neuron_synchronization(_relu_model_with_duplicate(), _tokens(), tol=0.05)
    frame = res.to_frame()
    assert frame["approximate"].tolist() == (frame["max_distance"] > 0).tolist()
    assert not frame.set_index("neurons").loc[[(3, 5)], "approximate"].any() and frame["approximate"].any()
    k = round(res._block_max(res.firing_distance) * res.n_samples)
    assert res.approximate
    assert res.approximation == (f"firing patterns in blocks differ on up to {k / res.n_samples:.2%} of samples; "
                                 f"two neurons of a block that swapped firing patterns would change their outputs "
                                 f"by up to {np.sqrt(res._block_max(res.output_distance)):.2g} RMS (relative); "
                                 + sync_module.UPPER_ESTIMATE)
    exact = neuron_synchronization(_relu_model_with_duplicate(), _tokens(), tol=0.0)
    assert not exact.approximate and exact.approximation == ""


def test_relu_zero_distance_is_decided_from_the_sample_count():
    """A ReLU distance is k/n exactly; float64 rounding of E[r_i²] + E[r_j²] − 2E[r_i r_j] leaves a few
    eps, which must not read as a disagreement, while one sample in n must."""
    n = 1000
    weights = dict(fire_rate=torch.ones(1, 2), input_rank=np.array([3]), W_out=torch.eye(2)[None], d_out=2, in_bias=False)

    def result(dist: float) -> NeuronSyncResult:
        distance = np.array([[[0.0, dist], [dist, 0.0]]])
        return NeuronSyncResult(output_distance=distance, firing_distance=distance, tol=0.01, blocks=[[[0, 1]]], value_gram=torch.eye(2)[None],
                                n_samples=n, act_fn="relu", exact_activation=True, rank_rtol=None, **weights)

    assert not result(4 * np.finfo(np.float64).eps).approximate
    assert result(1 / n).approximate and "differ on up to 0.10% of samples" in result(1 / n).approximation
    smooth = NeuronSyncResult(output_distance=np.zeros((1, 2, 2)), firing_distance=np.zeros((1, 2, 2)), tol=0.0, blocks=[[[0], [1]]], value_gram=torch.eye(2)[None],
                              n_samples=n, act_fn="gelu", exact_activation=False, rank_rtol=None, **weights)
    # no block of two neurons: nothing is counted, so nothing is approximate, nor is any neuron alone
    assert not smooth.approximate and smooth.approximation == ""
    assert not smooth.to_frame(singletons=True)["approximate"].any()
    # a block of a smooth activation says how far its outputs move when its neurons share a pattern
    paired = NeuronSyncResult(output_distance=np.array([[[0.0, 0.04], [0.04, 0.0]]]),
                              firing_distance=np.array([[[0.0, 0.01], [0.01, 0.0]]]), tol=0.05, blocks=[[[0, 1]]],
                              value_gram=torch.eye(2)[None], n_samples=n, act_fn="gelu", exact_activation=False,
                              rank_rtol=None, **weights)
    assert paired.approximation == ("smooth activation: two neurons of a block that swapped firing patterns would "
                                    "change their outputs by up to 0.2 RMS (relative); " + sync_module.UPPER_ESTIMATE)


def test_blocks_formed_on_half_of_the_data():
    """Audit 4 (toy:modadd: 1,704 synchronized-neuron freedom on part of the data, 936 on all of it,
    unflagged): the pass also forms the blocks of the data's even-numbered sequences, exactly those of
    a run on that half alone, and marks every block that half forms otherwise (on_half False)."""
    model, tokens = _relu_model_with_duplicate(), _tokens()
    neurons = neuron_synchronization(model, tokens, tol=0.0, batch_size=5)
    alone = neuron_synchronization(model, tokens[::2], tol=0.0)
    assert neurons.half_blocks == alone.blocks
    frame = neurons.to_frame()
    on_half = [any(frozenset(n) == frozenset(b) for b in alone.blocks[layer])
               for layer, n in zip(frame["layer"], frame["neurons"])]
    assert frame["on_half"].tolist() == on_half
    assert neurons.changing_blocks == on_half.count(False)
    heads = head_synchronization(_synchronize_layer0(make_tiny_toy_transformer()), tokens, tol=0.05, batch_size=5)
    heads_alone = head_synchronization(_synchronize_layer0(make_tiny_toy_transformer()), tokens[::2], tol=0.05)
    assert heads.half_blocks == heads_alone.blocks
    assert heads.to_frame().set_index("heads").loc[[(0, 1)], "on_half"].item()


def test_relu_blocks_at_tol_0_do_not_depend_on_the_batching():
    """Audit 10b F1: the firing distance k/n was read from a Gram merged batch by batch, so two neurons
    firing on the same samples came out 2.2·10⁻¹⁶ apart depending on batch_size (and on the number of
    torchrun processes), and tol = 0 — sparsify's default for ReLU — split them: toy:modadd's 11
    sequences gave 89 or 88 blocks. ReLU's distances are now exact multiples of 1/n."""
    model = tld.load_model("toy:modadd")
    data = tld.toy_data("modadd")[:11]
    results = [tld.neuron_synchronization(model, data, tol=0.0, batch_size=b) for b in (1, 3, 4, 11)]
    n = results[0].n_samples
    for res in results:
        assert res.blocks == results[0].blocks
        k = res.firing_distance * n
        np.testing.assert_array_equal(k, np.round(k))
    assert sum(len(b) > 1 for b in results[0].blocks[0]) == 89


def test_blocks_and_input_ranks_that_still_change_with_the_data_are_said():
    """Audit 13b F1/F4: on toy:modadd with 64 pairs, 71 of 97 neuron blocks are formed otherwise by half
    of the data (on_half False) yet came with count_exact and no warning, and to_dict left them out; a
    layer's D_in still grew with the data (head synchronization's input_rank 113 → 124 → 127 on 4, 16,
    64 sequences of toy:bytelm) with no flag. Both are now DataLimitedWarnings, frame columns and
    to_dict entries."""
    import tl_degeneracy as tld
    from tl_degeneracy.numerics import DataLimitedWarning

    model, x = tld.load_model("toy:modadd"), tld.toy_data("modadd")[:64]
    with pytest.warns(DataLimitedWarning, match=r"neuron_synchronization: \d+ of \d+ synchronized blocks are formed "
                                                r"otherwise by the even-numbered half of the 64 sequences"):
        neurons = neuron_synchronization(model, x)
    frame = neurons.to_frame()
    assert neurons.changing_blocks == int((frame["on_half"] == False).sum()) > 0  # noqa: E712
    assert neurons.to_dict()["changing_blocks"] == neurons.changing_blocks
    assert "data_limited" in frame.columns and "data_limited_layers" in neurons.to_dict()

    bytelm, text = tld.load_model("toy:bytelm"), tld.toy_data("bytelm")[:4, :64]
    with pytest.warns(DataLimitedWarning, match=r"head_synchronization: at \d of 2 layers the input's rank \(input_rank\) "
                                                r"is lower on half of the 4 sequences"):
        heads = head_synchronization(bytelm, text)
    assert heads.data_limited.any() and (heads.input_rank_half < heads.input_rank).any()
    frame = heads.to_frame()
    assert frame["data_limited"].tolist() == [bool(heads.data_limited[layer]) for layer in frame["layer"]]
    assert heads.to_dict()["data_limited_layers"] == np.flatnonzero(heads.data_limited).tolist()


# ------------------------------------------------------------------------------ half precision (audit 14b F1)
def _gpt2_pair(directory, overlap: bool):
    """Tiny GPT-2 whose layer-0 heads 0 and 1 share W_Q, W_K, b_Q, b_K (identical patterns) and either
    are exact copies (values and W_O too) or share 4 of their 8 value columns (``overlap``)."""
    from .fixtures.hf import make_hf_model, tiny_tokenizer

    hf, D, d = make_hf_model("gpt2").cpu(), 32, 8
    with torch.no_grad():
        attn = hf.transformer.h[0].attn
        W, b = attn.c_attn.weight, attn.c_attn.bias
        for off in (0, D):  # q, k
            W[:, off + d : off + 2 * d] = W[:, off : off + d]
            b[off + d : off + 2 * d] = b[off : off + d]
        v = 2 * D
        if overlap:
            W[:, v + d : v + d + 4] = W[:, v : v + 4]
        else:
            W[:, v + d : v + 2 * d] = W[:, v : v + d]
            b[v + d : v + 2 * d] = b[v : v + d]
            attn.c_proj.weight[d : 2 * d] = attn.c_proj.weight[:d]
    hf.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sync_counts_carry_a_band_that_holds_the_exact_count(tmp_path, dtype):
    """Two heads with one pattern whose values overlap in 4 of 8 dimensions: (3.3)–(3.4) give
    J_apart = 2(31·8 + 31·8 − 64) = 864 and J_sync = 31·16 + 31·12 − 12·16 = 676, extra freedom 188,
    which float32 reads. In bf16/fp16 the rounding of the values counted as 4 more value directions
    (s 16) and the count read 128, stated as exact. Now the count at the rounding level bounds it
    (128–188), with a HalfPrecisionWarning, columns, repr and to_dict saying so. An exact copy read
    D_in 32 (> D − 1 = 31 under LayerNorm) and 440 where it is 432: D_in is capped."""
    tokens = torch.randint(3, 100, (16, 16), generator=torch.Generator().manual_seed(5))
    tokens[:, 0] = 1
    overlap = _gpt2_pair(tmp_path / "overlap", overlap=True)
    exact = head_synchronization(tld.load_model(overlap, device="cpu", dtype=torch.float32), tokens, tol=1e-6,
                                 progress=False)
    assert exact.to_frame().iloc[0]["extra_freedom"] == 188 and exact.extra_freedom_band == (188, 188)
    assert not exact.half_precision
    with pytest.warns(tld.HalfPrecisionWarning, match=r"extra freedom of 1 block\(s\) differs .*total 128–188"):
        half = head_synchronization(tld.load_model(overlap, device="cpu", dtype=dtype), tokens, tol=1e-6,
                                    progress=False)
        row = half.to_frame().iloc[0]
    lo, hi = row["extra_freedom_min"], row["extra_freedom_max"]
    assert lo <= 188 <= hi and lo < hi and half.extra_freedom_band == (lo, hi)
    assert half.half_precision and "extra_freedom_band" in repr(half)
    assert half.to_dict()["extra_freedom_band"] == (lo, hi) and half.to_dict()["half_precision"]
    # review 36: a rank_rtol of one's own kept no band and read half_precision False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        own = head_synchronization(tld.load_model(overlap, device="cpu", dtype=dtype), tokens, tol=1e-6,
                                   rank_rtol=1e-6, progress=False)
        low, high = own.extra_freedom_band
    assert own.half_precision and low <= 188 <= high
    copy_ = head_synchronization(tld.load_model(_gpt2_pair(tmp_path / "copy", overlap=False), device="cpu",
                                                dtype=dtype), tokens, tol=1e-6, progress=False)
    assert copy_.input_rank[0] == 31 and copy_.to_frame().iloc[0]["extra_freedom"] == 8 * (31 + 31 - 8)
    # the same cap in the counts: W_Q's input covariance (GPT-2's q has a bias) read 32 of D = 32 in half precision
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = tld.degeneracy_counts(tld.load_model(overlap, device="cpu", dtype=dtype), tokens, progress=False)
    assert counts.loc[counts["map"].isin(["W_Q", "W_K", "W_V"]), "rank_G"].max() == 31


def test_an_input_rank_at_the_sample_count_is_flagged(tmp_path):
    """Audit 14b F2: on one sequence of 10 tokens D_in read 9 (n − 1, the data's limit) and the exact copy's
    extra freedom 256 for 432, with data_limited False in the frame, to_dict and repr (its half-data check
    cannot run on one sequence). Now sample_limited says so; on 8 sequences nothing is flagged."""
    model = tld.load_model(_gpt2_pair(tmp_path / "copy", overlap=False), device="cpu")
    for n, flagged in ((1, True), (8, False)):
        tokens = torch.randint(3, 100, (n, 10), generator=torch.Generator().manual_seed(5))
        tokens[:, 0] = 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            heads = head_synchronization(model, tokens, tol=1e-6, progress=False)
            neurons = tld.neuron_synchronization(model, tokens, progress=False)
        assert heads.to_frame()["sample_limited"].all() == flagged and bool(heads.sample_limited.any()) == flagged
        assert (heads.to_dict()["sample_limited_layers"] == [0, 1]) == flagged
        assert (neurons.to_dict()["sample_limited_layers"] == [0, 1]) == flagged
        assert ("D_in at the sample count" in repr(heads)) == flagged
        assert any(issubclass(w.category, tld.SampleLimitedWarning) for w in caught) == flagged


def test_activation_ranks_say_what_they_rest_on():
    """Audit 14b F5: rank 6 of 32 on 6 samples came with no rtol, no sample_limited mark and no warning."""
    model = make_tiny_toy_transformer()
    with pytest.warns(tld.SampleLimitedWarning, match="activation_stats: the rank of 2 of 2"):
        few = tld.activation_stats(model, _tokens(n=1, pos=7), progress=False)
    frame = few.to_frame()
    assert (frame["rank"] == 7).all() and frame["sample_limited"].all() and not frame["half_precision"].any()
    assert (frame["rtol"] > 0).all() and few.to_dict()["hooks"][0]["sample_limited"]
    many = tld.activation_stats(model, _tokens(n=24, pos=12), progress=False).to_frame()
    assert not many["sample_limited"].any()


def _spread_toy(n_heads: int, d_head: int, d_model: int, dtype: torch.dtype, **config):
    """A one-layer ToyTransformer with O(1) random weights (seeded)."""
    from tl_degeneracy.models.toys.transformer import ToyTransformer

    model = ToyTransformer(n_layers=1, d_model=d_model, n_heads=n_heads, d_head=d_head, d_mlp=8, d_vocab=20,
                           **{"n_ctx": 16, "act_fn": "relu", "seed": 0, **config})
    g = torch.Generator().manual_seed(1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            scale = 1 / p.shape[-2] ** 0.5 if leaf.startswith("W_") else 0.3
            p.copy_((1.0 if leaf == "w" else 0.0) + scale * torch.randn(p.shape, generator=g))
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_heads_of_one_query_key_form_one_exact_block_though_their_patterns_differ_by_rounding(dtype):
    """Audit 22a F2: three heads with the same W_Q, W_K, b_Q, b_K compute one pattern, but the batched
    product rounds heads 1 and 2 in another order than head 0 (a distance of ~10⁻¹⁷ in float64,
    ~10⁻⁸ in float32), so tol=0 split them ([[0], [1, 2]], extra freedom 18 where the Jacobian of the
    layer's output reads 54) and a tol > 0 called the block approximate. Patterns within the
    forward's rounding are one pattern now."""
    model = _spread_toy(3, 3, 12, dtype)
    with torch.no_grad():
        attn = model.blocks[0].attn
        for name in ("W_Q", "W_K", "b_Q", "b_K"):
            getattr(attn, name)[1:] = getattr(attn, name)[0]
    tokens = torch.randint(0, 20, (10, 8), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert not bool((pattern[:, 1] == pattern[:, 0]).all())  # not bit-identical: what the test is about
    for tol in (0.0, 0.05):
        result = head_synchronization(model, tokens, tol=tol, progress=False)
        assert result.blocks == [[[0, 1, 2]]]
        assert not result.approximate and not result.to_frame()["approximate"].any()
        assert result.extra_freedom == 54


def test_non_finite_output_weights_are_refused_by_name():
    """Audit 22a F5: a NaN in W_O, which no activation carries, surfaced as torch's LinAlgError from
    the counts' SVD; a NaN in the W_out row of a neuron in no block returned normal-looking counts."""
    from tl_degeneracy.errors import NumericalError
    from tl_degeneracy.synchronization import neuron_synchronization

    tokens = torch.randint(0, 20, (10, 8), generator=torch.Generator().manual_seed(0))
    for weight, analysis in (("W_O", head_synchronization), ("W_out", neuron_synchronization)):
        model = _spread_toy(3, 3, 12, torch.float64)
        with torch.no_grad():
            module = model.blocks[0].attn if weight == "W_O" else model.blocks[0].mlp
            getattr(module, weight)[-1, 0] = float("nan")
        with pytest.raises(NumericalError, match=weight):
            analysis(model, tokens, progress=False)


def _fixed_position_heads(target: int, copy: bool) -> torch.nn.Module:
    """Heads 0 and 1 of a float64 toy attend (exactly, to float64's precision) to position ``target``
    only: a positional direction there and keys that read it 200-fold; head 1 a copy of head 0's
    values when ``copy``."""
    model = _spread_toy(3, 3, 12, torch.float64)
    direction = torch.zeros(12, dtype=torch.float64)
    direction[:2] = torch.tensor([1.0, -1.0])  # mean-free: LayerNorm keeps it
    attn = model.blocks[0].attn
    with torch.no_grad():
        model.pos_embed.W_pos[:, :2] = 0.0
        model.embed.W_E[:, :2] = 0.0
        model.pos_embed.W_pos[target] += 3.0 * direction
        for h in (0, 1):
            attn.W_K[h] = 0.0
            attn.W_K[h, :2, 0] = torch.tensor([200.0, -200.0])
            attn.W_Q[h], attn.b_Q[h], attn.b_K[h] = 0.0, 0.0, 0.0
            attn.b_Q[h, 0] = 10.0
        if copy:
            for name in ("W_V", "W_O", "b_V"):
                getattr(attn, name)[1] = getattr(attn, name)[0]
    return model


def _block_jacobian_extra(model, tokens, heads=(0, 1)) -> int:
    """J_apart − J_sync of ``heads`` by the rank of the Jacobian of their outputs with respect to their
    W_V and W_O (fixtures.jacobian), from the forward's patterns and LayerNorm output: each head's
    output A_h (x W_V + b_V) W_O, centred over the samples (b_O absorbs a constant) and without the
    mean direction (the next LayerNorm never reads it); apart stacked, synchronized summed."""
    _, cache = model.run_with_cache(tokens)
    ln = model.blocks[0].ln1
    x = cache["blocks.0.ln1.hook_normalized"] * ln.w + ln.b
    A = cache["blocks.0.attn.hook_pattern"]
    b_V = model.blocks[0].attn.b_V.detach()
    D = x.shape[-1]
    P = torch.eye(D, dtype=torch.float64) - 1 / D

    def outputs(p, centred=True):
        out = []
        for i, h in enumerate(heads):
            o = (A[:, h] @ (x @ p[i] + b_V[h]) @ p[len(heads) + i]).reshape(-1, D)
            out.append((o - o.mean(0) if centred else o) @ P)
        return torch.stack(out)

    attn = model.blocks[0].attn
    params = [attn.W_V[h].detach().clone() for h in heads] + [attn.W_O[h].detach().clone() for h in heads]
    sizes = [p.numel() for p in params]

    def jacobian(fn):
        flat = (lambda theta: fn([t.view_as(p) for t, p in zip(theta.split(sizes), params)]).flatten())
        return torch.func.jacfwd(flat)(torch.cat([p.flatten() for p in params]))

    # Against the uncentred outputs' scale: a head whose centred output is float64 rounding has no rank
    # (a cut-off relative to its own largest singular value would count the rounding).
    atol = 1e-9 * float(torch.linalg.matrix_norm(jacobian(lambda p: outputs(p, centred=False)), ord=2))
    apart, sync = (int(torch.linalg.matrix_rank(jacobian(fn), atol=atol, rtol=0.0))
                   for fn in (outputs, lambda p: outputs(p).sum(0)))
    return apart - sync


@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("case", ["sink", "fixed_position"])
def test_a_block_attending_to_fixed_positions_counts_what_its_pattern_passes_on(case, copy):
    """Audit 22a F1: inside a block the heads compute A·x·W_V·W_O, so what the Jacobian sees is A·x,
    not x. Two heads attending only to a BOS sink (every sequence starts with token 0) output a
    constant: no extra freedom, where the counts read 18 (independent values) and 57 (a copy) from x
    and the values; two attending only to position 1, which holds 3 distinct tokens, read 18 and 57
    where the Jacobian says 33. The block's D_in and s are now those of A·x and A·v."""
    model = _fixed_position_heads(0 if case == "sink" else 1, copy)
    tokens = torch.randint(0, 20, (24, 8), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    if case == "fixed_position":
        tokens[:, 1] = torch.tensor([3, 7, 11])[torch.arange(24) % 3]
    pattern = model.run_with_cache(tokens)[1]["blocks.0.attn.hook_pattern"][:, :2]
    assert float(pattern[..., 0 if case == "sink" else 1][:, :, 1:].min()) > 1 - 1e-12  # exactly fixed
    result = head_synchronization(model, tokens, tol=0.01, progress=False)
    assert result.blocks[0][0] == [0, 1]
    truth = _block_jacobian_extra(model, tokens)
    assert truth == (0 if case == "sink" else 33)
    assert result.extra_freedom == truth
    row = result.to_frame().iloc[0]
    assert row["input_rank"] < int(result.input_rank[0])  # the pattern's input, below the layer's


def test_heads_whose_patterns_differ_at_one_sample_are_not_one_pattern():
    """Review 53 #2: the same-pattern test read the mean distance, and a real difference at a few
    samples shrinks in the mean as the data grow: heads whose queries differ only at one token, present
    at one of 32,000 query positions (distance 0.05 there), averaged 1.6·10⁻⁶ < 16·eps(float32) and
    formed one exact block at tol=0. Copies are one pattern at every sample; these heads are not. And
    copies whose scores are 100 times larger round their patterns up to ~75·eps apart at a sample
    (review 53 #3), still one pattern."""
    model = _spread_toy(2, 3, 32, torch.float64, normalization=None, n_ctx=8)
    attn = model.blocks[0].attn
    with torch.no_grad():
        for name in ("W_Q", "W_K", "b_Q", "b_K"):
            getattr(attn, name)[1] = getattr(attn, name)[0]
        E, P = model.embed.W_E, model.pos_embed.W_pos
        basis, _ = torch.linalg.qr(torch.cat([E[:19], P]).T)
        v = E[19] - basis @ (basis.T @ E[19])  # read by token 19's queries alone
        attn.W_Q[1] += 0.5 * v[:, None] / (v @ E[19]) * torch.ones(1, 3, dtype=torch.float64)
    tokens = torch.randint(0, 19, (4000, 8), generator=torch.Generator().manual_seed(0))
    tokens[0, 4] = 19
    single = model.to(torch.float32)
    result = head_synchronization(single, tokens, tol=0.0, batch_size=500, progress=False)
    assert result.distance[0][0, 1] < 16 * torch.finfo(torch.float32).eps  # what the mean alone would merge
    assert result.blocks == [[[0], [1]]] and result.extra_freedom == 0
    approximate = head_synchronization(single, tokens, tol=0.05, batch_size=500, progress=False)
    assert approximate.blocks == [[[0, 1]]] and approximate.approximate

    copies = _spread_toy(3, 3, 12, torch.float64, n_ctx=128)
    attn = copies.blocks[0].attn
    with torch.no_grad():
        attn.W_Q.mul_(100)
        attn.b_Q.mul_(100)
        for name in ("W_Q", "W_K", "b_Q", "b_K"):
            getattr(attn, name)[1:] = getattr(attn, name)[0]
    tokens = torch.randint(0, 20, (4, 64), generator=torch.Generator().manual_seed(0))
    result = head_synchronization(copies.to(torch.float32), tokens, tol=0.0, progress=False)
    assert result.blocks == [[[0, 1, 2]]] and not result.approximate and result.extra_freedom == 54


def test_a_float32_head_copy_under_a_large_mean_counts_no_rounding_of_its_values():
    """Audit 22a (the value ranks' rounding, left open in 0.4.12): without a norm, a residual stream of
    300·u plus its spread rounds every value to eps·|v| in float32, which the values' covariance carried
    above the rank rule's cut-off relative to its λ₁: an exact copy read s_S 6 and 36 extra free
    directions where float64 (and the Jacobian) read 3 and 63, two independent heads where there is
    one. The values' ranks now leave out the covariance's rounding too (numerics.covariance_floor)."""
    model = _spread_toy(3, 3, 12, torch.float64, normalization=None)
    attn = model.blocks[0].attn
    with torch.no_grad():
        for name in ("W_Q", "W_K", "b_Q", "b_K", "W_V", "W_O", "b_V"):
            getattr(attn, name)[1] = getattr(attn, name)[0]
        u = torch.randn(12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        model.embed.W_E += 300 * u / u.norm()
    tokens = torch.randint(0, 20, (12, 8), generator=torch.Generator().manual_seed(0))
    counts = {}
    for dtype in (torch.float64, torch.float32):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = head_synchronization(model.to(dtype), tokens, tol=1e-6, progress=False)
        assert result.blocks == [[[0, 1], [2]]]
        counts[dtype] = (result.to_frame().iloc[0]["s_block"], result.extra_freedom)
    assert counts[torch.float32] == counts[torch.float64] == (3, 63)



def test_one_position_sequences_say_that_every_pattern_is_the_same():
    """Audit 22a F6: with sequences of one token every pattern is [1], so three unrelated heads form one
    block (54 extra free directions, right on these data) and nothing said that the patterns carried
    no information."""
    from tl_degeneracy.numerics import DataLimitedWarning

    tokens = torch.randint(0, 20, (200, 1), generator=torch.Generator().manual_seed(0))
    with pytest.warns(DataLimitedWarning, match="every sequence holds one position"):
        result = head_synchronization(_spread_toy(3, 3, 12, torch.float64), tokens, progress=False)
    assert result.blocks == [[[0, 1, 2]]]


@pytest.mark.parametrize("sink", [0, 2])
def test_an_approximate_block_counts_at_least_what_any_of_its_heads_passes_on(sink):
    """Review 54 #1: a block found at tol 0.05 whose heads' patterns differ — one head a pure BOS sink,
    the other two a weaker sink that also mixes — was read through its first head's pattern alone: with
    the pure sink first it passed on nothing and read 0 extra free directions, below the Jacobian's 18,
    though labelled an upper estimate (54 with the heads numbered otherwise). The rows of every head
    are taken together now: the count holds the Jacobian's whatever the order."""
    model = _spread_toy(3, 3, 12, torch.float64)
    attn = model.blocks[0].attn
    direction = torch.zeros(12, dtype=torch.float64)
    direction[:2] = torch.tensor([1.0, -1.0])
    with torch.no_grad():
        model.pos_embed.W_pos[:, :2] = 0.0
        model.embed.W_E[:, :2] = 0.0
        model.pos_embed.W_pos[0] += 3.0 * direction
        for h in range(3):
            attn.W_K[h], attn.W_Q[h], attn.b_Q[h], attn.b_K[h] = 0.0, 0.0, 0.0, 0.0
            attn.W_K[h, :2, 0] = torch.tensor([200.0, -200.0])
            attn.b_Q[h, 0] = 10.0 if h == sink else 0.15
            if h != sink:  # the weaker sink's heads also read a shared generic query, so the rest mixes
                attn.W_Q[h, :, 1] = torch.linspace(-1, 1, 12, dtype=torch.float64)
                attn.W_K[h, :, 1] = 3 * torch.linspace(1, -1, 12, dtype=torch.float64)
    tokens = torch.randint(0, 20, (24, 8), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    result = head_synchronization(model, tokens, tol=0.05, progress=False)
    assert result.blocks == [[[0, 1, 2]]] and result.approximate
    assert _block_jacobian_extra(model, tokens, heads=(0, 1, 2)) == 18
    assert result.extra_freedom == 54  # the upper estimate, as the labels say, in either order


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_duplicate_neuron_s_count_moves_with_no_relu_rescaling(dtype):
    """Review 54 #2: whether a ReLU block's count holds for its own input rank was decided on the raw
    W_out rows at float32's rule, so neuron 1 = 2·neuron 0 rescaled by 10⁶ (W_in·c, b_in·c, W_out/c: the
    same function) read count_exact False and no total, where c = 1 reads 11; review 55 #1: read at the
    neurons' RMS instead, neuron 1 = 10⁻⁶·neuron 0 with its own W_out row (not a rescaling: another
    function, whose count is also 11) lost its count. The stored rows' independence is float64's."""
    from tl_degeneracy.synchronization import neuron_synchronization

    tokens = torch.randint(0, 20, (12, 8), generator=torch.Generator().manual_seed(0))
    totals = {}
    for c, rescaled in ((1.0, True), (1e-6, True), (1e6, True), (1e-6, False)):
        model = _spread_toy(3, 3, 12, torch.float64)
        mlp = model.blocks[0].mlp
        with torch.no_grad():
            mlp.W_in[:, 1] = 2 * c * mlp.W_in[:, 0]
            mlp.b_in[1] = 2 * c * mlp.b_in[0]
            if rescaled:
                mlp.W_out[1] /= c
        result = neuron_synchronization(model.to(dtype), tokens, tol=0.0, progress=False)
        assert [b for b in result.blocks[0] if len(b) > 1] == [[0, 1]]
        totals[c, rescaled] = result.extra_freedom
    assert set(totals.values()) == {11}, totals


@pytest.mark.parametrize("case", ["samples = D_in", "constant", "zero input"])
def test_gelu_copies_whose_count_the_data_cannot_separate_stay_approximate(case):
    """Review 56 #2/#3: the smooth copies' correction takes act(p) off the span of act′(p)·x̃ over the
    samples. With 16 samples = D_in (x̃ spans them all) or a constant p (act(p) ∝ 1, in the span) the
    correction read 31 for the Jacobian's 30, labelled exact; with p ≡ 0 (f = 0, but act′(0) = ½ moves
    W_in) the count misses the Jacobian's drop. Such copies keep the approximate label."""
    model = make_tiny_toy_transformer(act_fn="gelu").double()
    mlp = model.blocks[0].mlp
    tokens = _tokens(n=1, pos=16) if case == "samples = D_in" else _tokens()
    with torch.no_grad():
        mlp.W_in[:, 5] = mlp.W_in[:, 3]
        mlp.b_in[5] = mlp.b_in[3]
        mlp.W_out[5] = 2 * mlp.W_out[3]
        if case != "samples = D_in":
            mlp.W_in[:, [3, 5]] = 0.0
            mlp.b_in[[3, 5]] = 0.7 if case == "constant" else 0.0
    res = neuron_synchronization(model, tokens, tol=0.0, progress=False)
    row = res.to_frame().set_index("neurons").loc[[(3, 5)]].iloc[0]
    apart, synced = _neuron_block_jacobians(model, tokens, 0, [3, 5], act=torch.nn.functional.gelu)
    assert row["approximate"] and res.approximate
    if case != "zero input":  # the bilinear count, right here (the zero-input one is a known gap: METHODS §3)
        assert row["extra_freedom"] == apart - synced == 30


@pytest.mark.parametrize("case, neurons, truth", [("copy", [3, 5], 15), ("three copies", [3, 5, 7], 30),
                                                  ("dependent rows", [3, 5], 31), ("rows of rank 2", [3, 5, 7], 46)])
def test_copies_of_a_gelu_neuron_are_an_exact_block_with_the_jacobian_s_count(case, neurons, truth):
    """Audit 22a F4: neurons with the same W_in column and b_in compute one p, so one r = Φ(p), on every
    input: their block is exact, not "an upper estimate". For GELU act(p) ≠ act'(p)·p, so unlike ReLU no
    neuron's rescaling keeps its output, and the count of m copies whose rows have rank ρ is (m − 1)·d_out
    + D_in·(m − ρ): the ReLU formula read 30 and 45 for the Jacobian's 31 and 46 with dependent rows."""
    model, tokens = make_tiny_toy_transformer(act_fn="gelu").double(), _tokens()
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        for k in neurons[1:]:
            mlp.W_in[:, k] = mlp.W_in[:, 3]
            mlp.b_in[k] = mlp.b_in[3]
        if case == "dependent rows":
            mlp.W_out[5] = 2 * mlp.W_out[3]
        elif case == "rows of rank 2":
            mlp.W_out[7] = mlp.W_out[3] - 0.5 * mlp.W_out[5]
    res = neuron_synchronization(model, tokens, tol=0.0, progress=False)
    frame = res.to_frame().set_index("neurons")
    assert list(frame.index) == [tuple(neurons)]
    apart, synced = _neuron_block_jacobians(model, tokens, 0, neurons, act=torch.nn.functional.gelu)
    assert apart - synced == truth
    row = frame.loc[[tuple(neurons)]].iloc[0]
    assert not row["approximate"] and row["count_exact"] and row["extra_freedom"] == truth
    assert not res.approximate and res.approximation == "" and res.extra_freedom == truth
    # one bit apart in b_in: another function, whose block is an approximation again
    with torch.no_grad():
        mlp.b_in[neurons[-1]] = torch.nextafter(mlp.b_in[3], torch.tensor(np.inf, dtype=mlp.b_in.dtype))
    res = neuron_synchronization(model, tokens, tol=1e-6, progress=False)
    assert [b for b in res.blocks[0] if len(b) > 1] == [neurons] and res.approximate


def test_a_never_firing_neuron_s_output_row_does_not_decide_whether_a_count_is_exact():
    """Review 55 #2: whether a ReLU block's count holds for its own input rank read every raw W_out row,
    a neuron that never fires included, whose row moves nothing (rescaling it, W_in·c and W_out/c, is
    the same function): with that row parallel to the live neuron's, the block of a never-firing neuron
    and one firing on half the samples lost count_exact. Only live rows count, so every row reads alike."""
    w, v = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 0.1, 2.0])
    distance = np.array([[[0.0, 0.5], [0.5, 0.0]]])
    counts = set()
    for dead_row in (torch.zeros(3), 3 * w, 1e7 * v, 1e-7 * v, v):
        res = NeuronSyncResult(output_distance=distance, firing_distance=distance, tol=1.0, blocks=[[[0, 1]]],
                               value_gram=torch.diag(torch.tensor([0.0, 1.0], dtype=torch.float64))[None],
                               n_samples=1000, act_fn="relu", exact_activation=True, rank_rtol=None,
                               fire_rate=torch.tensor([[0.0, 0.5]]), input_rank=np.array([3]),
                               W_out=torch.stack([dead_row, w])[None], d_out=3, in_bias=False)
        frame = res.to_frame()
        counts.add((bool(frame["count_exact"].item()), int(frame["extra_freedom"].item())))
    assert len(counts) == 1 and next(iter(counts))[0], counts


def _low_rank_output_pair() -> torch.nn.Module:
    """Audit 23a F1's heads: one pattern (head 1 takes head 0's W_Q, W_K), and head 1's W_O of rank 2
    (a product of 8 × 2 and 2 × 24 factors), float64."""
    model = _synchronize_layer0(_wide_toy().double())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.blocks[0].attn.W_O[1] = (torch.randn(8, 2, generator=g, dtype=torch.float64)
                                       @ torch.randn(2, 24, generator=g, dtype=torch.float64)) / 5
    return model


def _dependent_output_rows() -> torch.nn.Module:
    """Audit 23a F1's neurons: three ReLU neurons on on every sample (b_in 30), W_out[2] = 0.7·W_out[0]
    + 1.3·W_out[1], float64."""
    model = make_tiny_toy_transformer(act_fn="relu").double()
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        mlp.b_in[[0, 1, 2]] = 30.0
        mlp.W_out[2] = 0.7 * mlp.W_out[0] + 1.3 * mlp.W_out[1]
    return model


@pytest.mark.parametrize("unit", ["heads", "neurons"])
def test_a_float32_count_that_moves_with_its_weights_rule_is_known_within_a_band(unit):
    """Audit 23a F1: output maps of a float32 model ranked at float64's rule count their rounding as
    directions (a W_O of rank 2 has six more singular values of ~1e-8; a dependent W_out row one), so
    two heads of one pattern read 128 extra free directions where the float64 model's Jacobian has 80,
    and the three neurons 6 where it has 19, without a word. At float32's rule they read the float64
    model's count, but that rule drops real contributions below its cut-off (review 55 #1), so a
    float32 model is counted at both: extra_freedom stays float64's, extra_freedom_min/max hold both,
    and a SyncCountWarning says the count is known only to lie between. The float64 model has no band."""
    from tl_degeneracy.synchronization import SyncCountWarning, neuron_synchronization

    tokens = _tokens()
    if unit == "heads":
        model, block, truth = _low_rank_output_pair(), (0, 1), _block_jacobian_extra(_low_rank_output_pair(), tokens)

        def count(m):
            frame = head_synchronization(m, tokens, tol=0.01, progress=False).to_frame()
            return frame, frame.set_index("heads").loc[[block]]
    else:
        model, block = _dependent_output_rows(), (0, 1, 2)
        apart, synced = _neuron_block_jacobians(model, tokens, 0, list(block))
        truth = apart - synced

        def count(m):
            frame = neuron_synchronization(m, tokens, tol=0.0, progress=False).to_frame()
            return frame, frame.set_index("neurons").loc[[block]]

    with warnings.catch_warnings():
        warnings.simplefilter("error", SyncCountWarning)
        _, exact = count(model)
    assert exact["extra_freedom"].item() == exact["extra_freedom_min"].item() == exact["extra_freedom_max"].item() == truth
    stored = copy.deepcopy(model).float()
    with pytest.warns(SyncCountWarning, match="known only to lie between"):
        frame, rounded = count(stored)
    low, high = rounded["extra_freedom_min"].item(), rounded["extra_freedom_max"].item()
    assert low <= truth <= high and low < high and rounded["count_exact"].item()
    assert rounded["extra_freedom"].item() == (high if unit == "heads" else low)  # float64's rule: 128; 6
    assert (truth, low, high) == ((80, 80, 128) if unit == "heads" else (19, 6, 19))
