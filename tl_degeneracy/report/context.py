"""What every report section shares: the model, its adapter, the validated batches and the budgets.

Also where a data *spec* (a text file, a token tensor file, a saved dataset, ``toy:NAME``) becomes
data, where the fingerprints of model and data that key the section cache are computed, and the
report's identity (which model, which data set, which package version) that an output directory
holds one of.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..data import MASK_COLUMN, TOKEN_COLUMNS, TokenBatches, chunk_count, token_batches
from ..errors import DataError
from ..memory import MemoryBudget
from ..models.adapter import ModelAdapter
from ..models.toys.registry import BUNDLED
from .settings import ReportSettings

__all__ = ["ACTIVATION_HOOKS", "ReportContext", "default_data_spec", "library_versions", "load_data_spec"]

#: The hooks the activations section reads (every layer's).
ACTIVATION_HOOKS = ("resid_pre", "resid_post")
#: The passes of each section whose batches the memory budget bounds (``tld.memory.estimate``).
#: The interaction basis and the LLC read their own, smaller budgets (ib_tokens, llc_sequences).
_MEMORY_ANALYSES = {"synchronization": ("head_sync", "neuron_sync"), "counts": ("forward", "jacobian"),
                    "activations": ("forward",), "sparsity": ("neuron_sync", "forward")}
#: Data files of these suffixes (compared case-insensitively) are refused rather than read as text
#: (audit 12a: a .json of token ids ran as text, and a .npy's only warning was to re-encode it as UTF-8).
NOT_TEXT = {
    **dict.fromkeys((".json", ".jsonl"), "a JSON file (token ids, or records holding text)"),
    **dict.fromkeys((".npy", ".npz"), "a NumPy file"),
    **dict.fromkeys((".pkl", ".pickle"), "a pickle file"),
    **dict.fromkeys((".safetensors", ".gguf", ".bin", ".ckpt", ".h5", ".hdf5"), "a weights or binary file"),
    **dict.fromkeys((".parquet", ".arrow", ".feather"), "a columnar data file (load it with datasets and save_to_disk)"),
    **dict.fromkeys((".gz", ".zip", ".bz2", ".xz", ".zst", ".tar"), "a compressed file (decompress it first)"),
}
#: The memory fit halves the sequence length down to this before it lowers the batch size.
MIN_FITTED_SEQ_LEN = 256


def _config_items(cfg) -> dict:
    """A model config's settings as JSON-able text, but for where it runs (``device``, ``n_devices``:
    moving a model changes no number), what it is called (``model_name``, ``tokenizer_name``: a
    HookedTransformer loaded from a directory names a temporary one, another at every load) and
    values whose text names a memory address (it differs between processes)."""
    if cfg is None:
        return {}
    items = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    return {k: repr(v) for k, v in items.items() if k not in _NOT_COMPUTED and " at 0x" not in repr(v)}


#: Config settings that say where a model runs or what it is called, not what it computes.
_NOT_COMPUTED = ("device", "n_devices", "model_name", "tokenizer_name")


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("tl-degeneracy", "torch", "transformer-lens", "transformers", "numpy", "pandas", "plotly", "arviz-stats"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    found["python"] = sys.version.split()[0]
    return found


def default_data_spec(model_spec: str | None) -> str | None:
    """``toy:NAME`` for a bundled toy spec (its bundled data), else None (no default data; an unknown
    toy spec is then refused by the model loader, which names the bundled models)."""
    if isinstance(model_spec, str) and model_spec in BUNDLED:
        return "toy:" + model_spec.removeprefix("toy:").split("-")[0]
    return None


@dataclass(frozen=True)
class LoadedData:
    """Data read from a spec, and how: ``text`` data has no natural sequence length."""

    data: object
    source: str
    text: bool = False


def load_data_spec(spec: str | os.PathLike) -> LoadedData:
    """Read a data spec: ``toy:NAME`` (bundled data), a ``.pt``/``.pth`` file holding one LongTensor of
    token ids [batch, pos] (suffixes in any case), a directory saved with ``datasets``'
    ``save_to_disk``, or a text file (any other suffix but those of :data:`NOT_TEXT`).

    Raises:
        DataError: no such file, an empty or whitespace-only file, a file with NUL bytes or a
            suffix of :data:`NOT_TEXT` (not text), a .pt file that is not one tensor, an unknown toy.
    """
    import torch

    spec = os.fspath(spec)
    if spec.startswith("toy:"):
        from ..models.toys.data import toy_data

        try:
            return LoadedData(toy_data(spec.removeprefix("toy:")), spec)
        except ValueError as e:
            raise DataError(f"data {spec!r}: {e}") from None
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data {spec!r}: no such file or directory (give a .txt file, a .pt tensor file, a dataset "
                        "directory saved with datasets' save_to_disk, or toy:NAME)")
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError as e:  # pragma: no cover - datasets ships with transformer-lens
            raise DataError("reading a dataset directory needs the `datasets` package") from e
        try:
            return LoadedData(load_from_disk(str(path)), f"dataset {path}")
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"data {spec!r}: not a dataset saved with save_to_disk ({e})") from None
    suffix = path.suffix.lower()
    if suffix in NOT_TEXT:
        raise DataError(f"data {spec!r}: {NOT_TEXT[suffix]} is not read as data (give a text file, a .pt/.pth file "
                        "of token ids saved with torch.save, a dataset directory saved with save_to_disk, or toy:NAME): "
                        f"save the token ids with torch.save(torch.as_tensor(ids), '{path.with_suffix('.pt').name}'), "
                        "or write the text into a .txt file")
    if suffix in (".pt", ".pth"):
        try:
            tokens = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in many types
            # torch's own advice (weights_only=False) would run arbitrary code from the file: not passed on
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(f"data {spec!r}: cannot read it as a file of one torch tensor ({type(e).__name__}: "
                            f"{first}); save the token ids with torch.save(tensor, path)") from None
        if isinstance(tokens, dict) and any(key in tokens for key in TOKEN_COLUMNS):
            # a tokenizer's output saved as is: token_batches reads input_ids with its attention_mask
            return LoadedData(tokens, f"token dict file {path}")
        if not isinstance(tokens, torch.Tensor):
            raise DataError(f"data {spec!r} must hold one LongTensor of token ids [batch, pos], or a dict with "
                            f"{' or '.join(TOKEN_COLUMNS)} (and {MASK_COLUMN}) as a tokenizer returns it; it holds a "
                            f"{type(tokens).__name__}"
                            + (f" with keys {sorted(map(str, tokens))}" if isinstance(tokens, dict) else ""))
        return LoadedData(tokens, f"tensor file {path}")
    raw = path.read_bytes()
    if b"\x00" in raw:  # no UTF-8 text holds NUL bytes: a binary file read as text would tokenize its bytes
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise DataError(f"data {spec!r} holds NUL bytes: " + (
            "UTF-16 text; re-encode it as UTF-8" if utf16 else
            "a binary file, not text (UTF-16 text without a byte-order mark would look so too: re-encode it as "
            "UTF-8); give a text file, a .pt/.pth file of token ids, a dataset directory saved with save_to_disk, "
            "or toy:NAME"))
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" in text and "\ufffd".encode() not in raw:  # bytes that are not UTF-8 became U+FFFD
        warnings.warn(f"data {spec!r}: {text.count(chr(0xFFFD)):,} byte sequence(s) that are not UTF-8 were "
                      "replaced by U+FFFD before tokenizing; re-encode the file as UTF-8 to read them as written",
                      UserWarning, stacklevel=2)
    if not text.strip():
        raise DataError(f"data {spec!r}: the file is empty" if not raw else f"data {spec!r}: the file holds only whitespace")
    return LoadedData([text], f"text file {path}", text=True)


def sequences_digest(batches: TokenBatches) -> str:
    """sha256 of the token sequences of ``batches``, in order: the report's data identity
    (``ReportContext.data_digest``) and the LLC section's record of the tokens it sampled."""
    from ..llc.targets import tensor_digest

    return tensor_digest((f"seq{i}", q) for i, q in enumerate(batches.sequences))


