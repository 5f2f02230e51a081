"""degeneracy_counts, sparsify and head/neuron synchronization count the BOS position (METHODS §3, §4, §8): every later position reads it
through attention, so a direction used only at BOS is not free. Before, both left BOS out by default
(token_batches' skip_bos) and called such directions free; sparsify then removed them and its ReLU copy
drifted by 1.5e-2 (the audit's e1 case, which these tests reproduce)."""

from __future__ import annotations

import types

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.counts import degeneracy_counts

from .fixtures.device import on_test_device
from .fixtures.toys import make_tiny_toy_transformer

D = 16
# The copy's rounding: float64 solves and products over D + F = 48 terms, times the conditioning of
# the eliminations (≲ 1e3), as test_sparsify's ROUNDING; plus 10·eliminated_scale for step 1's cut-off.
ROUNDING = 1e3 * 48 * torch.finfo(torch.float64).eps


def bos_relu_toy():
    """The tiny toy with ReLU in float64 and a BOS token (id 1), and 2 sequences of BOS + 5 tokens:
    12 positions, the same BOS activations at both sequences' position 0."""
    model = make_tiny_toy_transformer(act_fn="relu").double()
    model.tokenizer = types.SimpleNamespace(bos_token_id=1, pad_token_id=0)
    tokens = torch.randint(2, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    return model, on_test_device(tokens)


def test_counts_read_the_bos_position():
    """W_in's rank(G) is the rank over every position, BOS included; the direction it adds is used
    only at BOS and is not free: moving W_in along it changes the logits of the later positions."""
    model, tokens = bos_relu_toy()
    frame = degeneracy_counts(model, tokens, n_probes=2, progress=False)
    positions = frame.attrs["positions"]
    assert positions["bos"] and not positions["skip_bos"] and positions["n_samples"] == tokens.numel()

    _, cache = model.run_with_cache(tokens)
    ln = model.blocks[0].ln2  # what W_in of layer 0 reads: hook_normalized is x/σ, before the gain and bias
    x = cache["blocks.0.ln2.hook_normalized"] * ln.w + ln.b
    everywhere = tld.activation_stats(model, tokens, hooks="blocks.0.ln2.hook_normalized", per_head=False,
                                      skip_bos=False, progress=False)["blocks.0.ln2.hook_normalized"]
    rank_all = everywhere.rank(centered=True)  # W_in has a bias: its inputs' covariance (METHODS §4)
    w_in = frame[(frame["map"] == "W_in") & (frame["layer"] == 0)].iloc[0]
    assert w_in["centered"] and w_in["rank_G"] == rank_all == 10  # 11 inputs (10 after BOS, and BOS), centred

    # The 10 later positions leave D − 10 directions unused; one of them is used at BOS.
    later = x[:, 1:].reshape(-1, D)
    _, vecs = torch.linalg.eigh(later.T @ later)
    null = vecs[:, : D - 10]
    c = null @ (null.T @ x[0, 0])
    c = c / c.norm()
    assert float((later @ c).abs().max()) < 1e-12 * float(later.abs().max())
    with torch.no_grad():
        before = model(tokens)
        model.blocks[0].mlp.W_in += torch.outer(c, torch.randn(32, generator=torch.Generator().manual_seed(1)).to(c))
        after = model(tokens)
    assert float((after - before)[:, 1:].abs().max()) > 1e-3 * float(before.abs().max())


def test_sparsify_exact_with_bos():
    """The ReLU copy agrees with the original to rounding on data with BOS, also when the data come as
    token_batches' default (BOS left out): firing patterns, G¹ and the drift all read the 12 positions."""
    model, tokens = bos_relu_toy()
    for data in (tokens, tld.token_batches(tokens, model)):
        res = tld.sparsify(model, data)
        frame = res.to_frame()
        # with BOS left out: 1.45e-2 and 1.65e-2
        assert (frame["output_drift"] <= ROUNDING + 10 * frame["eliminated_scale"]).all(), frame.to_dict("list")
        assert (frame["kl"].abs() <= ROUNDING).all()
        assert not res.approximate and not res.positions["skip_bos"] and res.n_samples == tokens.numel()
        assert (frame["input_rank"] == 10).all()  # 11 distinct inputs, centred (W_in has a bias, METHODS §8)


@pytest.mark.parametrize("run", [lambda m, x: degeneracy_counts(m, x, skip_bos=True, progress=False),
                                 lambda m, x: tld.sparsify(m, x, skip_bos=True),
                                 lambda m, x: tld.head_synchronization(m, x, skip_bos=True),
                                 lambda m, x: tld.neuron_synchronization(m, x, skip_bos=True)],
                         ids=["counts", "sparsify", "head_sync", "neuron_sync"])
def test_skip_bos_refused(run):
    model, tokens = bos_relu_toy()
    with pytest.raises(ValueError, match="skip_bos=True refused"):
        run(model, tokens)


def test_token_batches_without_bos_give_the_same_counts():
    """A TokenBatches that leaves BOS out (token_batches' default) is read with BOS counted: the same
    frame as from the tokens."""
    model, tokens = bos_relu_toy()
    batches = tld.token_batches(tokens, model)
    assert batches.skip_bos
    a = degeneracy_counts(model, tokens, n_probes=2, progress=False)
    b = degeneracy_counts(model, batches, n_probes=2, progress=False)
    assert a.equals(b) and a.attrs["positions"] == b.attrs["positions"]


def test_synchronization_counts_the_bos_position():
    """Every later query reads the BOS position's values and MLP output, so head and neuron
    synchronization count it too (their freedom is the same kind of claim as the counts')."""
    model, tokens = bos_relu_toy()
    assert tld.head_synchronization(model, tokens).n_samples == tokens.numel()
    assert tld.neuron_synchronization(model, tokens).n_samples == tokens.numel()


def test_every_analysis_counts_the_repeated_bos_once(tl_models):
    """Audit 17a F2's remainder: every sequence's BOS position is one and the same sample, so 3
    sequences of 4 positions hold 10 distinct samples, whose covariances reach rank 9 at most. The
    synchronizations, activation_stats and the interaction basis judged the sample limit by all 12
    positions (centred bound 11) and called rank 9 the model's; now each flags it, and says 10."""
    model = tl_models("gpt2", "bridge")
    bos = model.tokenizer.bos_token_id
    sequences = [torch.tensor([bos, 5, 6, 7]), torch.tensor([bos, 8, 9, 10]), torch.tensor([bos, 11, 12, 13])]
    for analysis in (tld.head_synchronization, tld.neuron_synchronization):
        with pytest.warns(tld.SampleLimitedWarning, match="reached n = 10"):
            result = analysis(model, sequences, progress=False)
        assert result.n_samples == 12 and result.sample_limited.all(), analysis.__name__

    with pytest.warns(tld.SampleLimitedWarning, match="reached n = 10"):
        stats = tld.activation_stats(model, sequences, hooks=["resid_mid"], skip_bos=False, center=True,
                                     progress=False)
    frame = stats.to_frame()
    assert (frame["count"] == 12).all() and (frame["distinct"] == 10).all()
    assert (frame["rank"] == 9).all() and frame["sample_limited"].all()

    dims = tld.interaction_basis(model, sequences, skip_bos=False, n_probes=2, progress=False).dims
    assert (dims["n"] == 12).all() and (dims["distinct"] == 10).all()
    wide = dims[dims["D"] > 10]
    assert len(wide) and (wide["rank_G"] == 9).all() and wide["sample_limited"].all()
