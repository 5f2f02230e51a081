"""Memory budgets: what an analysis may allocate, an estimate of what it will, and a clear error
before it starts when that does not fit (issue 19).

A pass over the data holds one batch's worth of tensors at a time; what grows with the model is
the size of that batch's tensors: attention patterns (batch · heads · positions²), the logits
(batch · positions · vocabulary), and in a Jacobian pass the forward's autograd graph and the
cotangents on the logits. :func:`estimate` gives an upper estimate of an analysis's peak from the
model's shape and the batch's, :func:`check_fits` compares it with the budget in force and raises
:class:`MemoryBudgetError` naming what to lower, before anything is allocated.

The budget in force is the one set with :func:`memory_limit` (the report sets its own, see
``ReportSettings.memory``), else all memory available on the model's device now: free CUDA memory
on a GPU, the kernel's MemAvailable on the CPU. Both are read once the model and the data are
loaded, and the estimates leave the weights out: a budget bounds what the passes allocate beyond
what is loaded, so a process's peak resident set is the loaded model, the libraries and the data
plus at most about the budget.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import TLDegeneracyError

__all__ = [
    "DEFAULT_FRACTION", "DIRECTION_HEADROOM", "MemoryBudget", "MemoryBudgetError", "available_memory", "check_fits",
    "current_budget", "check_batch_bytes", "check_batches", "counts_forward_held", "counts_grams", "counts_held", "counts_widths",
    "default_budget", "direction_bytes", "direction_chunk", "half_gram_bytes", "estimate", "format_bytes", "hook_width",
    "memory_limit", "moment_held", "parse_memory", "sgld_bytes",
]

#: Share of the available memory the report budgets by default, per device type: the rest is left
#: to the allocator's fragmentation, the Python heap and other processes (estimates are rough).
DEFAULT_FRACTION = {"cuda": 0.8, "cpu": 0.5}
ANALYSES = ("forward", "head_sync", "neuron_sync", "jacobian")
#: Allowance on top of the counted tensors for what the allocator adds (page rounding, blocks freed
#: but not yet reused): the Jacobian pass on toy:bytelm raised the peak resident set by 395 MB
#: against 392 MB of counted tensors in one CI run (tests/test_memory.py).
ALLOCATOR_SLACK = 1.05

#: How many times its estimate :func:`direction_chunk` counts each direction: the allocator keeps the
#: blocks of earlier passes and of earlier chunks of other sizes (16 edge directions of toy:bytelm at
#: 8 × 64 tokens raised the peak resident set by 170 MiB, 10.6 each, against 9.2 estimated; 4 by 52).
DIRECTION_HEADROOM = 2

#: What the LLC (``behavioral_llc``) holds per chain at its peak (the Hessian-vector products of its
#: curvature checks: a double backward through the chain-batched forward), in multiples of one chain's
#: forward activations by kind (:func:`_layer_bytes`: every layer's attention scores and pattern, every
#: layer's other activations, the logits) and of its sampled parameters (the flat state, the per-chain
#: weights θ* + δ, their first and second gradients and the Lanczos vectors). Fitted upward to the
#: peak-RSS increase of whole runs on CPU over six shapes, each term dominant in one of them
#: (sgld_bytes' docstring).
SGLD_PER_CHAIN = {"attention": 3.5, "activations": 6.5, "logits": 12.0, "parameters": 17.0}

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class MemoryBudgetError(TLDegeneracyError, MemoryError):
    """An analysis would allocate more than the memory budget; the message says what to lower."""


def parse_memory(text: str | int | float) -> int:
    """Bytes from ``"8G"``, ``"512M"``, ``"1.5GiB"``, ``"8GB"`` (binary units: K = 1024) or a number of bytes.

    Raises:
        ValueError: anything else, or a size that is not positive.
    """
    if isinstance(text, bool):
        raise ValueError(f"memory must be a size such as 8G or 512M; got {text!r}")
    if isinstance(text, (int, float)):
        try:
            value = float(text)
        except OverflowError:  # an int beyond float's range (review 39)
            value = float("inf")
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
        if not match:
            raise ValueError(f"memory must be a size such as 8G, 512M or 1.5GiB; got {text!r}")
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not 1 <= value < float("inf"):
        raise ValueError(f"memory must be a positive, finite size; got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """``12.3 GiB``, ``512.0 MiB``, ``900 B``."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def available_memory(device: torch.device | str) -> tuple[int, str]:
    """(bytes, what they are) that ``device`` has free now: CUDA's free memory on a GPU, the
    kernel's MemAvailable on the CPU (total physical memory where /proc/meminfo is absent)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "physical RAM"


@dataclass(frozen=True)
class MemoryBudget:
    """A budget of ``bytes`` and where it comes from (``source``, for messages and the report header)."""

    bytes: int
    source: str

    def __str__(self) -> str:
        return f"{format_bytes(self.bytes)} ({self.source})"


def default_budget(device: torch.device | str, fraction: float | None = None) -> MemoryBudget:
    """``fraction`` (default :data:`DEFAULT_FRACTION` of the device type) of :func:`available_memory`;
    on a CPU shared by the ranks torchrun started on this machine (``LOCAL_WORLD_SIZE``), that share
    split between them (audit 16b: 2 ranks each took 50 % of the RAM, 100 % together)."""
    device = torch.device(device)
    return _share(device, DEFAULT_FRACTION.get(device.type, DEFAULT_FRACTION["cpu"]) if fraction is None else float(fraction))


_LIMIT: contextvars.ContextVar[MemoryBudget | None] = contextvars.ContextVar("tld_memory_limit", default=None)


def memory_limit(budget: MemoryBudget | int | str) -> contextlib.AbstractContextManager[MemoryBudget]:
    """Analyses run inside use ``budget`` (a :class:`MemoryBudget`, bytes or a size such as ``"8G"``);
    a size that does not parse is refused here, not at ``with``."""
    if not isinstance(budget, MemoryBudget):
        budget = MemoryBudget(parse_memory(budget), "set with memory_limit")
    return _limited(budget)


@contextlib.contextmanager
def _limited(budget: MemoryBudget):
    token = _LIMIT.set(budget)
    try:
        yield budget
    finally:
        _LIMIT.reset(token)


def current_budget(device: torch.device | str) -> MemoryBudget:
    """The budget of :func:`memory_limit` in force, else all of :func:`available_memory` on ``device``
    (on a CPU shared by torchrun's ranks, split between them)."""
    limit = _LIMIT.get()
    if limit is not None:
        return limit
    return _share(device)  # review 39: split too, direct calls under torchrun gave every CPU rank all of the RAM


def _share(device: torch.device | str, fraction: float | None = None) -> MemoryBudget:
    """``fraction`` (None: all) of :func:`available_memory` on ``device``, split between the processes
    that share it (:func:`_ranks_sharing`)."""
    free, what = available_memory(device)
    part, text = (free, what) if fraction is None else (free * fraction, f"{fraction:.0%} of {format_bytes(free)} {what}")
    ranks = _ranks_sharing(device)
    if ranks > 1:
        return MemoryBudget(int(part / ranks), f"{text}, split between {ranks} ranks on this machine")
    return MemoryBudget(int(part), text)


def _ranks_sharing(device: torch.device | str) -> int:
    """How many processes share ``device``'s memory: on a CPU, the ranks torchrun started on this
    machine (``LOCAL_WORLD_SIZE``); a GPU is each rank's own."""
    if torch.device(device).type == "cuda":
        return 1
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def estimate(
    adapter,
    analysis: str,
    batch: int,
    seq: int,
    *,
    n_cotangents: int = 1,
    chunk_elements: int = 1 << 24,
    target_widths: Sequence[int] | None = None,
    out_width: int | None = None,
    held: int = 0,
) -> int:
    """Upper estimate in bytes of the peak that ``analysis`` allocates for one batch of ``batch``
    sequences of ``seq`` tokens of ``adapter``'s model (weights not included: they are loaded).

    - ``"forward"``: a forward pass with statistics hooks (activation statistics, counts' input
      moments): one layer's attention scores and pattern (3 · batch · heads · seq² floats), its MLP,
      the logits and their float64 copy, float64 rows of the hooked activations; the caller's
      Grams come in ``held`` (audit 12a F9: counts' Gram twins charged to every forward pass made
      activation_stats' estimate 3–10× its peak).
    - ``"head_sync"`` / ``"neuron_sync"``: the forward plus float64 rows of the values, inputs and
      one chunk of pattern rows (``synchronization.pattern_tv_sums``), or of the MLP's pre- and
      post-activations, firing patterns, the products behind (3.6a)'s sums, and inputs.
    - ``"jacobian"``: a Jacobian pass (``stats.jacobian``): the autograd graph of the forward
      (every layer's activations and attention patterns), the softmax in float64, one chunk of
      cotangents on the logits (``min(n_cotangents, chunk_elements / (batch·seq·vocab))`` of them,
      built in float64) and their gradients at the targets (``target_widths``: the features per
      position of each target, default every layer's q, k, v, attention output, MLP
      pre-activations and output, as ``degeneracy_counts`` takes them). ``out_width``: features
      per position of the output the cotangents sit on (default the vocabulary: the logits).

    Every analysis also counts its float64 accumulators, which do not grow with the data but do
    with the model (an F × F Gram per MLP hook: 75 MB per layer at d_mlp 3072), and ``held`` bytes
    that earlier passes keep alive (``degeneracy_counts``' activation Grams during its Jacobian pass).

    The constants are counts of the tensors each pass keeps alive, not measurements; the peak-RSS
    increase of a Jacobian pass on toy:bytelm (tests/test_memory.py) and the peak CUDA allocation of
    ``degeneracy_counts`` on a GPT-2-small-shaped model were measured within them or at most 1 %
    above, and the estimate is the count times :data:`ALLOCATOR_SLACK`. That holds for a pass in a
    process that has run one before: the first pass of a fresh process raises the resident set once
    by a few hundred MB more (a V = 32,000 toy's Jacobian pass: 992 MiB cold, 687 MiB warm, against an
    estimate of 686; the libraries' workspaces and the allocator's first large blocks), which the
    default budget's headroom (:data:`DEFAULT_FRACTION`) covers and a budget set to the last MB does not.
    """
    if analysis not in ANALYSES:
        raise ValueError(f"analysis must be one of {ANALYSES}; got {analysis!r}")
    counted = _counted_bytes(adapter, analysis, batch, seq, n_cotangents=n_cotangents, chunk_elements=chunk_elements,
                             target_widths=target_widths, out_width=out_width, held=held)
    return int(counted * ALLOCATOR_SLACK)


def _counted_bytes(adapter, analysis: str, batch: int, seq: int, *, n_cotangents: int, chunk_elements: int,
                   target_widths: Sequence[int] | None, out_width: int | None, held: int) -> int:
    """The tensors :func:`estimate` counts, in bytes, before the allocator's allowance."""
    c = adapter.cfg
    L, H, d, D, V = c.n_layers, c.n_heads or 0, c.d_head or 0, c.d_model, c.d_vocab
    kv = c.n_kv_heads or H
    F = c.d_mlp or 0
    s, attention, per_token = _layer_bytes(adapter, batch, seq)
    tokens = batch * seq
    forward = attention + tokens * (per_token + V * (s + 8)) + int(held)
    if analysis == "forward":
        return int(forward + tokens * (D + F + H * d) * 8)
    if analysis == "head_sync":
        from .synchronization import PATTERN_CHUNK_BYTES

        rows = min(PATTERN_CHUNK_BYTES, tokens * H * seq * (s + 8))  # one chunk, or all rows if fewer
        # accumulators: values, inputs and the even-numbered sequences' inputs (each a Gram and a mean)
        return int(forward + tokens * (kv * d + D) * 8 * 2 + rows + L * ((kv * d) ** 2 + 2 * D * D) * 8 * 2)
    if analysis == "neuron_sync":
        # Accumulators: per layer the Grams of r (even and odd sequences) and f, (3.6a)'s sums (even and
        # odd), the input moments (all the data and the even-numbered sequences). Beside them, during the pass one batch's rows (p, l, f, r, g, g², r²,
        # r·g²); after it, one layer's distance temporaries while the results replace the accumulators.
        return int(max(forward + tokens * (F * 8 + D) * 8, 8 * F * F * 8) + L * (F * F * 5 + 2 * D * D) * 8)
    V = V if out_width is None else int(out_width)
    graph = L * (attention + tokens * per_token) + tokens * V * s
    chunk = max(1, min(int(n_cotangents), chunk_elements // max(1, tokens * V)))
    if target_widths is None:
        target_widths = counts_widths(adapter)
    width = sum(target_widths)
    accumulators = sum(w * w for w in target_widths) * 8  # float64 Grams (per-head blocks are smaller)
    cotangents = 2 * tokens * V * 8 + chunk * tokens * V * (8 + 2 * s)  # float64 softmax and its input; a chunk
    backward = chunk * (tokens * V * s + attention + tokens * per_token)  # one layer's gradients at a time
    gradients = chunk * tokens * width * s + chunk * tokens * max(D, F, H * d) * 8  # at the targets; float64 rows
    return int(graph + cotangents + backward + gradients + accumulators + held)


def _layer_bytes(adapter, batch: int, seq: int) -> tuple[int, int, int]:
    """(bytes per float of the forward's activations, one layer's attention scores, masked scores
    and pattern, one layer's activations per token: residual, norms, q/k/v/z, MLP)."""
    c = adapter.cfg
    H, d, D, F = c.n_heads or 0, c.d_head or 0, c.d_model, c.d_mlp or 0
    kv = c.n_kv_heads or H
    s = max(adapter.dtype.itemsize, 4)  # half-precision models upcast softmax and norms to float32
    return s, 3 * batch * H * seq * seq * s, (8 * D + (H + 2 * kv) * d + 3 * F) * s


def sgld_bytes(adapter, chains: int, batch: int, seq: int, n_params: int, held: int = 0,
               layers: int | None = None) -> int:
    """Upper estimate in bytes of the peak that ``behavioral_llc`` allocates with ``chains`` chains
    (on this process: a torchrun rank's share) on batches of ``batch`` sequences of ``seq`` tokens of
    ``adapter``'s model, sampling a flat state of ``n_params`` entries (the parameter tensors the
    selection touches), beside ``held`` bytes it keeps anyway (cached reference outputs, a half-precision
    model's widened weights): per chain, :data:`SGLD_PER_CHAIN` times each kind of one forward's
    activations and of the sampled parameters, times :data:`ALLOCATOR_SLACK`; the weights themselves
    are loaded and not counted. ``layers``: the top layers whose activations depend on the sampled
    parameters (default all); those below run once for every chain without a graph, one layer's
    activations at a time (review 39: a restricted LLC of a 4-layer toy's last attention rose 0.34 of
    an estimate that charged every layer per chain).

    Measured (``benchmarks/llc_memory.py``: fresh processes, given step size, 10 + 20 steps and the
    end-of-run curvature, 1 thread, CPU): the peak resident set rose by 0.70–0.92 of the estimate
    before the slack on toy:bytelm at 2 and 8 chains × 8 × 32 tokens and 8 × 16 × 64, on 4 chains of
    three ToyTransformers where the attention (8 heads, 8 × 256 tokens), the logits (vocabulary
    8,192) or the parameters (3.2M) dominate, and on LLCs restricted to one layer's attention; the
    automatic step size's pilots stayed below it. The peak is the curvature checks' Hessian-vector
    products, 3–5 times a single step's allocation. Not yet measured on a GPU (issue 19's ``benchmarks/gpu.sh``); where it refuses
    a run that would fit, raise the budget."""
    s, attention, per_token = _layer_bytes(adapter, batch, seq)
    c, k = adapter.cfg, SGLD_PER_CHAIN
    L = c.n_layers if layers is None else max(0, min(int(layers), c.n_layers))
    tokens = batch * seq
    per_chain = (k["attention"] * L * attention + k["activations"] * L * tokens * per_token
                 + k["logits"] * tokens * c.d_vocab * s + k["parameters"] * int(n_params) * s)
    below = attention + tokens * per_token if L < c.n_layers else 0
    return int((int(chains) * per_chain + below + int(held)) * ALLOCATOR_SLACK)


def direction_bytes(adapter, batch: int, seq: int, in_width: int, out_width: int) -> int:
    """Upper estimate in bytes of what one more direction adds to a pass that carries a chunk of
    tangents (forward mode) or cotangents (reverse mode) through a section of ``adapter``'s model on
    one batch of ``batch`` sequences of ``seq`` tokens: one layer's activations (a derivative pass
    frees a layer's before it reaches the next, as :func:`estimate`'s ``"jacobian"`` counts its
    cotangents), the direction on the section's input (``in_width`` features per position) and its
    result on the output (``out_width``), each with a float64 copy; times :data:`ALLOCATOR_SLACK`.
    The interaction edges' JVP chunks on toy:bytelm (8 × 64 tokens): 5.8 MiB per direction measured
    (737 MiB for 128), 7.4 MiB estimated."""
    s, attention, per_token = _layer_bytes(adapter, batch, seq)
    tokens = batch * seq
    return int((attention + tokens * (per_token + (in_width + out_width) * (s + 8))) * ALLOCATOR_SLACK)


def direction_chunk(adapter, batch: int, seq: int, in_width: int, out_width: int, held: int = 0) -> int:
    """How many directions (:func:`direction_bytes`, each counted :data:`DIRECTION_HEADROOM` times)
    one chunk may carry within the budget in force (:func:`current_budget`) beside ``held`` bytes
    that the pass keeps anyway (review 37: chunks that filled the whole budget took the interaction
    section to 1.66× it): at least one; a pass whose single direction does not fit is the memory
    checks' business (:func:`check_fits`)."""
    budget = current_budget(adapter.device).bytes
    per = DIRECTION_HEADROOM * max(1, direction_bytes(adapter, batch, seq, in_width, out_width))
    return max(1, (budget - int(held)) // per)


def check_fits(needed: int, device: torch.device | str, what: str, lower: str) -> None:
    """Raise :class:`MemoryBudgetError` when ``needed`` bytes exceed the budget in force
    (:func:`current_budget`), saying that ``what`` needs them and what to lower (``lower``)."""
    budget = current_budget(device)
    if needed > budget.bytes:
        raise MemoryBudgetError(
            f"{what} would need about {format_bytes(needed)}, more than the memory budget of {budget}; "
            f"{lower}, or raise the budget (--memory / the report's memory setting / tld.memory.memory_limit) "
            "where the machine has more"
        )


def counts_widths(adapter) -> list[int]:
    """Features per position of ``degeneracy_counts``' Jacobian targets: every layer's q, k, v,
    attention output, MLP output and MLP pre-activations (two of them in a gated MLP)."""
    c = adapter.cfg
    F, H, d, D, kv = c.d_mlp or 0, c.n_heads or 0, c.d_head or 0, c.d_model, c.n_kv_heads or c.n_heads or 0
    return c.n_layers * [H * d, kv * d, kv * d, D, D] + c.n_layers * (1 + int(c.gated_mlp)) * [F]


def half_gram_bytes(widths: Sequence[int], sets: int = 2) -> int:
    """Bytes of ``sets`` more float64 Grams for targets of ``widths`` features (per-head blocks are
    smaller): the two half-probe Grams of ``jacobian_stats(..., halves=True)``, the half-data one of
    ``half=True``, kept beside the whole ones."""
    return sets * sum(w * w for w in widths) * 8


def counts_held(adapter) -> int:
    """Bytes that stay alive during ``degeneracy_counts``' Jacobian pass beside one set of its
    targets' Grams: the activation passes' Grams, each with its half-data twin (:func:`counts_grams`
    twice), and the Jacobian pass's half-probe Gram and half-data Gram per target (the split-half
    checks ``probe_limited`` and ``data_limited``)."""
    return counts_forward_held(adapter) + half_gram_bytes(counts_widths(adapter), sets=2)


def moment_held(widths: Sequence[int], half: bool = False) -> int:
    """Bytes that a statistics pass (``activation_stats``) keeps beside one batch: the float64 Grams
    of hooks of ``widths`` features, and their half-data twins with ``half``."""
    return half_gram_bytes(widths, sets=1 + int(half))


def counts_forward_held(adapter) -> int:
    """Bytes that ``degeneracy_counts``' activation passes keep beside one batch: their Grams, each
    with its half-data twin (``data_limited``)."""
    return 2 * counts_grams(adapter)


def counts_grams(adapter) -> int:
    """Bytes of ``degeneracy_counts``' activation-pass Grams (float64: z per head, the MLP output,
    the blocks' inputs per layer: the attention's, the MLP's where there is one, and a shortformer's
    query/key input), which stay alive during its Jacobian pass."""
    c = adapter.cfg
    F, H, d, D = c.d_mlp or 0, c.n_heads or 0, c.d_head or 0, c.d_model
    inputs = 1 + (F > 0) + (c.positional_embedding == "shortformer")
    return c.n_layers * (F * F + H * d * d + inputs * D * D) * 8


def hook_width(adapter, kind: str | None, name: str = "") -> int:
    """Features per position of a hook of ``kind`` (q/z: heads·d_head, k/v: KV heads·d_head, MLP
    hooks: d_mlp, anything else: d_model), for :func:`estimate`'s ``target_widths``."""
    c = adapter.cfg
    kv = c.n_kv_heads or c.n_heads or 0
    widths = {"q": (c.n_heads or 0) * (c.d_head or 0), "z": (c.n_heads or 0) * (c.d_head or 0),
              "k": kv * (c.d_head or 0), "v": kv * (c.d_head or 0), "mlp_pre": c.d_mlp or 0, "mlp_post": c.d_mlp or 0,
              "pre_linear": c.d_mlp or 0}
    if kind is None and ".mlp.hook_" in name:  # e.g. hook_pre_linear of a gated MLP
        kind = "mlp_pre"
    return int(widths.get(kind, c.d_model))


def check_batches(adapter, analysis: str, batches, what: str, **kwargs) -> None:
    """:func:`check_batch_bytes` of ``analysis`` (:func:`estimate`, with ``kwargs``)."""
    check_batch_bytes(adapter, batches, what, lambda b, t: estimate(adapter, analysis, b, t, **kwargs))


def check_batch_bytes(adapter, batches, what: str, needed: Callable[[int, int], int]) -> tuple[int, int]:
    """:func:`check_fits` for ``needed(b, t)`` bytes on ``batches`` (a TokenBatches: its
    ``batch_size`` sequences, b of them where the data hold fewer, of at most t = ``max_len``
    tokens), on the model's device; the message says to lower batch_size or seq_len. Returns (b, t)."""
    size, t = int(batches.batch_size), int(batches.max_len)
    b = min(size, max(1, batches.n_sequences))
    check_fits(needed(b, t), adapter.device, f"{what} on batches of {size} × {t} tokens",
               f"lower batch_size (now {size}) or seq_len (now {t})")
    return b, t
