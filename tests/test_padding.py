"""Padding never counts (METHODS §0): attention masks wherever they can be given, and the pad-id
rule (leading and trailing runs) for plain token tensors such as ``model.to_tokens(strings)``, padded
on the right or the left (issue 14, item 1; API audit finding 4)."""

from __future__ import annotations

import contextlib
import json
import warnings

import pytest
import torch

from tests.fixtures.toys import make_tiny_toy_transformer
from tl_degeneracy.data import PaddingWarning, token_batches
from tl_degeneracy.errors import DataError

BOS, PAD = 1, 0  # tiny_tokenizer: <pad>=0, <bos>=1, words w3..w99 are their own ids


def tokenizer_model(pad_token: str = "<pad>"):
    """A tiny toy (no BOS of its own) with the word-level test tokenizer and the given pad token."""
    from tests.fixtures.hf import tiny_tokenizer

    model = make_tiny_toy_transformer(d_vocab=100)
    model.tokenizer = tiny_tokenizer()
    model.tokenizer.pad_token = pad_token
    return model


def real_rows(tb) -> list[list[int]]:
    """Each sequence's tokens, in data order (BOS included)."""
    return [s.tolist() for s in tb.sequences]


def no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PaddingWarning)
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- the issue


def six_strings() -> list[str]:
    """Six strings of 3 to 20 words w3..w99 (as in the issue: lengths vary, so to_tokens pads)."""
    g = torch.Generator().manual_seed(14)
    lengths = (3, 20, 7, 12, 5, 16)
    return [" ".join(f"w{int(i)}" for i in torch.randint(3, 100, (n,), generator=g)) for n in lengths]


@contextlib.contextmanager
def pad_token(model, token: str):
    """The model's tokenizer padding with ``token`` (GPT-2 in TransformerLens: pad = BOS), restored after."""
    before = model.tokenizer.pad_token
    model.tokenizer.pad_token = token
    try:
        yield
    finally:
        model.tokenizer.pad_token = before


HOOKS = ["embed", "resid_pre", "q", "v", "z", "attn_out", "resid_mid", "mlp_post", "resid_post", "ln_final"]


