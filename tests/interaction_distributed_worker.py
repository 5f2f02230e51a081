"""Worker for the two-process interaction-basis test (tests/test_interaction_basis.py), launched with
``python -m torch.distributed.run``: every rank computes the same LIB with probes and edge sources
under a gloo group, and saves what it got to ``<out_dir>/rank<r>.pt``. ``compute()`` is shared
with the single-process side of the test."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fixtures.toys import make_tiny_toy_transformer  # noqa: E402
from tl_degeneracy.interaction import interaction_basis  # noqa: E402


def compute() -> dict[str, torch.Tensor]:
    """LIB of a tiny toy on 3 batches (2 on rank 0, 1 on rank 1), kl probes and ±1 edge sources."""
    model = make_tiny_toy_transformer().double()
    toks = torch.randint(0, 20, (5, 7), generator=torch.Generator().manual_seed(21))
    ib = interaction_basis(model, toks, kind="local", n_probes=3, edge_sources=2, batch_size=2, seed=4, progress=False)
    out = {f"basis/{n}": c for n, c in ib.basis.items()}
    out |= {f"edges/{a}/{b}": e for (a, b), e in ib.edges.items()}
    # each half in its own bases: the refit's sums are reduced with the rest (review 58 #1)
    out |= {f"refit/{a}/{b}": torch.tensor(r, dtype=torch.float64) for (a, b), r in ib.edge_refit.items()}
    out["world_size"] = torch.tensor(ib.settings["world_size"])
    return out


if __name__ == "__main__":
    from tests.fixtures.distributed import worker_main

    worker_main(compute, sys.argv[1])
