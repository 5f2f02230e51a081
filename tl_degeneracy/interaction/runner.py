"""What every pass of the interaction basis needs, for any model: batches, a forward with hooks,
the output, the sample mask, and the node hooks in forward order.

Two kinds of model (:func:`~tl_degeneracy.models.adapt.model_kind`) share one code path, through
their engine (:func:`~tl_degeneracy.models.engine.engine_for`):

- a ``"transformer"``: the engine is its adapter, the data are token batches
  (:func:`tl_degeneracy.token_batches`) and the output is the logits;
- a ``"module"`` that is a ``HookedRootModule`` (a small MLP, a deep linear network): the engine is
  a :class:`~tl_degeneracy.models.engine.ModuleEngine` and the data are input tensors. A floating
  tensor [n, d_in] is n samples with no position axis (every hook activation [batch, …] is seen as
  [batch, 1, …]); a tensor [n, pos, d_in] (or integer inputs [n, pos]) has pos samples per row, all
  of which count.

An engine's ``run_with_hooks(inputs, fwd_hooks)`` returns the output [batch, pos, …]; with ``.model``,
``.device`` and ``.dtype`` it is what the statistics passes (``moment_pass``, ``jacobian_pass``)
call, so the same passes serve both kinds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from transformer_lens import HookedRootModule  # TL 4 removed it from hook_points; the top level has it in 3.9 and 4.x

from ..data import Batch, TokenBatches, as_count, token_batches
from ..errors import DataError, MissingHookError
from ..models.adapt import model_kind
from ..models.adapter import ModelAdapter
from ..models.engine import Engine, engine_for, has_position_axis
from ..models.hooks import LAYER_KINDS
from ..stats.cuts import CHECK_POSITIONS
from ..stats.passes import HookTarget, resolve_targets, run_until

__all__ = ["CUT_SAMPLE_BATCHES", "Runner", "TensorBatches", "build_runner"]

#: Batches of the data the cut checks read (``Runner.cut_sample``).
CUT_SAMPLE_BATCHES = 8


@dataclass
class TensorBatches:
    """Input tensors cut into batches; every (row, position) is a sample (no padding)."""

    chunks: list[Tensor]

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def n_samples(self) -> int:
        return sum(c.shape[0] * (c.shape[1] if self.has_positions else 1) for c in self.chunks)

    def distinct(self, count: int, unit: str) -> int:
        """Samples that can differ, as ``TokenBatches.distinct``: a repeated input row repeats its
        samples, every position of it for a position-level hook (audit 21b F2: 12 rows, 4 inputs each
        given 3 times, read 12 distinct samples, and rank 3 of them was not flagged as the data's limit)."""
        rows, positions = self._repeated
        return count - (positions if unit == "position" else rows)

    @cached_property
    def _repeated(self) -> tuple[int, int]:
        """(rows that repeat an earlier one, their samples): rows are compared whole, their shape and
        values (batches of other position lengths hold other rows, review 51 #2; as float64, which
        holds every float dtype's values, numpy none of bfloat16's, and + 0.0 makes −0.0 equal to 0.0,
        review 52)."""
        seen: set = set()
        rows = positions = 0
        for chunk in self.chunks:
            flat = chunk.detach().cpu().to(torch.float64) + 0.0
            per_row = flat.shape[1] if self.has_positions else 1
            for row in flat:
                key = (tuple(row.shape), row.numpy().tobytes())
                if key in seen:
                    rows, positions = rows + 1, positions + per_row
                seen.add(key)
        return rows, positions

    @property
    def max_len(self) -> int:
        """Positions per row (1 without a position axis), as ``TokenBatches.max_len``."""
        return self.chunks[0].shape[1] if self.has_positions else 1

    @property
    def has_positions(self) -> bool:
        return has_position_axis(self.chunks[0])

    def batch(self, number: int, device: torch.device | str | None = None) -> Batch:
        if not 0 <= number < len(self):
            raise IndexError(f"batch {number} out of range for {len(self)} batches")
        x = self.chunks[number]
        start = sum(c.shape[0] for c in self.chunks[:number])
        pos = x.shape[1] if self.has_positions else 1
        # On the inputs' device: a Batch never mixes devices, even when the caller gave CUDA inputs.
        mask = torch.ones(x.shape[0], pos, dtype=torch.bool, device=x.device)
        out = Batch(tokens=x, mask=mask, lengths=torch.full((x.shape[0],), pos, device=x.device),
                    index=torch.arange(start, start + x.shape[0], device=x.device), number=number)
        return out.to(device) if device is not None else out

    @property
    def n_sequences(self) -> int:
        return sum(c.shape[0] for c in self.chunks)

    @property
    def positions(self) -> dict:
        return {"inputs": "tensor", "n_sequences": self.n_sequences, "n_samples": self.n_samples,
                "position_axis": self.has_positions}


def tensor_batches(data, batch_size: int) -> TensorBatches:
    """A tensor [n, d_in] / [n, pos, d_in] (cut into ``batch_size`` rows) or a list of such batches."""
    batch_size = as_count(batch_size, "batch_size", "rows per batch")
    if isinstance(data, Tensor):
        if data.ndim < 2 or data.shape[0] == 0:
            raise DataError(f"module inputs must be a non-empty tensor [n, d_in] or [n, pos, d_in]; got shape {tuple(data.shape)}")
        chunks = list(data.split(batch_size))
    elif isinstance(data, (list, tuple)) and data and all(isinstance(x, Tensor) for x in data):
        chunks = [x for x in data if x.shape[0] > 0]
        shapes = {tuple(x.shape[2:] if x.ndim >= 3 else x.shape[1:]) for x in chunks}
        if not chunks or len(shapes) > 1 or len({x.ndim for x in chunks}) > 1:
            raise DataError(f"a list of input batches must hold non-empty tensors of one layout; got shapes {[tuple(x.shape) for x in data][:4]}")
    else:
        raise DataError(
            f"cannot use a {type(data).__name__} as inputs of a HookedRootModule; pass a tensor [n, d_in] or "
            "[n, pos, d_in], or a list of such batches"
        )
    if not chunks or chunks[0].ndim < 2:
        raise DataError("the module input data is empty")
    return TensorBatches(chunks)


@dataclass
class Runner:
    """The engine, the batches and the node hooks (forward order) of one interaction-basis run, and
    the model's kind (``model_kind``: ``"transformer"``, whose engine is its adapter, or ``"module"``)."""

    engine: Engine
    batches: TokenBatches | TensorBatches
    nodes: list[HookTarget]
    kind: str

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def positions(self) -> dict:
        p = self.batches.positions
        return p if isinstance(p, dict) else p.to_dict()

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.nodes]

    def cut_sample(self) -> list[Tensor]:
        """The inputs the cut checks read (``stats.cuts``). A transformer's paths do not depend on
        the data: the first sequence's first ``CHECK_POSITIONS`` positions. A plain module's may (a
        ReLU gate open on some rows only: audit 15a, the first row alone passed a skip that half the
        rows take): every batch where there are at most :data:`CUT_SAMPLE_BATCHES`, else that many
        spread evenly over the data, first and last included, each cut to its first
        ``CHECK_POSITIONS`` positions where it has a position axis; a gate that no sampled row opens
        still passes."""
        if self.kind == "transformer":
            return [self.batches.batch(0, device=self.device).tokens[:1, :CHECK_POSITIONS]]
        n = len(self.batches)
        k = min(n, CUT_SAMPLE_BATCHES)
        numbers = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})
        cut = slice(None, CHECK_POSITIONS) if self.batches.has_positions else slice(None)
        return [self.batches.batch(i, device=self.device).tokens[:, cut] for i in numbers]


