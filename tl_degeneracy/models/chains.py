"""Evaluating a function of parameter deltas over a leading chain axis.

Batching rules and their fallbacks. ``torch.func.vmap`` needs a batching rule for every operator it
meets; for one without (e.g. the fused CPU attention kernel ``_scaled_dot_product_flash_attention_for_cpu``
that ``F.scaled_dot_product_attention`` picks, used by Hugging Face models with
``attn_implementation="sdpa"``), vmap silently runs that operator once per chain in a Python loop:
the same values, at a fraction of the speed. :class:`ChainMap` runs vmap with that fallback turned
into an error, so it sees which operator lacks a rule, and then

* for an attention kernel: runs the vmapped call again with ``F.scaled_dot_product_attention``
  restricted to its math kernel (``sdpa_kernel(SDPBackend.MATH)``: matmuls and a softmax, which vmap
  batches), for this and every later call. The math kernel holds the [chains, batch, heads, query,
  key] attention weights in memory, as an eager attention does;
* for any other operator: lets vmap loop over chains for it from then on;

and says so once per model (:class:`VmapFallbackWarning`). A model that cannot be vmapped at all runs
chain by chain, also with one warning.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

#: The exception torch raises when a device runs out of memory: torch.OutOfMemoryError (torch ≥ 2.5,
#: the base of torch.cuda.OutOfMemoryError); older torch has only the latter.
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

#: What functorch says when an operator without a batching rule meets a disabled fallback.
_FALLBACK_ERROR = re.compile(r"(\S+) hit the vmap fallback which is currently disabled")
#: Operator names of the fused attention kernels behind ``F.scaled_dot_product_attention``.
_ATTENTION_KERNELS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")


class VmapFallbackWarning(RuntimeWarning):
    """The chains are not computed in one fully batched call (module docstring): an operator has no
    vmap batching rule (attention then runs on the math kernel; another operator runs once per
    chain), or the model cannot be vmapped and runs chain by chain. Results are the same; only speed
    (and, for the math attention kernel, memory) differ."""


@contextlib.contextmanager
def _fallback_is_error(enabled: bool) -> Iterator[None]:
    """vmap's per-chain loop for operators without a batching rule allowed (``enabled``) or raised."""
    before = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(enabled)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(before)


class ChainMap:
    """Apply ``single(deltas) -> Tensor`` to every chain of ``deltas`` (each [C, *shape]).

    One batched ``torch.func.vmap`` call where the model allows it; a model that cannot be vmapped
    (data-dependent control flow, in-place ops) falls back to a loop over chains. The choice is
    made on the first call and kept, so a later vmap failure is a real error and is raised. Out of
    memory is always raised and never taken as "vmap unsupported". Operators without a batching
    rule are handled as the module docstring says (``math_attention``, ``looped_ops``).
    """

    def __init__(self) -> None:
        self.vmap_works: bool | None = None
        #: Attention runs on the math SDPA kernel inside vmap (a fused kernel had no batching rule).
        self.math_attention = False
        #: Operators vmap runs once per chain (no batching rule, not attention), as found so far.
        self.looped_ops: set[str] = set()

    def _kernels(self) -> contextlib.AbstractContextManager:
        return sdpa_kernel(SDPBackend.MATH) if self.math_attention else contextlib.nullcontext()

    def _vmapped(self, single: Callable[[dict[str, Tensor]], Tensor], deltas: dict[str, Tensor]) -> Tensor:
        if torch.compiler.is_compiling():
            # Traced by torch.compile (llc/loss_grad.py): the eager calls before it (reference check,
            # step size) have already found what needs the math kernel.
            with self._kernels():
                return torch.func.vmap(single)(deltas)
        while True:
            try:
                # Once a loop was accepted for some operator the fallback stays allowed (it has been
                # warned about); until then an operator without a rule stops the call and is named.
                with _fallback_is_error(bool(self.looped_ops)), self._kernels():
                    return torch.func.vmap(single)(deltas)
            except RuntimeError as err:
                match = _FALLBACK_ERROR.search(str(err))
                if match is None:
                    raise
                op = match.group(1)
                if any(k in op for k in _ATTENTION_KERNELS) and not self.math_attention:
                    self.math_attention = True
                    how = ("attention inside the chain-batched forward now runs on the math kernel "
                           "(sdpa_kernel(SDPBackend.MATH)): the same values, batched over chains, with the attention "
                           "weights held in memory as in eager attention")
                else:
                    self.looped_ops.add(op)
                    how = "vmap runs it once per chain (the same values, slower)"
                warnings.warn(f"{op} has no torch.func.vmap batching rule: {how}", VmapFallbackWarning, stacklevel=4)

    def __call__(self, single: Callable[[dict[str, Tensor]], Tensor], deltas: Mapping[str, Tensor]) -> Tensor:
        if not deltas:
            raise ValueError("a chain axis needs at least one delta to be read from")
        if self.vmap_works is not False:
            try:
                out = self._vmapped(single, dict(deltas))
                self.vmap_works = True
                return out
            except OUT_OF_MEMORY:
                # Running out of memory says nothing about vmap support (and a chain loop would only
                # hide the real problem, slowly): re-raise, and decide on vmap at a later call.
                raise
            except Exception as err:
                if self.vmap_works:
                    raise
                self.vmap_works = False
                first_line = (str(err).strip().splitlines() or [""])[0][:200]
                warnings.warn(f"the model cannot be run under torch.func.vmap ({type(err).__name__}: {first_line}); "
                              f"its chains are computed one at a time (the same values, slower)",
                              VmapFallbackWarning, stacklevel=3)
        n_chains = next(iter(deltas.values())).shape[0]
        return torch.stack([single({n: d[c] for n, d in deltas.items()}) for c in range(n_chains)])
