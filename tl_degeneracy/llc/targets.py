"""What the sampler samples: a model's parameters θ = θ* + δ, its batches and its behavioral loss.

A *target* hands the sampler the reference parameters θ*, a fixed list of batches, and
``loss(deltas, b)``: the behavioral loss L_B,b(θ* + δ_c) of every chain c on batch b, in one
chain-batched computation (differentiable in δ). ``loss`` is ``loss_on(deltas, *batch_tensors(b))``:
a batch's tensors (inputs, reference outputs, sample mask) are looked up first, so the loss itself
is a function of tensors alone, which ``torch.compile`` can trace once for every batch of one shape
(loss_grad.py). Every forward goes through the model's engine (models/engine.py):
``engine.forward`` for the reference outputs, ``engine.perturbed_forward(deltas, inputs,
chains=True)`` (leak-free, eval mode, vmapped over the chain axis) for the chains. The two kinds of
target differ only in their data, as the two kinds of model (``model_kind``) do:

* :class:`TransformerTarget` – TransformerLens models and the bundled toys, on token data;
* :class:`ModuleTarget` – any other ``nn.Module`` mapping an input tensor to an output tensor.

Weighting (METHODS §1). L_B is the mean of the per-sample divergence over every counted position
of the whole dataset: N positions in ``n_batches`` batches, n_b of them in batch b (padding and a
skipped BOS never count). ``loss(deltas, b)`` is batch b's estimate of it,

    L_B,b = (Σ over the n_b counted positions of b of the divergence) / n̄,    n̄ = N / n_batches,

divided by the mean count per batch n̄, not by n_b. Its mean over the batches of one cycle is
exactly L_B = Σ divergence / N, so ragged batches (sequences of different lengths, a short last
batch) give the same L_B as one full batch, and so does its expectation when b is drawn uniformly
from the cycle; dividing by n_b would make the cycle mean a mean of batch means, which weights the
positions of short batches up. With equal counts per batch (fixed-length sequences, full batches)
n_b = n̄ and L_B,b is the batch mean; with one batch it is L_B itself. ``mean_loss`` is the
position-weighted mean over a set of batches (by default all: the dataset's L_B).

The weighting fixes L_B, not the dynamics: batch b's loss carries the weight w_b = n_b/n̄, so its
SGLD step meets w_b times the curvature of L_B, and the largest batch w_max = max_b n_b/n̄ times
(``largest_batch_weight``). The step-size rule and its bias bound use the stiffest batch's curvature
and the spread of the batches' gradients, of which the weights are part (stepsize.py; METHODS §1,
"Step size"), and a run whose w_max exceeds :data:`RAGGED_WEIGHT` warns
(``ragged_warning``), since its λ̂ depends on how the data were split.

Reference outputs f_θ*(x) are computed from the frozen θ* under ``no_grad`` when a batch is first
needed and kept while the cache stays within ``cache_bytes``; beyond that they are recomputed per
step (one extra forward pass).
"""

from __future__ import annotations

import abc
import functools
import hashlib
import math
from collections.abc import Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..autograd import ordinary
from ..errors import DataError
from ..models.adapt import model_kind
from ..models.engine import Engine, engine_for
from ..numerics import compute_dtype
from .losses import LOSSES, masked_sum, per_sample_loss, reference_form

#: Default memory budget for cached reference outputs (log-probabilities for kl).
DEFAULT_CACHE_BYTES = 256 * 2**20
#: Largest-batch weight w_max = max_b n_b/n̄ above which a run warns (``ragged_warning``): with batches
#: (999, 1) of a linear regression (w_max = 2) λ̂ at a fixed η rose by 5 standard errors (+4 %).
RAGGED_WEIGHT = 1.2


def tensor_digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of each tensor, in the order given.

    Bytes are read on the CPU, so the digest identifies values, not where they live; names, dtypes
    and shapes enter too, so equal bytes under another layout give another digest.
    """
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # A uint8 view reads any dtype's bytes (bfloat16 included, which numpy cannot hold).
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def make_target(model, data, loss: str | None, batch_size: int | None, cache_bytes: int = DEFAULT_CACHE_BYTES) -> SamplingTarget:
    """The sampling target for ``model`` on ``data``: by :func:`model_kind`, a transformer's (default
    loss kl: outputs are logits) or a plain module's (default loss mse)."""
    if model_kind(model) == "transformer":
        return TransformerTarget(engine_for(model), data, loss or "kl", batch_size, cache_bytes)
    return ModuleTarget(engine_for(model), data, loss or "mse", batch_size, cache_bytes)


