"""Token batches: turn user data into validated, padded, masked batches.

``token_batches(data, model)`` accepts a LongTensor, a list of strings, a Hugging Face
``datasets.Dataset``, a torch ``DataLoader`` (or a list of token sequences) and returns a
:class:`TokenBatches`: a re-iterable, deterministic sequence of :class:`Batch` objects.

Everything is checked *before* anything runs (empty data, non-integer or negative ids, ids ≥
d_vocab, sequences longer than n_ctx), so a long statistics pass never dies half way on bad data.

Positions and samples (METHODS §0): a *sample* is one (sequence, position). ``Batch.mask`` marks the
positions that count as samples: not padding, and not the BOS position when the sequences begin
with a BOS token and ``skip_bos`` is on (the default whenever there is a BOS, because BOS
activations are outliers in pretrained LMs). :attr:`TokenBatches.positions` records the rule, so
every result can say which positions counted.

Padding (METHODS §0: padding positions never count) is recognised as the data are read, and only
the real tokens of each row are kept (:attr:`Positions.padding_rule` says how):

- an attention mask (1 = real token), wherever one can be given: a ``datasets.Dataset`` column, a
  dict batch (e.g. a tokenizer's output), a DataLoader's dict batches, or ``attention_mask=``. The
  mask may pad left or right; each row's real tokens must be one contiguous run;
- a token *tensor* without a mask (the data itself, or a DataLoader's batches): the runs of the pad
  id at the start and at the end of each row (default: the tokenizer's ``pad_token_id``, which is
  what ``model.to_tokens`` pads with, on the right or, with ``padding_side="left"``, on the left).
  A pad id inside a row is a real token; where the pad id is also BOS (GPT-2 in TransformerLens:
  pad = BOS = EOS) and every row begins with it, the last position of the leading run is the row's
  BOS, never padding (where some row does not, the data have no BOS and every leading run is). This
  drops a real first or last token that equals the pad id (GPT-2's EOS), so a
  :class:`PaddingWarning` says how many positions were dropped; ``strip_padding=False`` keeps them;
- strings, token lists and unmasked Dataset rows carry each sequence at its own length: no padding.

Batches are then re-padded on the right. With causal attention and absolute positions counted from
the first token, a position never attends to anything after it, so the activations and logits at
the real positions are exactly those of the unpadded sequence and no attention mask is needed. A
non-causal model (``attention_dir="bidirectional"``: BERT) would attend to that padding, and its
results would depend on the batch size, so it must get batches without padding: sequences of one
length, or ``batch_size=1``; anything else is refused (:func:`check_unpadded`). (The SMA toy's single
query over all positions is non-causal too; its bundled data has a fixed length.)
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .distributed import warn_once
from .errors import DataError
from .models.adapt import adapt

__all__ = ["Batch", "PaddingWarning", "Positions", "TokenBatches", "as_count", "check_unpadded", "chunk_count", "token_batches"]

#: Column names read from a ``datasets.Dataset``, in order of preference.
TOKEN_COLUMNS = ("tokens", "input_ids")
TEXT_COLUMNS = ("text",)
MASK_COLUMN = "attention_mask"


class PaddingWarning(UserWarning):
    """Positions of a token tensor were taken for padding because they hold the pad id."""


@dataclass(frozen=True)
class Positions:
    """Which positions of the data count as samples (METHODS §0), recorded in every result.

    ``bos``: every sequence begins with the BOS token ``bos_token_id``; ``bos_source`` says why
    (``"prepended"`` by :func:`token_batches`, ``"given"`` when the token data already began with it,
    ``None`` when there is no BOS). ``skip_bos``: the BOS position is not a sample.
    ``n_tokens`` counts real (non-padding) positions, ``n_samples`` the positions that count.
    ``padding_rule`` says how padding in the data was recognised (module docstring):
    ``"attention_mask"``, ``"pad_id_runs"`` (runs of ``pad_token_id`` at the start and end of the
    rows of token tensors), both joined by ``+``, or ``"none"`` (the data were read as given);
    ``n_padding`` is the number of positions it left out. ``padding`` is the side the batches are
    padded on.
    """

    bos: bool
    bos_source: str | None
    bos_token_id: int | None
    skip_bos: bool
    padding: str
    pad_token_id: int
    n_sequences: int
    n_tokens: int
    n_samples: int
    n_dropped: int = 0  # sequences left out because no position of theirs would count
    padding_rule: str = "none"
    n_padding: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Batch:
    """One batch: right-padded ``tokens`` [b, p] and the ``mask`` of positions that count.

    ``index`` holds the positions of the batch's sequences in :attr:`TokenBatches.sequences`;
    ``number`` is the batch's place in the iteration order.
    """

    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    index: Int[Tensor, " batch"]
    number: int

    def select(self, keep: Bool[Tensor, " batch"]) -> Batch | None:
        """The batch's sequences where ``keep`` (None where there are none), a batch of their own with
        their masks and places in the data: a half of the data differentiated on its own."""
        if not bool(keep.any()):
            return None
        rows = keep.to(self.tokens.device)
        return Batch(tokens=self.tokens[rows], mask=self.mask[rows], lengths=self.lengths[rows],
                     index=self.index[keep.to(self.index.device)], number=self.number)

    @property
    def n_samples(self) -> int:
        return int(self.mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            tokens=self.tokens.to(device),
            mask=self.mask.to(device),
            lengths=self.lengths.to(device),
            index=self.index,
            number=self.number,
        )


@dataclass
class TokenBatches:
    """Validated token sequences, cut into batches in a fixed (optionally seeded-shuffled) order.

    Re-iterable: every iteration yields the same batches in the same order, on :attr:`device` (the
    model's device when built by :func:`token_batches`). ``len()`` is the number of batches.
    :meth:`batches` with ``rank``/``world_size`` yields the shard ``rank::world_size`` of them, which
    is how the statistics split work across ``torch.distributed`` processes.
    """

    sequences: list[Tensor] = field(repr=False)
    batch_size: int
    bos: bool
    bos_source: str | None
    bos_token_id: int | None
    skip_bos: bool
    pad_token_id: int
    shuffle: bool = False
    seed: int = 0
    source: str = "tokens"
    d_vocab: int | None = None
    device: torch.device | None = None
    n_dropped: int = 0
    padding_rule: str = "none"
    n_padding: int = 0
    #: The model's attention is causal (``adapter.causal``): a position sees nothing after it, so
    #: every sequence's BOS position is the same sample (:attr:`n_distinct_samples`).
    causal: bool = True

    def __post_init__(self) -> None:
        if not self.sequences:
            raise DataError("no sequences to batch (empty data)")
        if self.batch_size < 1:
            raise DataError(f"batch_size must be ≥ 1; got {self.batch_size}")
        n = len(self.sequences)
        if self.shuffle:
            g = torch.Generator().manual_seed(int(self.seed))
            self._order = torch.randperm(n, generator=g)
        else:
            self._order = torch.arange(n)
        self._lengths = torch.tensor([len(s) for s in self.sequences], dtype=torch.long)

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return -(-len(self.sequences) // self.batch_size)

    @property
    def n_sequences(self) -> int:
        return len(self.sequences)

    @property
    def n_tokens(self) -> int:
        return int(self._lengths.sum())

    @property
    def n_samples(self) -> int:
        """Number of token positions that count as samples (padding and, if skipped, BOS excluded)."""
        return self.n_tokens - (self.n_sequences if self.bos and self.skip_bos else 0)

    @property
    def n_distinct_samples(self) -> int:
        """The counted samples that can differ. Under causal attention a position sees its prefix and
        nothing else, so two positions with the same prefix are one sample: every sequence's BOS
        (audit 17a F2: 83 positions of 10 sequences held 74, and a centred Gram at their limit, 73, was
        not flagged as the data's limit), and any shared beginning or repeated sequence (audit 21b F2:
        6 sequences, copies of 2, read 24 distinct positions for 8). Under bidirectional attention a
        position sees its whole sequence, so the positions of repeated sequences are the repeats
        (review 44 M2)."""
        return self._distinct[0]

    def distinct(self, count: int, unit: str) -> int:
        """Of ``count`` samples that a hook of ``unit`` counted over all the sequences, those that can
        differ: a position-level hook's :attr:`n_distinct_samples`, a sequence-level one's distinct
        sequences."""
        samples, sequences = self._distinct
        return count - (self.n_samples - samples if unit == "position" else self.n_sequences - sequences)

    @cached_property
    def _distinct(self) -> tuple[int, int]:
        """(distinct counted samples, distinct sequences): a 64-bit hash of each position's prefix,
        every sequence at once (a multiply–xorshift step per token, a bijection of the hash so far for
        each token), unique among the counted positions of each position (equal prefixes have one
        length) and, with the length, among the whole sequences."""
        n, width = self.n_sequences, self.max_len
        lengths = self._lengths.numpy()
        tokens = np.zeros((n, width), dtype=np.uint64)
        for i, seq in enumerate(self.sequences):
            tokens[i, : len(seq)] = seq.detach().cpu().numpy().astype(np.uint64)
        first = 1 if self.bos and self.skip_bos else 0
        h = np.full(n, 0x243F6A8885A308D3, dtype=np.uint64)
        whole = np.empty(n, dtype=np.uint64)
        per_position = []
        with np.errstate(over="ignore"):
            for p in range(width):
                h = (h ^ tokens[:, p]) * np.uint64(0x9E3779B97F4A7C15)
                h ^= h >> np.uint64(31)
                present = lengths > p
                if self.causal and p >= first:
                    per_position.append(len(np.unique(h[present])))
                whole[lengths == p + 1] = h[lengths == p + 1]
        _, kept = np.unique(np.stack([whole, lengths.astype(np.uint64)], axis=1), axis=0, return_index=True)
        samples = sum(per_position) if self.causal else int(np.maximum(lengths[kept] - first, 0).sum())
        return samples, len(kept)

    @property
    def max_len(self) -> int:
        return int(self._lengths.max())

    @property
    def positions(self) -> Positions:
        return Positions(
            bos=self.bos,
            bos_source=self.bos_source,
            bos_token_id=self.bos_token_id,
            skip_bos=self.skip_bos,
            padding="right",
            pad_token_id=self.pad_token_id,
            n_sequences=self.n_sequences,
            n_tokens=self.n_tokens,
            n_samples=self.n_samples,
            n_dropped=self.n_dropped,
            padding_rule=self.padding_rule,
            n_padding=self.n_padding,
        )

    def __repr__(self) -> str:
        return (
            f"TokenBatches(n_sequences={self.n_sequences}, n_batches={len(self)}, batch_size={self.batch_size}, "
            f"max_len={self.max_len}, n_samples={self.n_samples}, bos={self.bos}, skip_bos={self.skip_bos}, "
            f"shuffle={self.shuffle}, source={self.source!r})"
        )

    # ------------------------------------------------------------------ batches
    def batch(self, number: int, device: torch.device | str | None = None) -> Batch:
        """Batch ``number`` of the iteration order (random access), on ``device`` (default: :attr:`device`)."""
        if not 0 <= number < len(self):
            raise IndexError(f"batch {number} out of range for {len(self)} batches")
        index = self._order[number * self.batch_size : (number + 1) * self.batch_size]
        lengths = self._lengths[index]
        width = int(lengths.max())
        tokens = torch.full((len(index), width), self.pad_token_id, dtype=torch.long)
        for row, i in enumerate(index.tolist()):
            seq = self.sequences[i]
            tokens[row, : len(seq)] = seq
        mask = torch.arange(width)[None, :] < lengths[:, None]
        if self.bos and self.skip_bos:
            mask[:, 0] = False
        out = Batch(tokens=tokens, mask=mask, lengths=lengths, index=index, number=number)
        device = device if device is not None else self.device
        return out.to(device) if device is not None else out

    def batches(self, rank: int = 0, world_size: int = 1, device: torch.device | str | None = None) -> Iterator[Batch]:
        """Yield the batches ``rank, rank + world_size, …`` (all of them by default)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank}")
        for number in range(rank, len(self), world_size):
            yield self.batch(number, device=device)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()