def default_transformer_nodes(adapter: ModelAdapter) -> list[str]:
    """resid_pre of every layer, then the final residual after the final norm (ln_final), or the
    last resid_post where the model has no final norm (e.g. toy:sma)."""
    names = adapter.hook_names("resid_pre")
    try:
        return names + adapter.hook_names("ln_final")
    except MissingHookError:
        return names + [adapter.hook_name("resid_post", adapter.n_layers - 1)]


def _firing_order(engine, batch: Batch, names: list[str], stop: bool) -> list[str]:
    """The order in which ``names`` fire in one forward pass (a name twice if it fires twice)."""
    order: list[str] = []

    def record(name: str):
        def hook(act, hook=None):
            order.append(name)

        return hook

    with torch.no_grad():
        run_until(engine, batch.tokens, [(n, record(n)) for n in names], stop_after=names[-1] if stop else None,
                  when=lambda: set(order) >= set(names))
    return order


def _check_order(names: list[str], order: list[str]) -> None:
    repeated = sorted({n for n in order if order.count(n) > 1})
    if repeated:
        raise ValueError(f"node hook(s) {repeated} fire more than once per forward pass; a node must be one activation per sample")
    silent = [n for n in names if n not in order]
    if silent:
        raise MissingHookError(f"node hook(s) {silent} did not fire during the forward pass; nodes must lie on the path to the output")
    if order != names:
        raise ValueError(f"nodes must be given in forward order, each once; they fire in the order {order}, got {names}")