@pytest.mark.parametrize("pad", ["<pad>", "<bos>"])
@pytest.mark.parametrize("backend", ["bridge", "hooked_transformer"])
def test_strings_to_tokens_and_masked_dataset_count_the_same(tl_models, backend, pad, single_thread):
    datasets = pytest.importorskip("datasets")
    import tl_degeneracy as tld

    model = tl_models("gpt2", backend)
    strings = six_strings()
    with pad_token(model, pad):
        pad_id = model.tokenizer.pad_token_id
        padded = model.to_tokens(strings)  # BOS + words, right-padded with pad_id to the longest
        assert padded.shape == (6, 21) and int((padded == pad_id).sum()) > 6 * 21 // 3
        left = model.to_tokens(strings, padding_side="left")  # pad_id … pad_id BOS words
        assert int(left[0, -1]) != pad_id and torch.equal(left.sort(-1).values, padded.sort(-1).values)
        # A collator's left-padded batch with its attention mask, the same sequences with BOS.
        tok = model.tokenizer
        ids = [[BOS, *tok(s, add_special_tokens=False)["input_ids"]] for s in strings]
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = tok.pad({"input_ids": ids}, padding=True)
        finally:
            tok.padding_side = side
        assert enc["attention_mask"][0][0] == 0  # left padding
        ds = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})

        results, n_warnings = {}, {}
        for name, data in (("strings", strings), ("to_tokens", padded), ("to_tokens_left", left), ("dataset", ds)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                results[name] = tld.activation_stats(model, data, hooks=HOOKS, batch_size=4, progress=False)
            n_warnings[name] = sum(issubclass(w.category, PaddingWarning) for w in caught)

    n_words = sum(len(s.split()) for s in strings)  # BOS skipped: the samples are the words
    ref = results["strings"]
    assert len(ref.stats) >= len(HOOKS)
    for name in ("to_tokens", "to_tokens_left", "dataset"):
        for hook, h in ref.stats.items():
            other = results[name].stats[hook]
            assert other.count == h.count == n_words, (name, hook)
            # Same sequences, same batches: only float64 summation order could differ.
            torch.testing.assert_close(other.mean, h.mean, rtol=1e-12, atol=0)
            gram = (lambda st: st.gram) if h.has_full else (lambda st: st.head_gram)  # q: per-head blocks only
            torch.testing.assert_close(gram(other), gram(h), rtol=1e-12, atol=0)
    expected_rule = {"strings": "none", "to_tokens": "pad_id_runs", "to_tokens_left": "pad_id_runs", "dataset": "attention_mask"}
    for name, res in results.items():
        pos = res.positions
        assert pos.n_samples == n_words and pos.n_tokens == n_words + 6 and pos.bos and pos.skip_bos, name
        assert pos.padding_rule == expected_rule[name]
        assert pos.n_padding == (0 if name == "strings" else 6 * 21 - (n_words + 6))
        json.dumps(pos.to_dict())
    assert n_warnings == {"strings": 0, "to_tokens": 1, "to_tokens_left": 1, "dataset": 0}


# ---------------------------------------------------------------------------------------------- masks


def test_left_padded_dict_batch_keeps_only_real_tokens():
    model = tokenizer_model()
    batch = {
        "input_ids": torch.tensor([[PAD, PAD, BOS, 5, 6], [BOS, 7, 8, 9, 10]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
    }
    tb = no_warnings(token_batches, batch, model)
    assert real_rows(tb) == [[BOS, 5, 6], [BOS, 7, 8, 9, 10]]
    assert tb.positions.bos and tb.n_samples == 6 and tb.source == "dict"
    assert tb.positions.padding_rule == "attention_mask" and tb.positions.n_padding == 2
    # a tokenizer's own output (a BatchEncoding, right-padded here) is such a dict
    enc = model.tokenizer(["w5 w6", "w7"], padding=True, return_tensors="pt")
    assert real_rows(token_batches(enc, model)) == [[5, 6], [7]]


def test_dataloader_dicts_honour_their_masks():
    model = tokenizer_model()
    items = [
        {"input_ids": torch.tensor([PAD, PAD, 3, 4]), "attention_mask": torch.tensor([0, 0, 1, 1])},
        {"input_ids": torch.tensor([5, 6, 7, PAD]), "attention_mask": torch.tensor([1, 1, 1, 0])},
        {"input_ids": torch.tensor([8, PAD, 9, 10]), "attention_mask": torch.tensor([1, 1, 1, 1])},
    ]
    loader = torch.utils.data.DataLoader(items, batch_size=2)
    tb = no_warnings(token_batches, loader, model)
    assert real_rows(tb) == [[3, 4], [5, 6, 7], [8, PAD, 9, 10]]  # a masked-in pad id is a token
    assert tb.positions.padding_rule == "attention_mask" and tb.positions.n_padding == 3


def test_dataset_mask_column_ragged_and_torch_format():
    datasets = pytest.importorskip("datasets")
    model = tokenizer_model()
    cols = {"input_ids": [[PAD, 5, 6], [7, 8, 9, 10], [11]], "attention_mask": [[0, 1, 1], [1, 1, 1, 0], [1]]}
    for ds in (datasets.Dataset.from_dict(cols), datasets.Dataset.from_dict(cols).with_format("torch")):
        tb = token_batches(ds, model)
        assert real_rows(tb) == [[5, 6], [7, 8, 9], [11]] and tb.positions.n_padding == 2
    # without a mask column, Dataset rows are taken at their own lengths (no pad-id rule)
    tb = no_warnings(token_batches, datasets.Dataset.from_dict({"input_ids": [[5, PAD], [6, 7]]}), model)
    assert real_rows(tb) == [[5, PAD], [6, 7]] and tb.positions.padding_rule == "none"
    # audit 23a F5: rows of one length ending in runs of the pad id look padded, and say that they count
    padded = {"input_ids": [[BOS, 5, 6, PAD, PAD], [BOS, 7, 8, 9, 10], [BOS, 11, PAD, PAD, PAD]]}
    for ds in (datasets.Dataset.from_dict(padded), datasets.Dataset.from_dict(padded).with_format("torch")):
        with pytest.warns(PaddingWarning, match="2 of them end in a run of the pad id 0, with no 'attention_mask'"):
            tb = token_batches(ds, model)
        assert real_rows(tb) == padded["input_ids"]
    # review 56 #4: where the pad id is EOS too, a run of it is text (an empty document packed in)
    eos_padded = tokenizer_model(pad_token="<eos>")
    no_warnings(token_batches, datasets.Dataset.from_dict({"input_ids": [[BOS, 5, 6, 2, 2], [BOS, 7, 8, 9, 10]]}), eos_padded)


def test_explicit_attention_mask_for_tensors_and_token_lists():
    model = tokenizer_model()
    toks = torch.tensor([[PAD, BOS, 5, 6], [BOS, 7, PAD, PAD]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    for m in (mask, mask.bool(), mask.tolist()):
        tb = no_warnings(token_batches, toks, model, attention_mask=m)
        assert real_rows(tb) == [[BOS, 5, 6], [BOS, 7]] and tb.positions.padding_rule == "attention_mask"
    # the mask replaces the pad-id rule: a masked-in trailing pad id is a token
    tb = token_batches(toks, model, attention_mask=torch.ones(2, 4))
    assert real_rows(tb) == toks.tolist() and tb.positions.n_padding == 0
    tb = token_batches([[5, 6, PAD], [7]], model, attention_mask=[[1, 1, 0], [1]])
    assert real_rows(tb) == [[5, 6], [7]] and tb.positions.n_padding == 1


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(3, 4), r"attention_mask does not fit the tokens: it has shape \(3, 4\), the tokens shape \(2, 4\)"),
        (torch.ones(2, 5), r"shape \(2, 5\), the tokens shape \(2, 4\)"),
        (torch.ones(4), r"shape \(1, 4\), the tokens shape \(2, 4\)"),
        (torch.ones(2, 2, 2), r"attention_mask must be \[batch, pos\] or \[pos\]"),
        (torch.tensor([[1, 1, 2, 0], [1, 1, 1, 1]]), r"1 \(real token\) or 0 \(padding\); it also holds \[2\]"),
        (torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]]), r"row 0 marks real tokens at positions \[0, 2\].*contiguous"),
        ([[1, 1], [1, 1, 1, 1]], r"2 rows of lengths 2..4, the tokens shape \(2, 4\)"),
        ("1111", r"attention_mask is a str"),
    ],
)
def test_attention_mask_errors_are_clear(mask, message):
    with pytest.raises(DataError, match=message):
        token_batches(torch.tensor([[BOS, 5, 6, 7], [BOS, 8, 9, 10]]), tokenizer_model(), attention_mask=mask)


