"""Evaluating a function of parameter deltas over a leading chain axis."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor


#: The exception torch raises when a device runs out of memory: torch.OutOfMemoryError (torch ≥ 2.5,
#: the base of torch.cuda.OutOfMemoryError); older torch has only the latter.
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class ChainMap:
    """Apply ``single(deltas) -> Tensor`` to every chain of ``deltas`` (each [C, *shape]).

    One batched ``torch.func.vmap`` call where the model allows it; a model that cannot be vmapped
    (data-dependent control flow, in-place ops) falls back to a loop over chains. The choice is
    made on the first call and kept, so a later vmap failure is a real error and is raised. Out of
    memory is always raised and never taken as "vmap unsupported".
    """

    def __init__(self) -> None:
        self.vmap_works: bool | None = None

    def __call__(self, single: Callable[[dict[str, Tensor]], Tensor], deltas: Mapping[str, Tensor]) -> Tensor:
        if not deltas:
            raise ValueError("a chain axis needs at least one delta to be read from")
        if self.vmap_works is not False:
            try:
                out = torch.func.vmap(single)(dict(deltas))
                self.vmap_works = True
                return out
            except OUT_OF_MEMORY:
                # Running out of memory says nothing about vmap support (and a chain loop would only
                # hide the real problem, slowly): re-raise, and decide on vmap at a later call.
                raise
            except Exception:
                if self.vmap_works:
                    raise
                self.vmap_works = False
        n_chains = next(iter(deltas.values())).shape[0]
        return torch.stack([single({n: d[c] for n, d in deltas.items()}) for c in range(n_chains)])
