"""``load_model(spec)``: bundled toys, local Hugging Face directories, .gguf files, hub names.

Which TransformerLens object comes back (research/transformerlens.md §1.1, §2, §3):

=========================  =========================================  ==========================================
spec                       TransformerLens 4.x                        TransformerLens 3.x
=========================  =========================================  ==========================================
``"toy:..."``              the bundled toy (a HookedRootModule)        same
local HF directory         ``TransformerBridge.boot_transformers``     ``HookedTransformer`` without weight
                                                                       processing (``backend="bridge"``: bridge)
local ``.gguf`` file       dequantised by transformers, then bridge    same (the bridge exists in 3.9)
hub name (``"gpt2"``)      ``TransformerBridge.boot_transformers``     ``HookedTransformer.from_pretrained_no_
                                                                       processing`` for names TL 3 knows, else
                                                                       the bridge
=========================  =========================================  ==========================================

Every path gives raw (unprocessed) weights, so the bridge and HookedTransformer compute the same
function (research §1.2), and returns the model in eval mode.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .toys.registry import BUNDLED

_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
#: Substrings that make TransformerLens 3.x choose an architecture from a *path string* instead of
#: reading config.json (loading_from_pretrained.convert_hf_model_config / get_pretrained_state_dict).
_TL3_NAME_TRIGGERS = ("llama", "gemma", "bert", "t5", "hubert", "wav2vec2")
_BACKENDS = (None, "bridge", "hooked_transformer")


def _accepted() -> str:
    return (
        f"a bundled model ({', '.join(sorted(BUNDLED)) or 'none registered'}), a local Hugging Face "
        "directory (with config.json), a local .gguf file, or a Hugging Face hub name such as 'gpt2' "
        "or 'EleutherAI/pythia-70m' (needs the network or the local hub cache)"
    )


def _hooked_transformer_class():
    try:
        from transformer_lens import HookedTransformer  # TL 4.x raises ImportError here
    except ImportError:
        return None
    return HookedTransformer


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    spec: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    backend: str | None = None,
) -> nn.Module:
    """Load a model by spec (see the module docstring); the result is in eval mode.

    ``device`` defaults to CUDA when available, else CPU (toys: where their loader puts them);
    ``dtype`` to float32 for Hugging Face models. ``backend="bridge"`` forces a TransformerBridge on
    TransformerLens 3.x, ``backend="hooked_transformer"`` asks for a HookedTransformer (3.x only).
    The spec is kept on the model as ``model.tld_spec``: the report names the model by it and, for a
    bundled toy, reads the toy's own data when none is given. A local directory without a tokenizer
    gives a model with a tokenizer of ids alone (token i reads "<i>"; BOS, EOS and padding the
    config's, padding EOS where it names none, and otherwise none that it does not name:
    TransformerLens's ``generate`` then needs ``stop_at_eos=False``) and ``model.tld_tokenizer_missing`` (a sentence saying so): token data run as usual,
    and the report refuses text data for it.
    """
    model = _load(spec, device, dtype, backend)
    object.__setattr__(model, "tld_spec", str(spec))
    return model


def _load(spec: str | Path, device, dtype, backend: str | None) -> nn.Module:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "hooked_transformer" and _hooked_transformer_class() is None:
        raise ValueError(
            "backend='hooked_transformer' needs TransformerLens 3.x; TransformerLens 4 removed HookedTransformer. "
            "Leave backend unset to get a TransformerBridge."
        )
    if isinstance(spec, str) and spec.startswith("toy:"):
        if spec not in BUNDLED:
            raise ValueError(f"unknown bundled model {spec!r}; bundled: {', '.join(sorted(BUNDLED)) or 'none'}")
        return BUNDLED[spec][0](device=device, dtype=dtype).eval()
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"model spec must be a string or a path, got {type(spec).__name__}; accepted: {_accepted()}")
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return _load_gguf(path, device, dtype)
        if path.is_dir() and (path / "config.json").exists():
            return _load_hf_directory(path, device, dtype, backend)
        if path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return _load_gguf(ggufs[0], device, dtype)
            detail = f"it holds {len(ggufs)} .gguf files; pass one of them" if ggufs else "it has no config.json"
            raise ValueError(f"{str(path)!r} is not a Hugging Face model directory: {detail}. Accepted: {_accepted()}")
        raise ValueError(f"{str(path)!r} is a file but not a .gguf file. Accepted: {_accepted()}")
    name = str(spec)
    if name.endswith(".gguf") or name.startswith(("/", ".", "~")) or "\\" in name:
        raise FileNotFoundError(f"no such file or directory: {name!r}. Accepted: {_accepted()}")
    if not _HUB_NAME.match(name):
        raise ValueError(f"unknown model spec {name!r}. Accepted: {_accepted()}")
    return _load_hub(name, device, dtype, backend)


# ---------------------------------------------------------------------------------------------- HF
def _boot_bridge(name: str, device, dtype, **kwargs) -> nn.Module:
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        name, device=str(_default_device(device)), dtype=dtype or torch.float32, **kwargs
    )
    return bridge.eval()


#: Files of which a saved tokenizer has at least one (fast, slow BPE/WordPiece, SentencePiece,
#: tiktoken; tokenizer_config.json alone suffices for vocabulary-free ones such as ByT5's).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken")


def _load_hf_directory(path: Path, device, dtype, backend: str | None) -> nn.Module:
    # Without tokenizer files transformers would build an empty tokenizer of the config's class, or fail
    # where that class needs sentencepiece (Llama, Mistral: audit 18b F2); the model gets one of ids
    # alone instead, and the report refuses text for it.
    missing = not any((path / name).exists() for name in _TOKENIZER_FILES)
    tokenizer = _ids_tokenizer(path) if missing else None
    if backend == "bridge" or _hooked_transformer_class() is None:
        model = _boot_bridge(str(path), device, dtype, **({"tokenizer": tokenizer} if tokenizer is not None else {}))
    else:
        model = _hooked_transformer_from_directory(path, device, dtype, tokenizer)
    if tokenizer is not None:
        # TransformerLens fills a special token the tokenizer lacks with EOS, or else with "<|endoftext|>"
        # (the unknown id 0 here): the first is the config's own token (pad = EOS, as with the model's
        # tokenizer files: review 46 M1), the second none, and id 0 is then no padding.
        named = set(_config_special_tokens(json.loads((path / "config.json").read_text()), tokenizer.vocab_size).values())
        for role in _SPECIAL_ROLES:
            if getattr(model.tokenizer, f"{role}_token") not in named:
                setattr(model.tokenizer, f"{role}_token", None)
    if missing:
        text = f"the model directory {str(path)!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})"
        object.__setattr__(model, "tld_tokenizer_missing", text)
    return model


#: The directories of :func:`_ids_tokenizer`'s tokenizers, one per vocabulary and special ids.
_IDS_TOKENIZERS: dict[tuple, Path] = {}


def _ids_tokenizer(path: Path):
    """A tokenizer of token ids alone for a model directory without tokenizer files: token i reads
    "<i>", and BOS, EOS and padding are the config's ids (the first of a list; None where its config
    names no vocabulary). Saved to a directory that lasts as long as the process (one per vocabulary
    and special ids), and loaded from there: TransformerLens reloads a tokenizer by its ``name_or_path``."""
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = json.loads((path / "config.json").read_text())
    size = config.get("vocab_size")
    if not isinstance(size, int) or size < 1:
        return None
    special = _config_special_tokens(config, size)
    key = (size, tuple(sorted(special.items())))
    if key not in _IDS_TOKENIZERS:
        where = _neutral_tempdir()
        atexit.register(shutil.rmtree, where, ignore_errors=True)
        ids = Tokenizer(models.WordLevel(vocab={f"<{i}>": i for i in range(size)}, unk_token="<0>"))
        PreTrainedTokenizerFast(tokenizer_object=ids, unk_token="<0>", **special).save_pretrained(where)
        _IDS_TOKENIZERS[key] = where
    return AutoTokenizer.from_pretrained(str(_IDS_TOKENIZERS[key]))


_SPECIAL_ROLES = ("bos", "eos", "pad")


def _config_special_tokens(config: dict, size: int) -> dict[str, str]:
    """The special tokens a config names, as :func:`_ids_tokenizer` spells them ({"bos_token": "<1>"}):
    the first id of a list; ids outside the vocabulary of ``size`` tokens are none."""
    special = {}
    for role in _SPECIAL_ROLES:
        value = config.get(f"{role}_token_id")
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int) and 0 <= value < size:
            special[f"{role}_token"] = f"<{value}>"
    return special


def _neutral_tempdir() -> Path:
    """A fresh temporary directory whose path holds none of ``_TL3_NAME_TRIGGERS``: mkdtemp's random
    suffix can ("tld_ht_gvt55txd" holds "t5"), so such a name is discarded and drawn again; a TMPDIR
    that holds one itself is an error."""
    base = str(Path(tempfile.gettempdir()).resolve())
    if any(t in base.lower() for t in _TL3_NAME_TRIGGERS):
        raise RuntimeError(
            f"the temporary directory {base!r} contains one of {_TL3_NAME_TRIGGERS}, which makes TransformerLens "
            "3.x guess the architecture from the path; set TMPDIR to another directory"
        )
    while True:
        tmp = Path(tempfile.mkdtemp(prefix="tld_ht_"))
        if not any(t in str(tmp.resolve()).lower() for t in _TL3_NAME_TRIGGERS):
            return tmp
        tmp.rmdir()


def _declared_mlp_width(config) -> int | None:
    """The MLP width a checkpoint declares where TransformerLens 3 ignores it and assumes 4·d_model:
    GPT-2's and GPT-J's ``n_inner`` (audit 23a F4) and GPT-Neo's ``intermediate_size`` (review 56 #7).
    None where the config leaves the width at its 4·d_model default or declares it elsewhere."""
    width = getattr(config, "n_inner", None)
    if width is None and getattr(config, "model_type", None) == "gpt_neo":
        width = getattr(config, "intermediate_size", None)
    return None if width is None else int(width)


def _hooked_transformer_from_directory(path: Path, device, dtype, tokenizer=None) -> nn.Module:
    """TransformerLens 3.x HookedTransformer from a local HF directory, without weight processing.

    ``HookedTransformer.from_pretrained`` cannot load local checkpoints offline (research §2); the
    three calls below can, with two workarounds: TL 3 reads the architecture from the *path string*
    when it contains "llama" (or "gemma", ...) and then crashes, and GPT-2 configs written by
    transformers 5 lack ``n_ctx``. So the config is read from a copy of config.json (with n_ctx set
    from n_positions where missing) in a fresh temporary directory with a neutral name; the
    weights come from the HF model loaded here and handed over, so that path is never used for them.
    ``tokenizer``: the one to use (a directory without tokenizer files: ``_ids_tokenizer``'s).
    """
    import transformer_lens.loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    HookedTransformer = _hooked_transformer_class()
    dtype = dtype or torch.float32
    device = _default_device(device)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError):
            tokenizer = None  # a checkpoint without a tokenizer still runs on token ids
    config = json.loads((path / "config.json").read_text())
    if "n_ctx" not in config and "n_positions" in config:
        config["n_ctx"] = config["n_positions"]
    tmp = _neutral_tempdir()
    try:
        neutral = tmp / "model"
        neutral.mkdir()
        (neutral / "config.json").write_text(json.dumps(config))
        cfg = loading.get_pretrained_model_config(str(neutral), device=str(device), fold_ln=False, dtype=dtype)
        width = _declared_mlp_width(hf.config)
        if width is not None and cfg.d_mlp != width:
            cfg = dataclasses.replace(cfg, d_mlp=width)
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        state_dict = loading.get_pretrained_state_dict(str(neutral), cfg, hf, dtype=dtype)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model.to(device, print_details=False).eval()


# ---------------------------------------------------------------------------------------------- gguf
def _gguf_available() -> bool:
    return importlib.util.find_spec("gguf") is not None


def _load_gguf(path: Path, device, dtype) -> nn.Module:
    """A .gguf file, dequantised by transformers (``gguf_file=``), booted in the bridge.

    transformers marks a GGUF-loaded model as quantized (it refuses ``save_pretrained``) although its
    weights are plain dequantised tensors; it is copied into a plain model of the same class first.
    That copy is what the bridge wraps (and mutates), in both TransformerLens versions.
    """
    if not _gguf_available():
        raise ImportError(
            "loading a .gguf file needs the 'gguf' package: pip install 'tl-degeneracy[gguf]' (or pip install gguf)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config).to(dtype)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    return _boot_bridge(str(path), device, dtype, hf_model=plain.eval(), tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------- hub
def _tl3_knows(name: str) -> bool:
    import transformer_lens.loading_from_pretrained as loading

    try:
        loading.get_official_model_name(name)
    except ValueError:
        return False
    return True


def _load_hub(name: str, device, dtype, backend: str | None) -> nn.Module:
    HookedTransformer = _hooked_transformer_class()
    try:
        # TL 3.x HookedTransformer only knows its list of official names; anything else goes to the bridge.
        use_ht = HookedTransformer is not None and (
            backend == "hooked_transformer" or (backend is None and _tl3_knows(name))
        )
        if use_ht:
            model = HookedTransformer.from_pretrained_no_processing(
                name, device=str(_default_device(device)), dtype=dtype or torch.float32
            )
            return model.eval()
        return _boot_bridge(name, device, dtype)
    except Exception as error:
        if not _is_hub_failure(error):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local hub cache"
            if offline
            else "the hub could not be reached (no network?) and it is not in the local cache, "
            "or the hub has no such model"
        )
        raise OSError(
            f"could not load {name!r} from the Hugging Face hub: {why}. "
            f"To use a model offline, save it once where the hub is reachable "
            f"(AutoModelForCausalLM.from_pretrained(name).save_pretrained(dir), and the tokenizer likewise) and pass "
            f"the directory: tl_degeneracy.load_model('/path/to/dir'). Original error: {type(error).__name__}: {error}"
        ) from error


def _is_hub_failure(error: BaseException) -> bool:
    """Whether ``error`` says the hub could not be reached or the files are not cached."""
    for e in (error, error.__cause__, error.__context__):
        if e is None:
            continue
        if isinstance(e, (OSError, ConnectionError, TimeoutError)):
            return True
        module = type(e).__module__
        if module.startswith(("huggingface_hub", "requests", "httpx", "urllib3")):
            return True
    return False