def test_attention_mask_argument_only_where_data_carries_no_mask():
    datasets = pytest.importorskip("datasets")
    model = tokenizer_model()
    with pytest.raises(DataError, match="not to strings"):
        token_batches(["w5 w6"], model, attention_mask=[[1, 1]])
    with pytest.raises(DataError, match=r"'attention_mask' key or column"):
        token_batches(datasets.Dataset.from_dict({"input_ids": [[5, 6]]}), model, attention_mask=[[1, 1]])
    tb = token_batches(torch.tensor([[5, 6]]), model)
    with pytest.raises(DataError, match="TokenBatches"):
        token_batches(tb, model, attention_mask=[[1, 1]])
    with pytest.raises(DataError, match=r"the dict\['attention_mask'\] does not fit"):
        token_batches({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 2)}, model)


# ---------------------------------------------------------------------------------------------- pad ids


def test_trailing_pad_ids_of_a_tensor_are_padding_and_inner_ones_tokens():
    model = tokenizer_model()
    toks = torch.tensor([[BOS, 5, PAD, 6, PAD, PAD], [BOS, 7, 8, 9, 10, 11], [BOS, PAD, PAD, PAD, PAD, PAD]])
    with pytest.warns(PaddingWarning) as caught:
        tb = token_batches(toks, model)
    assert len(caught) == 1
    assert real_rows(tb) == [[BOS, 5, PAD, 6], [BOS, 7, 8, 9, 10, 11]]  # the third row is BOS only: dropped
    pos = tb.positions
    assert pos.padding_rule == "pad_id_runs" and pos.n_padding == 7 and pos.n_dropped == 1 and pos.n_samples == 8
    # The toy's DataLoader of the same tensor: the same rows
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(toks), batch_size=2)
    with pytest.warns(PaddingWarning):
        assert real_rows(token_batches(loader, model)) == real_rows(tb)