def subset_positions(positions: dict) -> dict:
    """The positions record of a prefix of the report's data (the LLC's, the interaction basis's)
    without the counts of the whole data set it inherits (sequences dropped, padding left out), which
    the report's data header gives: as a section's record they differed between runs that sampled the
    same tokens, and a reused section kept another run's (review 50: compare called equal λ̂ other data)."""
    return {k: v for k, v in positions.items() if k not in ("n_dropped", "n_padding")}


def _head(data, n: int):
    """The first ``n`` sequences (or texts, or dataset rows) of ``data`` where that is cheap to take
    before tokenizing; anything else whole (``batches`` cuts after validation)."""
    import torch

    if (isinstance(data, torch.Tensor) and data.ndim == 2) or isinstance(data, list):
        return data[:n]
    if hasattr(data, "select") and hasattr(data, "column_names"):  # a datasets.Dataset
        return data.select(range(min(n, len(data))))
    return data


@dataclass(eq=False)
class ReportContext:
    """Shared inputs of the sections (registry.py).

    ``batches``: the first ``settings.n_sequences`` validated sequences (METHODS §0: which positions
    count is recorded in ``batches.positions``); ``llc_batches``: the first ``llc_sequences`` of them
    cut to ``llc_seq_len`` tokens, one full batch; ``ib_batches``: the first of them cut to
    ``ib_seq_len`` tokens, as many as fit whole in ``ib_tokens`` tokens, in batches of
    ``batch_size``. All are built on first use; the report builds ``batches`` before any section
    runs when a selected section needs data, so bad data fails early.
    """

    label: str
    adapter: ModelAdapter
    settings: ReportSettings
    seed: int = 0
    checkpoint_dir: Path | None = None
    progress: bool = False
    llc_components: object = None
    data: LoadedData | None = None
    summary: dict = field(init=False)
    #: Checkpoint directory of the section now running, named after its fingerprint (cache.py), so
    #: that a rerun with other settings starts afresh instead of meeting a checkpoint it must refuse.
    section_dir: Path | None = None
    #: How many source rows (sequences, texts, dataset rows) ``batches`` reads before cutting: the
    #: memory fit keeps those read before it cut them shorter (None: ``n_sequences``, which then
    #: counts pieces), so that no further row is read and none can change what the data are (review
    #: 34: a later row without BOS turned BOS detection off for all of them).
    source_rows: int | None = None

    def __post_init__(self) -> None:
        self.summary = self.adapter.summary()

    @cached_property
    def batches(self) -> TokenBatches:
        if self.data is None:
            raise DataError(
                f"this section needs data, and none was given for {self.label}; pass data (token ids, strings, a "
                "dataset, or a spec: a .txt/.pt file, a dataset directory, toy:NAME)"
            )
        s = self.settings
        seq_len = s.seq_len
        if seq_len is None and self.data.text:
            seq_len = self.adapter.n_ctx  # one long text: cut into context-sized chunks
        tb = token_batches(_head(self.data.data, self.source_rows or s.n_sequences), self.adapter,
                           batch_size=s.batch_size, seq_len=seq_len)
        if tb.n_sequences > s.n_sequences:
            tb = dataclasses.replace(tb, sequences=tb.sequences[: s.n_sequences])
        return tb

    def _prefix(self, n_sequences: int | None, seq_len: int | None, batch_size: int | None,
                n_tokens: int | None = None) -> TokenBatches:
        """The first ``n_sequences`` of ``batches`` (None: as many as fit whole in ``n_tokens``
        tokens, at least one), each cut to its first ``seq_len`` tokens, in batches of
        ``batch_size`` (None: one full batch)."""
        seqs = self.batches.sequences[:n_sequences]
        if seq_len is not None:
            seqs = [q[:seq_len] for q in seqs]
        if n_tokens is not None:
            # Whole sequences only: a non-causal model (toy:sma) needs all of one length.
            ends = np.cumsum([len(q) for q in seqs])
            seqs = seqs[: max(1, int(np.searchsorted(ends, n_tokens, side="right")))]
        return dataclasses.replace(self.batches, sequences=seqs, batch_size=batch_size or len(seqs))

    @cached_property
    def llc_batches(self) -> TokenBatches:
        s = self.settings
        return self._prefix(s.llc_sequences, s.llc_seq_len, None)

    @cached_property
    def ib_batches(self) -> TokenBatches:
        s = self.settings
        return self._prefix(None, s.ib_seq_len, s.batch_size, n_tokens=s.ib_tokens)

    def fit_memory(self, budget: MemoryBudget, explicit: set[str], sections: list[str]) -> dict:
        """Lower ``seq_len`` and ``batch_size`` (those not in ``explicit``) until one batch of each
        statistics pass of ``sections`` fits ``budget`` (``tld.memory.estimate``): first the
        sequence length, halved down to :data:`MIN_FITTED_SEQ_LEN` (attention grows with its
        square), then the batch size, halved down to 1, then the sequence length below that.
        Changes ``settings`` (and drops the batches built from the old ones); returns what the
        report header states: the budget, the estimate per batch, and the values before and after.
        A pass that still does not fit fails when it starts, with a message saying what to lower.
        A shorter sequence length keeps the data: ``n_sequences`` (which counts sequences after
        cutting) becomes the number of pieces the sequences read so far make (``token_batches``'
        rule: each body cut into pieces of t − 1 tokens behind a BOS where there is one), so the
        sequences are cut shorter, not dropped or joined by others.
        """
        from ..memory import counts_forward_held, counts_held, estimate, hook_width, moment_held

        s = self.settings
        analyses = [(name, a) for name in sections for a in _MEMORY_ANALYSES.get(name, ())]
        if self.adapter.d_mlp is None:
            analyses = [(name, a) for name, a in analyses if a != "neuron_sync"]
        info = {"budget": budget.bytes, "source": budget.source, "batch_size": s.batch_size, "seq_len": s.seq_len}
        if not analyses or self.data is None:
            return info

        # What each pass keeps alive beside one batch, as the passes count it themselves: the counts'
        # Grams (and twins, and the Jacobian pass's split-half Grams), the activations section's Grams.
        widths = [hook_width(self.adapter, kind) for kind in ACTIVATION_HOOKS for _ in range(self.adapter.n_layers)]
        held = {("counts", "jacobian"): counts_held(self.adapter), ("counts", "forward"): counts_forward_held(self.adapter),
                ("activations", "forward"): moment_held(widths),
                # sparsify's MLP-input Grams, whole and half-data (review 38: it was charged the counts')
                ("sparsity", "forward"): moment_held([self.adapter.d_model] * self.adapter.n_layers, half=True)}

        n0, t0 = max(1, self.batches.n_sequences), self.batches.max_len
        # token_batches cuts a sequence's body (BOS left out) into pieces of t − 1 tokens with BOS put
        # back before each: a 1024-token row at t = 256 makes 5 pieces, not 1024/256 = 4 (audit 12a:
        # counting 4 kept the first 80 % of the data and called it the same data).
        extra = 1 if self.batches.bos else 0
        lengths = [len(q) for q in self.batches.sequences]

        def pieces(t: int) -> int:
            """How many sequences the data now read become when cut to ``t`` tokens (a text file's
            chunks are consecutive pieces of one text, cut again as one)."""
            if t >= t0:
                return len(lengths)
            bodies = [n - extra for n in lengths]
            if self.data.text:
                return chunk_count(sum(bodies), t - extra)
            return sum(chunk_count(n, t - extra) for n in bodies)

        def needed(b: int, t: int) -> int:
            # Cut shorter, long sequences become more of them, and batches fill up.
            b = min(b, pieces(t))
            return max(estimate(self.adapter, a, b, t, n_cotangents=s.n_probes, held=held.get((name, a), 0))
                       for name, a in analyses)

        b0 = b = s.batch_size
        t = t0
        free_t, free_b = "seq_len" not in explicit, "batch_size" not in explicit
        while needed(b, t) > budget.bytes:
            if free_t and t > MIN_FITTED_SEQ_LEN:
                t = max(MIN_FITTED_SEQ_LEN, t // 2)
            elif free_b and b > 1:
                b = (b + 1) // 2
            elif free_t and t > 2:
                t = max(2, t // 2)
            else:
                break
        info.update(needed=needed(b, t), fits=needed(b, t) <= budget.bytes,
                    lowered={k: [old, new] for k, old, new in (("batch_size", b0, b), ("seq_len", t0, t)) if old != new})
        if info["lowered"]:
            cut = pieces(t)  # the sequences now read, cut to t tokens: the same data
            if t != t0:
                self.source_rows = self.source_rows or s.n_sequences
            self.update_settings(batch_size=b, seq_len=t if t != t0 else s.seq_len,
                                 n_sequences=cut if t != t0 else s.n_sequences)
            if t != t0:
                info["cut"] = {"n_sequences": [len(lengths), cut]}
            info.update(batch_size=self.settings.batch_size, seq_len=self.settings.seq_len)
        return info

    def update_settings(self, **changes) -> None:
        """Change some settings and drop the batches built from the old ones; the statistics
        batches, when they change, are rebuilt at once (the report's identity and data description
        read them)."""
        self.settings = self.settings.replace(**changes)
        rebuild = "batches" in self.__dict__ and bool(changes.keys() & {"n_sequences", "batch_size", "seq_len"})
        for name in ("batches", "llc_batches", "ib_batches") if rebuild else ("llc_batches", "ib_batches"):
            self.__dict__.pop(name, None)
        if rebuild:
            self.batches  # noqa: B018

    def data_description(self) -> dict | None:
        """Where the data came from and which positions counted (None without data)."""
        if self.data is None:
            return None
        return {"source": self.data.source, "positions": self.batches.positions.to_dict(),
                "n_batches": len(self.batches), "batch_size": self.batches.batch_size}

    def checkpoint(self, *parts: str) -> str | None:
        """A directory under the running section's checkpoint directory (None when not checkpointing)."""
        if self.section_dir is None:
            return None
        return os.fspath(self.section_dir.joinpath(*parts))

    @cached_property
    def model_digest(self) -> str:
        """sha256 of what the model computes with: the live parameters and the buffers (names, dtypes,
        shapes, values), its configuration (the adapter's, and the model's own but for the device)
        and the hooks attached to its hook points (how many, not which functions). The weights alone
        missed a config.json that changed the activation or the rotary base, and a permanent ablation
        hook (audit 20a F1: a rerun reused 2 synchronized neuron blocks where the changed model has 9)."""
        from ..llc.targets import tensor_digest

        model = self.adapter.model
        parts = {
            "parameters": tensor_digest(sorted((p.name, p.param) for p in self.adapter.live_parameters())),
            "buffers": tensor_digest(sorted(model.named_buffers(), key=lambda item: item[0])),
            "config": {"adapter": self.adapter.cfg.to_dict(), "model": _config_items(getattr(model, "cfg", None))},
            # TransformerLens lists the hooks on its hook points (how many, which permanent), not their
            # functions; torch lists those on other modules nowhere public.
            "hooks": sorted(f"{name}: {len(point.fwd_hooks)} forward ({sum(h.is_permanent for h in point.fwd_hooks)} "
                            f"permanent), {len(point.bwd_hooks)} backward"
                            for name, point in getattr(model, "hook_dict", {}).items()
                            if point.fwd_hooks or point.bwd_hooks),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    @cached_property
    def data_digest(self) -> str:
        """sha256 of the token sequences the sections read (in order)."""
        return sequences_digest(self.batches)

    def data_key(self, view: str) -> dict:
        """What a section's result takes from the batches ``view`` (``batches``, ``llc_batches`` or
        ``ib_batches``) it reads: their tokens and the rule for which positions count (METHODS §0),
        not the counts of the data around them, so that a larger ``n_sequences`` leaves the LLC's and
        the interaction basis's keys alone where their prefix is the same (audit 20a F4)."""
        batches = getattr(self, view)
        rule = ("bos", "bos_source", "bos_token_id", "skip_bos", "pad_token_id", "padding_rule", "causal")
        return {"sequences": sequences_digest(batches), **{k: getattr(batches, k) for k in rule}}

    @cached_property
    def source_digest(self) -> str:
        """sha256 of the data set as given, all of it (before the budgets take their share), so
        that reruns with other budgets on the same data agree; for data of other kinds (token
        lists, iterables) the sequences read, :attr:`data_digest`."""
        import torch

        from ..llc.targets import tensor_digest

        data = self.data.data
        if isinstance(data, torch.Tensor):
            return tensor_digest([("tokens", data)])
        texts = [data] if isinstance(data, str) else data
        if isinstance(texts, (list, tuple)) and texts and all(isinstance(x, str) for x in texts):
            return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()
        fingerprint = getattr(data, "_fingerprint", None)  # a datasets.Dataset: the hash of its contents
        if isinstance(fingerprint, str):
            return f"datasets:{fingerprint}"
        return self.data_digest

    def identity(self) -> dict:
        """What this report's numbers belong to (``Report.identity``): the model (label,
        :attr:`model_digest`: its parameters, buffers, configuration and hooks; its dtype, named where
        two runs differ in it), the data set (source,
        :attr:`source_digest`; None when no section read data) and the tl-degeneracy version."""
        from .. import __version__

        data = None
        if self.data is not None and "batches" in self.__dict__:
            data = {"source": self.data.source, "digest": self.source_digest}
        return {"model": {"label": self.label, "digest": self.model_digest,
                          "dtype": str(self.adapter.dtype).removeprefix("torch.")},
                "data": data, "tl-degeneracy": __version__}
