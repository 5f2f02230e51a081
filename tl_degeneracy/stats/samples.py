"""Which rows of a hooked activation are samples (METHODS §0).

A sample is one (sequence, position). An activation's position axis (axis 1: ``[batch, pos, …]``,
TransformerLens layout for every non-pattern hook) is matched against the batch's tokens:

- same length as the tokens → one sample per position marked in the batch's mask (padding and,
  when skipped, BOS left out): unit ``"position"``;
- length 1 (e.g. the SMA toy's post-attention activations and logits, one query per sequence) →
  one sample per sequence, counted when the sequence has any position in the mask: unit
  ``"sequence"``;
- anything else is an error naming the hook.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Bool
from torch import Tensor

from ..data import Batch

__all__ = ["SampleIndex"]

UNITS = ("position", "sequence")


@dataclass
class SampleIndex:
    """The sample mask of one batch, at token and at sequence level."""

    mask: Bool[Tensor, "batch pos"]
    seq_mask: Bool[Tensor, " batch"]
    n_positions: int
    n_sequences: int
    all_positions: bool  # every position counts: rows are a reshape, no gather
    even: Bool[Tensor, " batch"] | None = None  # the sequence's place in the data is even: the first half

    @classmethod
    def from_batch(cls, batch: Batch) -> SampleIndex:
        mask = batch.mask
        seq_mask = mask.any(1)
        n_pos = int(mask.sum())
        even = (batch.index % 2 == 0).to(mask.device)
        return cls(mask, seq_mask, n_pos, int(seq_mask.sum()), n_pos == mask.numel(), even)

    def half(self, unit: str) -> Bool[Tensor, " n"]:
        """Which of :meth:`rows`' rows belong to the data's even-numbered sequences: a half of the
        data, the same whatever the batching and the ranks, for split-half checks of whether a rank
        still grows with the data (``degeneracy_counts``' ``data_limited``)."""
        if unit == "sequence":
            return self.even[self.seq_mask]
        return self.even[:, None].expand_as(self.mask)[self.mask]

    def unit(self, act_shape: tuple[int, ...], name: str, lead: int = 0) -> str:
        """``"position"`` or ``"sequence"`` for an activation of ``act_shape`` (after ``lead``
        leading axes, e.g. a probe axis), or a ValueError saying why neither fits."""
        b, p = self.mask.shape
        shape = act_shape[lead:]
        if len(shape) < 2 or shape[0] != b:
            raise ValueError(
                f"hook {name!r} gave an activation of shape {tuple(act_shape)}; expected [batch={b}, pos, …] "
                "(a batch axis first and a position axis second)"
            )
        if shape[1] == p:
            return "position"
        if shape[1] == 1:
            return "sequence"
        raise ValueError(
            f"hook {name!r} has a position axis of length {shape[1]}, but the tokens have {p} positions; "
            "statistics need one activation per token position or one per sequence (length 1)"
        )

    def count(self, unit: str) -> int:
        return self.n_positions if unit == "position" else self.n_sequences

    def rows(self, act: Tensor, unit: str, lead: int = 0) -> Tensor:
        """The sample rows of ``act`` [*lead, batch, pos, *feature] → [*lead, n, *feature]."""
        if unit == "sequence":
            sel = act.select(lead + 1, 0)
            idx = (slice(None),) * lead + (self.seq_mask,)
            return sel if self.n_sequences == self.seq_mask.numel() else sel[idx]
        if self.all_positions:
            return act.flatten(lead, lead + 1)
        return act[(slice(None),) * lead + (self.mask,)]