class SamplingTarget(abc.ABC):
    """Base class: θ*, batches and the chain-batched behavioral loss, on a model's engine."""

    #: The model's kind (``model_kind``): ``"transformer"`` or ``"module"``.
    kind: str
    loss_name: str
    star: dict[str, Tensor]
    description: dict

    def __init__(self, engine: Engine, loss: str, cache_bytes: int):
        if loss not in LOSSES:
            raise ValueError(f"unknown behavioral loss {loss!r}; choose one of {LOSSES}")
        self.engine = engine
        self.loss_name = loss
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[int, Tensor] = {}
        self._cached_bytes = 0
        #: θ*: the engine's live parameters, detached (sampled unless a selection says otherwise).
        self.star = {p.name: p.param.detach() for p in engine.live_parameters()}

    @property
    @abc.abstractmethod
    def n_batches(self) -> int:
        """Number of batches in the fixed cycle."""

    def positions(self, b: int) -> int:
        """n_b: the counted positions of batch b, what its loss sums over (every output position
        where the target has no sample mask, e.g. one per sequence for toy:sma)."""
        _, reference, mask = self.batch_tensors(b)
        return int(mask.sum()) if mask is not None else math.prod(reference.shape[:-1])

    @functools.cached_property
    def batch_positions(self) -> tuple[int, ...]:
        """n_b of every batch of the cycle, in order."""
        return tuple(self.positions(b) for b in range(self.n_batches))

    @functools.cached_property
    def n_samples(self) -> int:
        """N = Σ_b n_b: the samples (counted positions) of the whole dataset that L_B averages over."""
        count = sum(self.batch_positions)
        if count == 0:
            raise DataError("the data hold no counted positions (every position is padding or a skipped BOS)")
        return count

    @property
    def mean_positions(self) -> float:
        """n̄ = N / n_batches, the divisor of every batch's loss (module docstring)."""
        return self.n_samples / self.n_batches

    @property
    def largest_batch_weight(self) -> float:
        """w_max = max_b n_b / n̄: how many times the curvature of L_B the step on the largest batch
        meets (1 for equal batches; module docstring)."""
        return max(self.batch_positions) / self.mean_positions

    @property
    @abc.abstractmethod
    def split(self) -> tuple[int, int, str]:
        """How the data are cut into batches: (number of units, units per batch, their name), the
        units being rows of a tensor or sequences."""

    def ragged_warning(self) -> str | None:
        """Where w_max > :data:`RAGGED_WEIGHT`: what the ragged split does to λ̂ and which
        ``batch_size`` avoids it (None otherwise)."""
        w = self.largest_batch_weight
        if w <= RAGGED_WEIGHT:
            return None
        units, size, name = self.split
        if units % size:
            # The largest divisor not above the batch size: equal batches that still fit in memory.
            even = next(d for d in range(size, 0, -1) if units % d == 0)
            fix = (f"batch_size={even} divides the {units:,} {name} evenly (or leave out the {units % size:,} {name} "
                   "of the short last batch)")
        else:  # equal numbers of sequences, of different lengths
            fix = f"batches of {name} of equal length, or one batch (batch_size=None), avoid this"
        return (f"ragged minibatches: the largest of the {self.n_batches} batches holds {max(self.batch_positions):,} "
                f"counted positions, {w:.2f}× the mean {self.mean_positions:.4g}, so its SGLD steps meet {w:.2f}× the "
                "curvature of L_B. The step-size rule and the reported bias bound include that curvature and the "
                "spread it gives the batches' gradients (so an automatic step size is smaller than an even split "
                f"needs), but λ̂ still depends on how the data are split (METHODS §1, \"Step size\"); {fix}")

    @property
    def compile_obstacle(self) -> str:
        """Why this target's loss cannot be compiled as one graph ("" where it can; loss_grad.py)."""
        return self.engine.compile_obstacle

    @property
    def device(self) -> torch.device:
        return next(iter(self.star.values())).device

    @property
    def dtype(self) -> torch.dtype:
        """What the sampler's state, losses and sums are kept in: the package's compute-dtype rule
        (float64 when a parameter is, else float32; bf16/fp16 parameters never set it)."""
        return compute_dtype(t.dtype for t in self.star.values())

    @abc.abstractmethod
    def _inputs(self, b: int) -> Tensor:
        """The model's input on batch b (a tensor of inputs, or token ids)."""

    @functools.cached_property
    def widened(self) -> dict[str, Tensor] | None:
        """θ*'s weights and buffers narrower than :attr:`dtype` (a bfloat16 model's), cast to it
        once for the run (``widened_state``); None when there are none. Every forward of the
        sampler reads them, so the chains, the reference and the curvature run in :attr:`dtype`."""
        from ..models.parameters import widened_state

        cast = widened_state(self.engine.model, self.engine.live_parameters(), self.dtype)
        return cast or None

    def _reference_outputs(self, b: int) -> Tensor:
        """f_θ*(x) on batch b (called under no_grad), computed as the chains compute theirs (with
        :attr:`widened` weights for a bfloat16 model, so that L_B(θ*) = 0 exactly)."""
        if self.widened is not None:
            return self.engine.perturbed_forward({}, self._inputs(b), under=self.widened)
        return self.engine.forward(self._inputs(b))

    def _outputs(self, deltas: dict[str, Tensor], inputs: Tensor) -> Tensor:
        """f_{θ*+δ_c}(x) on ``inputs`` for every chain c: [chain, *reference shape]."""
        return self.engine.perturbed_forward(deltas, inputs, chains=True, under=self.widened)

    def _mask(self, b: int, reference: Tensor) -> Tensor | None:
        """Which samples of batch b count (None: all)."""
        return None

    @abc.abstractmethod
    def _data_digest(self) -> str:
        """sha256 of the data's bytes (inputs or token sequences, in batch order)."""

    def fingerprint(self) -> dict:
        """What identifies this target beyond its description: θ*, the data, dtype and device type.

        Checkpoints store it, so a checkpoint written for other weights or other data (same class,
        same sizes) is refused instead of being resumed as if it belonged to this model.
        """
        star = sorted(self.star.items())
        return {
            "parameters_sha256": tensor_digest(star),
            "data_sha256": self._data_digest(),
            "dtype": str(star[0][1].dtype) if len({t.dtype for _, t in star}) == 1 else str(sorted({str(t.dtype) for _, t in star})),
            "device_type": self.device.type,
        }

    def reference(self, b: int) -> Tensor:
        """Reference outputs of batch b in the form the loss needs (cached within the budget)."""
        if b in self._cache:
            return self._cache[b]
        with torch.no_grad():
            ref = reference_form(self.loss_name, self._reference_outputs(b))
        size = ref.numel() * ref.element_size()
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[b] = ref
            self._cached_bytes += size
        return ref

    def batch_tensors(self, b: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Batch b as the tensors ``loss_on`` takes: (inputs, reference outputs, sample mask or None)."""
        ref = self.reference(b)
        return self._inputs(b), ref, self._mask(b, ref)

    def loss_on(
        self, deltas: dict[str, Float[Tensor, "chain ..."]], inputs: Tensor, reference: Tensor, mask: Tensor | None
    ) -> Float[Tensor, " chain"]:
        """L_B,b(θ* + δ_c) on one batch's tensors (``batch_tensors``), for every chain c: the sum of
        the per-sample divergence over the batch's counted positions divided by n̄ (module docstring)."""
        out = self._outputs(deltas, inputs)
        if out.shape[1:] != reference.shape:
            raise DataError(f"perturbed outputs {tuple(out.shape[1:])} and reference outputs {tuple(reference.shape)} differ in shape")
        return masked_sum(per_sample_loss(self.loss_name, out, reference), mask) / self.mean_positions

    def loss(self, deltas: dict[str, Float[Tensor, "chain ..."]], b: int) -> Float[Tensor, " chain"]:
        """L_B,b(θ* + δ_c) for every chain c (differentiable in ``deltas``): batch b's estimate of the
        dataset's L_B, weighted by its counted positions (module docstring)."""
        return self.loss_on(deltas, *self.batch_tensors(b))

    def mean_loss(
        self, deltas: dict[str, Float[Tensor, "chain ..."]], batches: Sequence[int] | None = None
    ) -> Float[Tensor, " chain"]:
        """L_B(θ* + δ_c) averaged over every counted position of ``batches`` (default: all batches,
        the dataset's L_B; METHODS §1), for every chain c (differentiable in ``deltas``).

        Each ``loss(·, b)`` is batch b's sum over its positions divided by n̄, so their sum times
        n̄ / Σ_b n_b is the mean over those positions (for all batches: the mean of the losses).
        """
        batches = range(self.n_batches) if batches is None else batches
        count = sum(self.positions(b) for b in batches)
        if count == 0:
            raise DataError(f"batches {list(batches)} hold no counted positions")
        return sum(self.loss(deltas, b) for b in batches) * (self.mean_positions / count)


class ModuleTarget(SamplingTarget):
    """A plain ``nn.Module`` (its :class:`~tl_degeneracy.models.engine.ModuleEngine`) on a tensor of
    inputs (first axis = samples).

    ``kl`` treats the outputs' last axis as logits; ``mse`` compares outputs (a 1-D output is one
    number per sample). Every output position counts: an output [rows, k] has one sample per row, an
    output [rows, pos, k] one per (row, position). All trainable parameters are sampled unless a
    selection says otherwise.
    """

    kind = "module"

    def __init__(self, engine: Engine, data: Tensor, loss: str, batch_size: int | None, cache_bytes: int):
        super().__init__(engine, loss, cache_bytes)
        module = engine.model
        if not isinstance(data, Tensor) or data.ndim < 1 or len(data) == 0:
            raise DataError(
                f"a plain nn.Module needs its inputs as a non-empty tensor with samples on the first axis; got {type(data).__name__}"
            )
        if not self.star:
            raise ValueError(f"{type(module).__name__} has no trainable parameters to sample")
        if not data.is_floating_point() and not any(isinstance(m, torch.nn.Embedding) for m in module.modules()):
            # audit 16b F8: token ids into nn.Linear ended in torch's "mat1 and mat2 must have the same dtype"
            raise DataError(
                f"{type(module).__name__} has no embedding, so it cannot read integer inputs ({data.dtype}, e.g. token "
                "ids): pass the floating input tensor it takes (token ids are for TransformerLens models, the bundled "
                "toys, and modules that embed them)"
            )
        if data.is_floating_point() and self.widened is not None and data.dtype != self.dtype:
            # A half-precision module runs with its weights widened to the compute dtype (``widened``):
            # inputs of its own dtype follow them (audit 14a F6: a raw dtype mismatch from functional_call).
            data = data.to(self.dtype)
        self.data = ordinary(data.to(self.device))  # inputs made under inference_mode cannot be saved for backward
        self.batch_size = len(data) if batch_size is None else int(batch_size)
        if self.batch_size < 1:
            raise DataError(f"batch_size must be ≥ 1; got {batch_size}")
        self.description = {"kind": "module", "class": type(module).__name__, "n_samples": len(data),
                            "batch_size": self.batch_size}

    @property
    def n_batches(self) -> int:
        return -(-len(self.data) // self.batch_size)

    @property
    def split(self) -> tuple[int, int, str]:
        return len(self.data), self.batch_size, "rows"

    def _data_digest(self) -> str:
        # Buffers (e.g. normalisation statistics) shape the outputs too, so they are part of "the data".
        buffers = sorted((f"buffer:{n}", t) for n, t in self.engine.model.named_buffers())
        return tensor_digest([("inputs", self.data), *buffers])

    def _inputs(self, b: int) -> Tensor:
        return self.data[b * self.batch_size : (b + 1) * self.batch_size]

    def _reference_outputs(self, b: int) -> Tensor:
        # One number per sample is a 1-wide output axis, so both losses see [..., k].
        out = super()._reference_outputs(b)
        return out.unsqueeze(-1) if out.ndim == 1 else out

    def _outputs(self, deltas: dict[str, Tensor], inputs: Tensor) -> Tensor:
        out = super()._outputs(deltas, inputs)
        return out.unsqueeze(-1) if out.ndim == 2 else out  # [chain, rows]: one number per sample


class TransformerTarget(SamplingTarget):
    """A TransformerLens model or bundled toy (its adapter is the engine) on token data.

    Samples are the positions that count (``TokenBatches.mask``; BOS skipped per METHODS §0). A
    model whose logits have fewer positions than its input (e.g. toy:sma predicts once per
    sequence) counts every output position.
    """

    kind = "transformer"

    def __init__(self, adapter, data, loss: str, batch_size: int | None, cache_bytes: int):
        super().__init__(adapter, loss, cache_bytes)
        from ..data import TokenBatches, token_batches

        if isinstance(data, TokenBatches):
            self.batches = data
        else:
            if batch_size is None:
                # Full batch: one batch holding every sequence (validated once to count them).
                batch_size = token_batches(data, adapter, batch_size=1).n_sequences
            self.batches = token_batches(data, adapter, batch_size=batch_size)
        self._batch_cache: dict[int, object] = {}
        self.description = {"kind": "adapter", "backend": adapter.backend, "class": type(adapter.model).__name__,
                            "n_sequences": self.batches.n_sequences, "batch_size": self.batches.batch_size,
                            "n_samples": self.batches.n_samples}

    @property
    def n_batches(self) -> int:
        return len(self.batches)

    @property
    def split(self) -> tuple[int, int, str]:
        return self.batches.n_sequences, self.batches.batch_size, "sequences"

    def _data_digest(self) -> str:
        tb = self.batches
        # Sequences in batch order (a shuffled TokenBatches visits them in its own order).
        order = getattr(tb, "_order", torch.arange(len(tb.sequences)))
        head = torch.tensor([tb.batch_size, int(tb.bos), int(tb.skip_bos), tb.pad_token_id], dtype=torch.long)
        return tensor_digest([("layout", head), ("order", order),
                              *((f"seq{i}", tb.sequences[int(i)]) for i in order)])

    def _batch(self, b: int):
        if b not in self._batch_cache:
            self._batch_cache[b] = self.batches.batch(b, device=self.device)
        return self._batch_cache[b]

    def _inputs(self, b: int) -> Tensor:
        return self._batch(b).tokens

    def _mask(self, b: int, reference: Tensor) -> Tensor | None:
        batch = self._batch(b)
        if reference.shape[-2] == batch.tokens.shape[-1]:
            return batch.mask
        return None