# ---------------------------------------------------------------------------------------------
# conversion of each accepted input type to a list of 1-D token tensors (or strings)


def _is_hf_dataset(data) -> bool:
    return type(data).__module__.split(".")[0] == "datasets"


def _check_integer(t: Tensor, where: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise DataError(f"token ids must be integers; {where} has dtype {t.dtype} (convert with .long())")


def _check_mask(t: Tensor, where: str) -> None:
    if t.dtype != torch.bool and not bool(((t == 0) | (t == 1)).all()):
        bad = t[(t != 0) & (t != 1)].unique()[:5].tolist()
        raise DataError(f"{where} must hold 1 (real token) or 0 (padding); it also holds {bad}")


#: What a row holds → (its name in errors, the check of a tensor of it, the dtype it is kept in).
_ROW_KINDS = {False: ("token ids", _check_integer, torch.long), True: ("attention mask values", _check_mask, torch.bool)}


def _as_row(x, where: str, mask: bool = False) -> Tensor:
    """A 1-D CPU tensor (int64 token ids, or bool for an attention ``mask``) from a tensor or a
    sequence, with a clear error for anything else."""
    what, check, dtype = _ROW_KINDS[mask]
    if isinstance(x, Tensor):
        t = x
    elif isinstance(x, Sequence) and len(x) == 0:
        t = torch.zeros(0, dtype=torch.long)
    else:
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise DataError(f"{where} is not a sequence of {what} ({type(x).__name__}): {e}") from None
    check(t, where)
    if t.ndim != 1:
        raise DataError(f"{where} must be a 1-D sequence of {what}; got shape {tuple(t.shape)}")
    return t.detach().to("cpu", dtype)


def _rows(x, where: str, mask: bool = False) -> list[Tensor]:
    """The 1-D rows (as :func:`_as_row` makes them) of a tensor [batch, pos] or [pos], or of a
    sequence of sequences, ragged allowed (a Dataset column, a list of lists)."""
    if isinstance(x, Tensor):
        _, check, dtype = _ROW_KINDS[mask]
        check(x, where)
        t = x[None] if x.ndim == 1 else x
        if t.ndim != 2:
            raise DataError(f"{where} must be [batch, pos] or [pos]; got shape {tuple(x.shape)}")
        return list(t.detach().to("cpu", dtype).unbind(0))
    if not isinstance(x, Iterable) or isinstance(x, (str, bytes)):
        raise DataError(f"{where} is a {type(x).__name__}; expected a tensor [batch, pos] or a list of sequences")
    items = list(x)
    if items and not (isinstance(items[0], Sequence) or getattr(items[0], "ndim", 0)):
        items = [items]  # one flat sequence is one row
    return [_as_row(v, f"{where} row {i}", mask) for i, v in enumerate(items)]


def _describe(rows: list[Tensor]) -> str:
    lengths = sorted({len(r) for r in rows})
    if len(lengths) <= 1:
        return f"shape {(len(rows), lengths[0] if lengths else 0)}"
    return f"{len(rows)} rows of lengths {lengths[0]}..{lengths[-1]}"


@dataclass
class _Padding:
    """How padding is recognised while the data are read (module docstring), and what it found.

    ``pad_id``: in token tensors without a mask, the runs of it at the start and at the end of each
    row are padding (None: not looked for); ``keep_first``: the pad id is also BOS, so the last
    position of the leading run (a row's first one, when it is padded on the right) is its BOS,
    never padding — provided every row begins with it (:meth:`settled`). The counts and
    :attr:`rule` go into :class:`Positions`.
    """

    pad_id: int | None
    keep_first: bool
    rules: set[str] = field(default_factory=set)
    n_padding: int = 0  # positions left out, by either rule
    n_pad_id: int = 0  # positions left out as pad ids
    rows_pad_id: int = 0  # rows that had some
    rows_unmasked: int = 0  # rows searched for pad ids
    # rows whose leading run's last position was kept as BOS: (row, positions before it, positions dropped)
    kept: list[tuple[Tensor, int, int]] = field(default_factory=list)

    @property
    def rule(self) -> str:
        return "+".join(sorted(self.rules)) or "none"

    def masked(self, rows: list[Tensor], mask, where: str) -> list[Tensor]:
        """The real tokens of each row: the positions where ``mask`` (1 = real token) is set.

        The one place where attention masks are read (Dataset column, dict batches, DataLoader
        dicts, ``attention_mask=``). Collators pad on either side; the real tokens must be one
        contiguous run, as a gap would join tokens that were never next to each other.
        """
        masks = _rows(mask, where, mask=True)
        if [len(m) for m in masks] != [len(r) for r in rows]:
            raise DataError(f"{where} does not fit the tokens: it has {_describe(masks)}, the tokens {_describe(rows)}")
        out = []
        for i, (row, m) in enumerate(zip(rows, masks)):
            real = m.nonzero()[:, 0]
            if len(real) and int(real[-1] - real[0]) + 1 != len(real):
                raise DataError(
                    f"{where} row {i} marks real tokens at positions {real.tolist()[:12]}, which are not one contiguous "
                    "run; only padding on the left or the right can be left out"
                )
            out.append(row[int(real[0]) : int(real[-1]) + 1] if len(real) else row[:0])
        self.rules.add("attention_mask")
        self.n_padding += sum(len(r) for r in rows) - sum(len(r) for r in out)
        return out

    def unpadded(self, rows: list[Tensor]) -> list[Tensor]:
        """Rows of a token tensor without a mask, each without the runs of ``pad_id`` at its start
        and end: padding on the right (``to_tokens``) or on the left (``padding_side="left"``), one
        rule for both sides. A pad id between real tokens is a real token; with ``keep_first``
        the position before the first other id is the BOS (an all-pad row keeps one, its BOS)."""
        if self.pad_id is None:
            return rows
        out = []
        for row in rows:
            real = (row != self.pad_id).nonzero()[:, 0]
            start, end = (int(real[0]), int(real[-1]) + 1) if len(real) else (len(row), len(row))
            kept = self.keep_first and start > 0
            if kept:
                start -= 1
                end = max(end, start + 1)
            out.append(row[start:end])
            if kept:
                self.kept.append((out[-1], start, len(row) - len(out[-1])))
        dropped = [len(r) - len(o) for r, o in zip(rows, out)]
        self.rules.add("pad_id_runs")
        self.n_padding += sum(dropped)
        self.n_pad_id += sum(dropped)
        self.rows_pad_id += sum(d > 0 for d in dropped)
        self.rows_unmasked += len(rows)
        return out

    def settled(self, rows: list[Tensor]) -> list[Tensor]:
        """``rows`` (all of the data's, once read) without the kept BOS positions where not every row
        begins with the pad id: then the data have no BOS, and a leading run is padding to its end
        (audit 18a F1: a left-padded GPT-2 tensor without BOS kept one pad per padded row as a token,
        in the context of every real one, and counted it as a sample)."""
        if not self.kept or all(len(r) and int(r[0]) == self.pad_id for r in rows):
            return rows
        kept = {id(row) for row, _, _ in self.kept}
        self.n_padding += len(kept)
        self.n_pad_id += len(kept)
        self.rows_pad_id += sum(dropped == 0 for _, _, dropped in self.kept)
        self.kept = []
        return [r[1:] if id(r) in kept else r for r in rows]

    @property
    def bos_after_padding(self) -> int:
        """Rows padded on the left whose leading run's last position was kept as their BOS."""
        return sum(before > 0 for _, before, _ in self.kept)


def _rows_from_mapping(item: Mapping, where: str, padding: _Padding) -> list[Tensor]:
    """Token rows of a dict batch (or of a Dataset's columns): only the real tokens where it has an
    attention mask; without one, a token *tensor* is a padded batch (:meth:`_Padding.unpadded`),
    while lists (and Dataset columns) hold each sequence at its own length."""
    for col in TOKEN_COLUMNS:
        if col in item:
            rows = _rows(item[col], f"{where}[{col!r}]")
            if MASK_COLUMN in item:
                return padding.masked(rows, item[MASK_COLUMN], f"{where}[{MASK_COLUMN!r}]")
            return padding.unpadded(rows) if isinstance(item[col], Tensor) else rows
    raise DataError(f"{where} is a mapping without a token column; expected one of {TOKEN_COLUMNS}, got keys {sorted(item)}")


def _rows_from_dataloader(loader, padding: _Padding) -> list[Tensor]:
    rows: list[Tensor] = []
    for i, item in enumerate(loader):
        where = f"DataLoader batch {i}"
        if isinstance(item, Mapping):
            rows.extend(_rows_from_mapping(item, where, padding))
        elif isinstance(item, Tensor):
            rows.extend(padding.unpadded(_rows(item, where)))
        elif isinstance(item, (list, tuple)) and item and isinstance(item[0], Tensor):
            # TensorDataset yields a list of tensors per batch; the first one holds the tokens.
            rows.extend(padding.unpadded(_rows(item[0], where + "[0]")))
        else:
            raise DataError(f"{where} is a {type(item).__name__}; expected a LongTensor [batch, pos] or a dict with {TOKEN_COLUMNS}")
    return rows


def _without_empty(rows: list[Tensor]) -> tuple[list[Tensor], int]:
    """The rows that hold a token, and how many held none (all padding, an all-zero mask, ``[]``, an
    empty string). Such a row is no sequence: deciding BOS over it turned BOS off for all the data
    (audit 23a F1: every BOS position counted), and prepending BOS to it made a one-token sequence that
    the callers counting BOS took as a sample (review 56 #1)."""
    kept = [r for r in rows if len(r)]
    return kept, len(rows) - len(kept)


def _warn_padded_columns(rows: list[Tensor], pad_id: int | None, col: str) -> None:
    """Unmasked Dataset rows are taken at their length (module docstring); rows of one length of
    which some end in a run of the pad id look padded, and their padding would count as tokens
    (audit 23a F5: 273 samples for 179, without a word). ``pad_id`` None: not looked for, also where
    the pad id is a real token too (BOS or EOS: packed GPT-2 text ends a chunk with EOS EOS after an
    empty document, review 56 #4)."""
    if pad_id is None or len(rows) < 2 or len({len(r) for r in rows}) > 1:
        return
    padded = sum(len(r) >= 2 and bool((r[-2:] == pad_id).all()) for r in rows)
    if padded:
        warn_once(f"token_batches: the Dataset's {len(rows)} {col!r} rows all have {len(rows[0])} tokens and {padded} of "
                  f"them end in a run of the pad id {pad_id}, with no {MASK_COLUMN!r} column: every position counts as a "
                  f"token, padding included; add the tokenizer's {MASK_COLUMN!r} column, or pass torch.tensor(ds[{col!r}]) "
                  "to leave the runs out", PaddingWarning, stacklevel=4)


def _from_hf_dataset(ds, padding: _Padding, special: set[int]) -> tuple[list[Tensor] | None, list[str] | None, str]:
    if not hasattr(ds, "column_names") or isinstance(ds.column_names, dict):
        raise DataError(f"got a {type(ds).__name__}; pass one split of it (e.g. ds['train']), a datasets.Dataset")
    cols = list(ds.column_names)
    for col in TOKEN_COLUMNS:
        if col in cols:
            item = {c: ds[c] for c in (col, MASK_COLUMN) if c in cols}
            rows = _rows_from_mapping(item, "the Dataset", padding)
            if MASK_COLUMN not in cols:
                _warn_padded_columns(rows, None if padding.pad_id in special else padding.pad_id, col)
            return rows, None, f"datasets.Dataset[{col}]"
    for col in TEXT_COLUMNS:
        if col in cols:
            return None, list(ds[col]), f"datasets.Dataset[{col}]"
    raise DataError(f"the Dataset has columns {cols}; expected a token column {TOKEN_COLUMNS} or a text column {TEXT_COLUMNS}")


# ---------------------------------------------------------------------------------------------


def chunk_count(length: int, piece: int) -> int:
    """How many pieces :func:`token_batches` cuts a body (BOS left out) of ``length`` tokens into at
    ``piece`` tokens each (``seq_len`` less one where each piece gets a BOS): at least one, an empty
    body too. The report's memory fit counts with it what a shorter cut makes of the data."""
    return max(1, -(-int(length) // int(piece)))


def _chunk(seq: Tensor, bos_id: int | None, piece: int) -> list[Tensor]:
    """Cut ``seq`` (without BOS) into pieces of ``piece`` tokens, each led by BOS if ``bos_id`` is set."""
    out = []
    for k in range(chunk_count(len(seq), piece)):
        body = seq[k * piece : (k + 1) * piece]
        out.append(torch.cat([body.new_tensor([bos_id]), body]) if bos_id is not None else body)
    return out


def _validate_ids(rows: list[Tensor], d_vocab: int, source: str) -> None:
    if not rows:
        return
    flat = torch.cat(rows)
    if flat.numel() == 0:
        return
    lo, hi = int(flat.min()), int(flat.max())
    if lo >= 0 and hi < d_vocab:
        return
    for i, r in enumerate(rows):
        bad = ((r < 0) | (r >= d_vocab)).nonzero()
        if len(bad):
            p = int(bad[0, 0])
            kind = "negative token id" if int(r[p]) < 0 else "token id"
            raise DataError(
                f"{kind} {int(r[p])} at sequence {i}, position {p} of the {source} data is outside the model's "
                f"vocabulary [0, {d_vocab}) (ids seen: [{lo}, {hi}]); was the data tokenized for another model?"
            )


def as_count(value, name: str, what: str, least: int = 1) -> int:
    """``value`` as a count ≥ ``least``: ints and numpy integers; floats (2.5 is refused, not truncated)
    and bools (True is not 1 sequence or token) are refused with a DataError naming ``name``."""
    try:
        size = operator.index(value)
    except TypeError:
        size = None
    if size is None or isinstance(value, bool) or size < least:
        raise DataError(f"{name} must be an integer ≥ {least} ({what}); got {value!r}")
    return size


def as_seed(value, name: str = "seed") -> int:
    """``value`` as a seed of torch's generators, an integer in [0, 2⁶³) (ints and numpy integers), or
    a ValueError naming ``name`` (audit 16b F6: 2⁶⁴ failed inside torch with "Overflow when unpacking
    long long"; audit 19a: "a" with int()'s bare message)."""
    try:
        seed = operator.index(value)
    except TypeError:
        seed = None
    if seed is None or isinstance(value, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"{name} must be an integer in [0, 2**63); got {value!r}")
    return seed


def check_unpadded(lengths: Sequence[int], batch_size: int, adapter) -> None:
    """DataError where a non-causal model (``adapter.causal`` False) would get padded batches:
    sequences of more than one length with ``batch_size`` > 1 (module docstring)."""
    if adapter.causal or batch_size == 1 or len(set(lengths)) <= 1:
        return
    raise DataError(
        f"this {type(adapter.model).__name__} is not causal (bidirectional attention, as in BERT): every position "
        f"attends to every other one of its sequence, and these {len(lengths)} sequences have lengths "
        f"{min(lengths)}..{max(lengths)}, so batches would be padded and the real tokens would attend to the padding "
        "(results would change with batch_size). Give sequences of one length, or pass batch_size=1"
    )


def token_batches(
    data,
    model,
    batch_size: int = 32,
    seq_len: int | None = None,
    prepend_bos: bool | None = None,
    skip_bos: bool | None = None,
    shuffle: bool = False,
    seed: int = 0,
    pad_token_id: int | None = None,
    attention_mask=None,
    strip_padding: bool = True,
) -> TokenBatches:
    """Validated, right-padded, masked batches of ``data`` for ``model``.

    Args:
        data: a LongTensor [batch, pos] or [pos]; a list of strings (tokenized with the model's
            tokenizer, or as UTF-8 bytes for byte-level models with d_vocab 256); a list of token-id
            sequences (ragged allowed); a dict with ``tokens``/``input_ids`` and optionally
            ``attention_mask`` (e.g. a tokenizer's output); a Hugging Face ``datasets.Dataset`` with a
            ``tokens``/``input_ids`` column (and optionally ``attention_mask``) or a ``text`` column;
            a torch ``DataLoader`` yielding LongTensors or such dicts (it is read once, up front, so
            that everything is validated before any model runs); or a :class:`TokenBatches`,
            returned as it is but for ``causal``, which the model decides. Padding in the data never counts (module docstring).
        model: the model or its adapter (``tld.adapt(model)``).
        batch_size: sequences per batch.
        seq_len: if set, sequences longer than ``seq_len`` are cut into consecutive chunks of at most
            ``seq_len`` tokens (BOS included, re-prepended to each chunk when there is one). If unset,
            a sequence longer than the model's n_ctx is an error.
        prepend_bos: strings: whether to start each sequence with BOS (default: the model's
            ``default_prepend_bos``). Token ids: ``True`` makes every sequence start with BOS (added
            where missing), ``False`` treats the ids as they are (no BOS position), ``None`` (default)
            sees a BOS when every sequence already begins with the model's ``bos_token_id``.
        skip_bos: whether the BOS position is excluded from the samples (default: yes, when the
            sequences begin with BOS; METHODS §0). ``True`` without a BOS is an error.
        shuffle, seed: a fixed order drawn from ``seed`` (the same on every iteration).
        pad_token_id: the id written into padding (it never counts). In token tensors without a
            mask, the runs of it at the start and at the end of each row are padding, so left- and
            right-padded tensors give the same batches (where it is also BOS, the last position of
            the leading run is the row's BOS). Default: the tokenizer's pad id (recognised as
            padding, with a :class:`PaddingWarning` saying how many positions that dropped), else
            BOS, else 0 (written into padding only: without a tokenizer, no id is taken for padding
            unless given here).
        attention_mask: for a token tensor or token lists, which positions are real tokens (1) and
            which padding (0), of the same shape; padding on either side. It replaces the pad-id
            rule. Dicts, Datasets and DataLoaders carry theirs as an ``attention_mask`` key/column.
        strip_padding: ``False`` takes token tensors without a mask as they are: no id is
            recognised as padding (``pad_token_id`` is then only written into padding).

    Raises:
        DataError: empty data, non-integer or out-of-vocabulary ids (naming the id and where),
            sequences longer than n_ctx without ``seq_len``, an attention mask that does not fit
            the tokens (shape, values other than 0/1, real tokens not one contiguous run), a
            ``batch_size`` that is not a positive integer, sequences of several lengths in batches
            of a non-causal model (:func:`check_unpadded`).
    """
    adapter = adapt(model)
    if isinstance(data, TokenBatches):
        if attention_mask is not None:
            raise DataError("attention_mask= cannot apply to a TokenBatches: its padding was already left out")
        check_unpadded([len(s) for s in data.sequences], data.batch_size, adapter)
        # One built by hand says causal unless told (review 45 L4): the model decides.
        return data if data.causal == adapter.causal else replace(data, causal=bool(adapter.causal))
    batch_size = as_count(batch_size, "batch_size", "sequences per batch")
    seed = as_seed(seed)
    cfg = adapter.cfg
    bos_id = adapter.bos_token_id

    # --- 1. read the data into token rows (or strings), leaving padding out
    pad_id = pad_token_id if pad_token_id is not None else adapter.pad_token_id
    padding = _Padding(pad_id if strip_padding else None, keep_first=pad_id is not None and pad_id == bos_id)
    rows: list[Tensor] | None = None
    texts: list[str] | None = None
    if isinstance(data, Tensor):
        rows, source = _rows(data, "the token tensor"), "tensor"
        rows = padding.masked(rows, attention_mask, "attention_mask") if attention_mask is not None else padding.unpadded(rows)
    elif _is_hf_dataset(data):
        eos_id = getattr(getattr(adapter.model, "tokenizer", None), "eos_token_id", None)
        rows, texts, source = _from_hf_dataset(data, padding, {bos_id, eos_id} - {None})
    elif isinstance(data, torch.utils.data.DataLoader):
        rows, source = _rows_from_dataloader(data, padding), "DataLoader"
    elif isinstance(data, Mapping):
        rows, source = _rows_from_mapping(data, "the dict", padding), "dict"
    elif isinstance(data, str):
        raise DataError("got a single string; pass a list of strings")
    elif isinstance(data, Sequence):
        if len(data) and all(isinstance(x, str) for x in data):
            texts, source = list(data), "strings"
        elif any(isinstance(x, str) for x in data):
            raise DataError("a list mixing strings and other items; pass either strings or token-id sequences")
        elif any(isinstance(x, Tensor) and x.ndim != 1 for x in data):
            shapes = [tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in data][:4]
            raise DataError(
                f"got a {type(data).__name__} of tensors with shapes {shapes}; pass the token tensor [batch, pos] "
                "itself (e.g. tokens, not (tokens, labels)), or a list of 1-D token sequences"
            )
        else:
            rows, source = [_as_row(x, f"sequence {i}") for i, x in enumerate(data)], "token lists"
            if attention_mask is not None:
                rows = padding.masked(rows, attention_mask, "attention_mask")
    else:
        raise DataError(
            f"cannot use a {type(data).__module__}.{type(data).__name__} as data; pass a LongTensor [batch, pos], a "
            "list of strings, a dict of token ids, a datasets.Dataset, a DataLoader, or a TokenBatches"
        )
    if attention_mask is not None and source not in ("tensor", "token lists"):
        raise DataError(
            f"attention_mask= applies to a token tensor or token lists, not to {source} data; a dict, Dataset or "
            f"DataLoader carries its mask as an {MASK_COLUMN!r} key or column"
        )
    rows = None if rows is None else padding.settled(rows)
    if padding.n_pad_id and pad_token_id is None:
        kept = padding.bos_after_padding
        warn_once(
            f"token_batches: {padding.n_pad_id} positions at the ends of {padding.rows_pad_id} of {padding.rows_unmasked} "
            f"token rows hold the tokenizer's pad id {pad_id} and were left out as padding"
            + (f" (the last of the leading run of {kept} row(s) was kept as its BOS: the pad id is also BOS and every "
               "row begins with it)" if kept else "")
            + "; pass strip_padding=False to count them, or attention_mask= to say which positions are real",
            PaddingWarning,
            stacklevel=2,
        )
    if (rows is not None and not rows) or (texts is not None and not texts):
        raise DataError(f"the {source} data is empty")

    # --- 2. BOS: strings get it from the model's default, token ids keep or ensure it
    if texts is not None:
        encode, how = adapter.text_encoder()
        source = f"{source} ({how})"
        rows = [torch.tensor(encode(s), dtype=torch.long) for s in texts]
        rows, n_empty = _without_empty(rows)
        bos = cfg.default_prepend_bos if prepend_bos is None else bool(prepend_bos)
        if bos and bos_id is None:
            raise DataError("prepend_bos=True but the model has no bos_token_id")
        bos_source = "prepended" if bos else None
        bodies = rows
    else:
        rows, n_empty = _without_empty(rows)
        starts_bos = bos_id is not None and bool(rows) and all(int(r[0]) == bos_id for r in rows)
        if prepend_bos is None:
            bos, bos_source = starts_bos, ("given" if starts_bos else None)
        elif prepend_bos:
            if bos_id is None:
                raise DataError("prepend_bos=True but the model has no bos_token_id")
            bos, bos_source = True, ("given" if starts_bos else "prepended")
        else:
            bos, bos_source = False, None
        bodies = [r[1:] if bos and len(r) and int(r[0]) == bos_id else r for r in rows]
    if skip_bos is None:
        skip_bos = bos
    elif skip_bos and not bos:
        raise DataError(
            "skip_bos=True, but the sequences do not begin with a BOS token "
            f"(prepend_bos={prepend_bos}, bos_token_id={bos_id}); "
            + ("pass prepend_bos=True or leave skip_bos unset" if bos_id is not None else
               "the model has no BOS token, so leave skip_bos unset")
        )

    # --- 3. lengths: chunk to seq_len, or refuse sequences longer than n_ctx
    extra = 1 if bos else 0
    if seq_len is not None:
        seq_len = as_count(seq_len, "seq_len", "tokens per chunk" + (", BOS + 1 token at least" if bos else ""), 1 + extra)
        if seq_len > cfg.n_ctx:
            raise DataError(f"seq_len={seq_len} is longer than the model's context n_ctx={cfg.n_ctx}")
        seqs = [c for b in bodies for c in _chunk(b, bos_id if bos else None, seq_len - extra)]
    else:
        seqs = [torch.cat([b.new_tensor([bos_id]), b]) if bos else b for b in bodies]
        lengths = torch.tensor([len(s) for s in seqs])
        if len(lengths) and int(lengths.max()) > cfg.n_ctx:
            i = int(lengths.argmax())
            raise DataError(
                f"sequence {i} has {int(lengths[i])} tokens{' (BOS included)' if bos else ''}, more than the model's "
                f"n_ctx={cfg.n_ctx}; pass seq_len= (≤ {cfg.n_ctx}; degeneracy_report: overrides={{'seq_len': N}}; the command "
                "line: --seq-len N) to cut long sequences into chunks, or use shorter data"
            )

    # --- 4. ids in range (the pad id too), and something left to count
    _validate_ids(seqs, cfg.d_vocab, source)
    if pad_token_id is None:
        pad_token_id = adapter.pad_token_id
        if pad_token_id is None:
            pad_token_id = bos_id if bos_id is not None else 0
    if not 0 <= int(pad_token_id) < cfg.d_vocab:
        raise DataError(f"pad_token_id={pad_token_id} is outside the vocabulary [0, {cfg.d_vocab})")
    n_min = 2 if bos and skip_bos else 1
    kept = [s for s in seqs if len(s) >= n_min]
    if not kept:
        raise DataError(
            f"the {source} data has no position to count: every sequence is empty"
            + (" or holds only BOS (skip_bos=True)" if bos and skip_bos else "")
        )
    check_unpadded([len(s) for s in kept], batch_size, adapter)
    return TokenBatches(
        sequences=kept,
        batch_size=batch_size,
        bos=bos,
        bos_source=bos_source,
        bos_token_id=bos_id if bos else None,
        skip_bos=bool(skip_bos),
        pad_token_id=int(pad_token_id),
        shuffle=bool(shuffle),
        seed=seed,
        source=source,
        d_vocab=cfg.d_vocab,
        device=adapter.device,
        n_dropped=n_empty + len(seqs) - len(kept),
        padding_rule=padding.rule,
        n_padding=padding.n_padding,
        causal=bool(adapter.causal),
    )

