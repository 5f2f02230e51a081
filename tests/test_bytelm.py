"""toy:bytelm: the shipped checkpoint reproduces its recorded validation loss on the bundled data,
beats the unigram baseline, and a short retrain is deterministic and learns; toy_data's registry."""

from __future__ import annotations

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.models.toy_adapter import ToyAdapter
from tl_degeneracy.models.toys import BUNDLED_TOYS
from tl_degeneracy.models.toys import bytelm as B
from tl_degeneracy.models.toys.data import TOY_DATA, register_toy_data, toy_data
from tl_degeneracy.models.toys.registry import BUNDLED
from tl_degeneracy.models.toys.transformer import ToyTransformer


@pytest.fixture(scope="module")
def shipped():
    return tld.load_model("toy:bytelm")


def test_bytelm_is_registered_on_import():
    assert "toy:bytelm" in BUNDLED
    assert any(entry[0] == "toy:bytelm" for entry in BUNDLED_TOYS)
    assert "byte-level" in BUNDLED["toy:bytelm"][1]


def test_shipped_checkpoint_matches_its_metadata(shipped):
    assert isinstance(shipped, ToyTransformer) and not shipped.training
    assert shipped.init_kwargs() == {**B.BYTELM_KWARGS, "seed": shipped.metadata["seed"]}
    meta = shipped.metadata
    for key in ("command", "seed", "steps", "train_loss", "val_loss", "unigram_entropy_val", "train_files",
                "val_files", "python", "torch", "wall_time_s"):
        assert key in meta, key
    assert meta["command"].startswith("python -m tl_degeneracy.models.toys.bytelm")
    assert f"--steps {meta['steps']}" in meta["command"] and f"--seed {meta['seed']}" in meta["command"]
    assert not set(meta["val_files"]) & set(meta["train_files"]), "validation files must be held out"
    assert len(meta["train_loss_history"]) == meta["steps"]

    val = toy_data("bytelm")
    assert meta["val_sequences"] == len(val)
    val_loss = B.evaluate(shipped, val)
    # Same data, same weights: only float32 summation order (thread count, BLAS) may differ.
    assert val_loss == pytest.approx(meta["val_loss"], abs=2e-4)
    # A useful LM, not a unigram model: clearly below the entropy of the bytes themselves.
    h_unigram = B.unigram_entropy(val)
    assert h_unigram == pytest.approx(meta["unigram_entropy_val"], abs=1e-9)
    assert val_loss < h_unigram - 0.75
    assert meta["train_loss"] < meta["initial_val_loss"]


def test_shipped_checkpoint_through_the_adapter(shipped):
    adapter = tld.adapt(shipped)
    assert isinstance(adapter, ToyAdapter)
    assert (adapter.n_layers, adapter.n_heads, adapter.d_head, adapter.d_mlp, adapter.d_vocab, adapter.n_ctx) == (2, 4, 32, 512, 256, 128)
    assert adapter.live_parameters().numel == sum(p.numel() for p in shipped.parameters())
    # It predicts Python: "self" and "sys" are completed by the likeliest next byte.
    for prompt, expected in ((b"        return sel", "f"), (b"import sy", "s")):
        logits = adapter.forward(torch.tensor([list(prompt)]))
        assert chr(int(logits[0, -1].argmax())) == expected, prompt


def test_toy_data_bytelm_is_deterministic_and_well_formed():
    val = toy_data("bytelm")
    raw = B.VAL_SAMPLE_PATH.read_bytes()
    assert 32 * 1024 <= len(raw) <= 64 * 1024
    assert val.dtype == torch.long and val.shape == (len(raw) // 128, 128)
    assert int(val.min()) >= 0 and int(val.max()) < 256
    assert bytes(val[0].tolist()) == raw[:128]
    assert torch.equal(toy_data("toy:bytelm"), val)

    a, b, c = toy_data("bytelm", n=40, seed=1), toy_data("bytelm", n=40, seed=1), toy_data("bytelm", n=40, seed=2)
    assert a.shape == (40, 128) and torch.equal(a, b) and not torch.equal(a, c)
    assert toy_data("bytelm", n=4, seq_len=32).shape == (4, 32)
    with pytest.raises(ValueError, match="seq_len"):
        toy_data("bytelm", seq_len=129)
    with pytest.raises(ValueError, match="no bundled data named 'nope'.*bytelm"):
        toy_data("nope")


def test_register_toy_data_adds_a_name():
    def fake(n=None, seed=0, scale=1):
        return torch.full((n or 2, 3), seed * scale)

    register_toy_data("unit-test-fake", fake)
    try:
        assert torch.equal(toy_data("unit-test-fake", n=1, seed=3, scale=2), torch.full((1, 3), 6))
    finally:
        TOY_DATA.pop("unit-test-fake")
    with pytest.raises(TypeError, match="callable"):
        register_toy_data("bad", 42)


def test_training_text_is_stdlib_source_disjoint_from_validation():
    assert not set(B.TRAIN_MODULES) & set(B.VAL_MODULES)
    data, files = B.training_bytes()
    assert data.dtype == torch.uint8 and len(data) > 1_000_000
    assert "argparse.py" in files
    # The byte frequencies of the training text predict the validation bytes about as well as
    # their own: same kind of text.
    val = toy_data("bytelm")
    assert B.unigram_entropy(val, reference=data) < B.unigram_entropy(val) + 0.1


@pytest.fixture
def one_thread():
    """Bit-for-bit reproducibility is promised on one CPU thread: with two, the order of some
    CPU reductions varies between runs (differences ~1e-7 after a few steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_short_retrain_is_deterministic_and_learns(one_thread):
    kwargs = dict(steps=30, seed=7, batch_size=8, lr=3e-3, eval_sequences=16, val_sequences=32)
    first = B.train_bytelm(**kwargs)
    second = B.train_bytelm(**kwargs)
    assert first.metadata["train_loss_history"] == second.metadata["train_loss_history"]
    assert all(torch.equal(x, y) for x, y in zip(first.state_dict().values(), second.state_dict().values()))
    meta = first.metadata
    assert meta["val_loss"] < meta["initial_val_loss"] - 1.0  # from ln 256 ≈ 5.55 towards the unigram level
    assert meta["train_loss_history"][-1] < meta["train_loss_history"][0]
    other = B.train_bytelm(**{**kwargs, "steps": 2, "seed": 8})
    assert not torch.equal(other.blocks[0].attn.W_Q, first.blocks[0].attn.W_Q)


def test_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps and batch_size"):
        B.train_bytelm(steps=0)