def _model_kind(model) -> str:
    """``model_kind``, refusing what the interaction basis cannot run: anything that is not a model,
    and a plain module without hook points."""
    try:
        kind = model_kind(model)
    except TypeError:
        kind = None
    if kind is None or (kind == "module" and not isinstance(model, HookedRootModule)):
        raise TypeError(
            f"interaction_basis needs a model tld.adapt accepts or a transformer_lens HookedRootModule; got "
            f"{type(model).__module__}.{type(model).__name__}"
        )
    return kind


def build_runner(model, data, nodes: str | Sequence[str] | None, batch_size: int, seq_len: int | None,
                 skip_bos: bool | None) -> Runner:
    """Engine, batches and validated nodes: hook kinds (every layer) or exact hook names, in forward
    order, each once (ValueError otherwise); unknown names raise MissingHookError."""
    kind = _model_kind(model)
    adapter = engine_for(model) if kind == "transformer" else None
    if adapter is not None:
        engine = adapter
        batches = token_batches(data, adapter, batch_size=batch_size, seq_len=seq_len, skip_bos=skip_bos)
        items = default_transformer_nodes(adapter) if nodes is None else ([nodes] if isinstance(nodes, str) else list(nodes))
        targets = [t for item in items for t in resolve_targets(adapter, [item], "interaction_basis")]
    else:
        batches = tensor_batches(data, batch_size)
        # A module without parameters runs where its data are.
        engine = engine_for(model, device=batches.chunks[0].device)
        available = list(model.hook_dict)
        items = available if nodes is None else ([nodes] if isinstance(nodes, str) else list(nodes))
        unknown = [n for n in items if n not in model.hook_dict]
        if unknown:
            raise MissingHookError(f"{unknown} are not hook points of this {type(model).__name__}; it has {available}")
        targets = [HookTarget(n, None, None) for n in items]
    names = [t.name for t in targets]
    if len(names) < 1:
        raise ValueError("no nodes requested")
    if len(set(names)) != len(names):
        raise ValueError(f"nodes must be distinct; got {names}")
    order = _firing_order(engine, batches.batch(0, device=engine.device), names, stop=nodes is not None)
    if nodes is None and adapter is None:
        # Every hook point of the module, in the order the forward pass reaches them.
        _check_order(sorted(set(order), key=order.index), order)
        targets = [HookTarget(n, None, None) for n in dict.fromkeys(order)]
        if not targets:
            raise MissingHookError(f"no hook point of this {type(model).__name__} fired during its forward pass")
    else:
        if adapter is not None and any(item in LAYER_KINDS for item in items) and set(order) == set(names):
            # Kinds expand to every layer, one kind after another (audit 13a: nodes=["resid_pre", "attn_out"]
            # was always refused): the forward pass says where each hook belongs.
            targets.sort(key=lambda t: order.index(t.name))
            names = [t.name for t in targets]
        _check_order(names, order)
    return Runner(engine=engine, batches=batches, nodes=targets, kind=kind)