def test_an_empty_row_leaves_the_other_rows_bos_out():
    """Audit 23a F1: one row with no token (all padding, an all-zero mask, an empty list) decided that
    the data do not begin with BOS, so every other row's BOS position counted (9 samples for 6); review
    56 #1: left in, it became a one-token [BOS] sequence, which the callers that count BOS counted (10
    for 9). An empty string likewise."""
    model = tokenizer_model()
    rows = [[BOS, 5, 6, 7], [BOS, 8, 9], [BOS, 10]]
    padded = torch.tensor([r + [PAD] * (4 - len(r)) for r in rows])
    mask = (padded != PAD).long()
    cases = {"lists": rows + [[]], "tensor": torch.cat([padded, torch.full((1, 4), PAD)]),
             "mask": {"input_ids": torch.cat([padded, torch.full((1, 4), 5)]),
                      "attention_mask": torch.cat([mask, torch.zeros(1, 4, dtype=torch.long)])}}
    for name, data in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PaddingWarning)
            pos = token_batches(data, model).positions
        assert (pos.bos, pos.skip_bos, pos.n_samples, pos.n_dropped) == (True, True, 6, 1), name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PaddingWarning)
            tb = token_batches(data, model, skip_bos=False)
        assert (tb.positions.n_samples, tb.positions.n_dropped, real_rows(tb)) == (9, 1, rows), name
    texts = token_batches(["w5 w6", "", "w7"], model, prepend_bos=True, skip_bos=False)
    assert (texts.positions.n_samples, texts.positions.n_dropped) == (5, 1)


def test_pad_equal_to_bos_strips_only_the_trailing_run_after_the_bos():
    model = tokenizer_model(pad_token="<bos>")  # GPT-2 in TransformerLens: pad = BOS = EOS
    assert model.tokenizer.pad_token_id == BOS
    toks = torch.tensor([[BOS, 5, BOS, 6, BOS, BOS], [BOS, BOS, BOS, BOS, BOS, BOS], [BOS, 7, 8, 9, 10, 11]])
    with pytest.warns(PaddingWarning, match="7 positions at the ends of 2 of 3 token rows"):
        tb = token_batches(toks, model, skip_bos=False)
    # the inner BOS id is a token; the all-pad row keeps its BOS (position 0 is never padding)
    assert real_rows(tb) == [[BOS, 5, BOS, 6], [BOS], [BOS, 7, 8, 9, 10, 11]]
    assert tb.positions.bos and tb.positions.bos_source == "given"


def test_leading_pad_ids_of_a_tensor_are_padding_like_trailing_ones():
    """A left-padded tensor without a mask (to_tokens(padding_side="left")) counted its pad ids as
    tokens and hid the BOS (24 samples instead of 12, no warning); one rule now strips both sides."""
    model = tokenizer_model()
    right = torch.tensor([[BOS, 5, PAD, 6, PAD, PAD], [BOS, 7, 8, 9, 10, 11], [BOS, 12, PAD, PAD, PAD, PAD]])
    left = torch.tensor([[PAD, PAD, BOS, 5, PAD, 6], [BOS, 7, 8, 9, 10, 11], [PAD, PAD, PAD, PAD, BOS, 12]])
    for toks in (right, left):
        with pytest.warns(PaddingWarning, match="6 positions at the ends of 2 of 3 token rows"):
            tb = token_batches(toks, model)
        assert real_rows(tb) == [[BOS, 5, PAD, 6], [BOS, 7, 8, 9, 10, 11], [BOS, 12]]
        assert tb.positions.bos and tb.n_samples == 9 and tb.positions.padding_rule == "pad_id_runs"


def test_pad_equal_to_bos_keeps_the_last_of_a_leading_run_as_the_bos():
    model = tokenizer_model(pad_token="<bos>")  # GPT-2 in TransformerLens: pad = BOS = EOS
    toks = torch.tensor([[BOS, BOS, BOS, 5, BOS, 6], [BOS, 7, 8, 9, 10, 11], [BOS, BOS, BOS, BOS, BOS, BOS]])
    with pytest.warns(PaddingWarning, match="7 positions at the ends of 2 of 3 token rows"):
        tb = token_batches(toks, model, skip_bos=False)
    assert real_rows(tb) == [[BOS, 5, BOS, 6], [BOS, 7, 8, 9, 10, 11], [BOS]]
    assert tb.positions.bos and tb.positions.bos_source == "given"


def test_pad_equal_to_bos_in_data_without_bos_leaves_out_every_leading_run():
    """Audit 18a F1: a left-padded tensor whose rows carry no BOS, where the pad id is also BOS (GPT-2
    with pad = EOS), kept the last pad of each leading run as a token — counted as a sample, and in the
    context of every real token of its row (52 samples for 48, a Gram 1.9e-2 off). Where some row
    does not begin with the pad id, the data have no BOS and every leading run is padding, also when
    the rows come in batches whose first holds padded rows only; where every row does, the last of
    each leading run is its BOS, and the warning says so."""
    model = tokenizer_model(pad_token="<bos>")
    rows = [[9, 10, 11], [12, 13], [5, 6, 7, 8]]
    left = torch.tensor([[BOS] * (4 - len(r)) + r for r in rows])
    for data in (left, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(left), batch_size=2)):
        with pytest.warns(PaddingWarning, match=r"3 positions at the ends of 2 of 3 token rows hold the tokenizer's "
                                                r"pad id \d+ and were left out as padding; pass"):
            tb = token_batches(data, model)
        assert real_rows(tb) == rows and not tb.positions.bos and tb.n_samples == 9 and tb.positions.n_padding == 3
    with_bos = torch.tensor([[BOS] * (4 - len(r)) + [BOS] + r for r in rows])
    with pytest.warns(PaddingWarning, match=r"3 positions at the ends of 2 of 3 token rows .* \(the last of the "
                                            r"leading run of 2 row\(s\) was kept as its BOS"):
        tb = token_batches(with_bos, model)
    assert real_rows(tb) == [[BOS, *r] for r in rows] and tb.positions.bos and tb.n_samples == 9


def test_warning_text_is_one_line_saying_how_many_and_how_to_keep_them():
    model = tokenizer_model()
    toks = torch.tensor([[5, 6, PAD], [7, PAD, PAD], [8, 9, 10]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        token_batches(toks, model)
    assert len(caught) == 1 and caught[0].category is PaddingWarning
    text = str(caught[0].message)
    assert "\n" not in text
    assert text == (
        "token_batches: 3 positions at the ends of 2 of 3 token rows hold the tokenizer's pad id 0 and were left out "
        "as padding; pass strip_padding=False to count them, or attention_mask= to say which positions are real"
    )


def test_strip_padding_false_keeps_every_position():
    model = tokenizer_model()
    toks = torch.tensor([[5, 6, PAD], [7, PAD, PAD]])
    tb = no_warnings(token_batches, toks, model, strip_padding=False)
    assert real_rows(tb) == toks.tolist() and tb.n_samples == 6
    assert tb.positions.padding_rule == "none" and tb.positions.n_padding == 0 and tb.positions.pad_token_id == PAD


def test_explicit_pad_id_is_silent_and_no_tokenizer_means_no_pad_id():
    model = tokenizer_model()
    toks = torch.tensor([[5, 6, 9], [7, 9, 9]])
    tb = no_warnings(token_batches, toks, model, pad_token_id=9)  # asked for: no warning
    assert real_rows(tb) == [[5, 6], [7]] and tb.positions.n_padding == 3 and tb.positions.pad_token_id == 9
    toy = make_tiny_toy_transformer()  # no tokenizer: no id is padding unless given
    tb = no_warnings(token_batches, torch.tensor([[5, 6, 0], [7, 0, 0]]), toy)
    assert tb.n_samples == 6 and tb.positions.padding_rule == "none"


@pytest.mark.parametrize("backend", ["bridge", "hooked_transformer"])
def test_a_tokenizer_that_pads_on_the_left_changes_nothing(tl_models, backend, single_thread):
    """Audit 17a F5: a HookedTransformer whose tokenizer pads on the left masks every leading pad id
    of a batch and shifts its positions, so a sequence whose first real token is the pad id (0 here,
    BOS 1) got other activations, at any batch size and without a warning. The package pads on the
    right: the statistics must not depend on the tokenizer's side, which is left as it was."""
    import tl_degeneracy as tld

    model = tl_models("gpt2", backend)
    g = torch.Generator().manual_seed(9)
    sequences = []
    for i in range(8):
        s = torch.randint(3, 100, (int(torch.randint(5, 12, (1,), generator=g)),), generator=g)
        s[len(s) // 2] = PAD  # the pad id as a real token: in the middle of every sequence,
        if i % 2 == 0:
            s[0] = PAD  # and first in half of them
        sequences.append(s)
    grams = {}
    tok = model.tokenizer
    side = tok.padding_side
    try:
        for padding_side in ("right", "left"):
            tok.padding_side = padding_side
            for batch_size in (1, 4):
                stats = tld.activation_stats(model, sequences, hooks="ln_final", batch_size=batch_size, progress=False)
                assert tok.padding_side == padding_side
                (hook,) = stats.stats.values()
                assert hook.count == sum(len(s) for s in sequences)
                grams[padding_side, batch_size] = hook.gram
    finally:
        tok.padding_side = side
    reference = grams["right", 1]
    for key, gram in grams.items():
        torch.testing.assert_close(gram, reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()), msg=str(key))
