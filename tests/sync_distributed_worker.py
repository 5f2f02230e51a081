"""Worker for tests/test_synchronization.py's two-process test, launched with
``python -m torch.distributed.run``: head and neuron synchronization under a gloo process group (each
rank streams the batches ``rank::world_size``), saved by every rank; ``compute()`` is shared with
the single-process side of the test.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fixtures.toys import make_tiny_toy_transformer  # noqa: E402
from tl_degeneracy.synchronization import head_synchronization, neuron_synchronization  # noqa: E402


def compute() -> dict[str, torch.Tensor]:
    """On a tiny toy whose layer-0 head 1 copies head 0: 3 batches (2 on rank 0, 1 on rank 1), and
    1 batch (rank 1 then has none and must still join the reductions)."""
    model = make_tiny_toy_transformer(act_fn="relu")
    attn = model.blocks[0].attn
    with torch.no_grad():
        for name in ("W_Q", "W_K", "b_Q", "b_K", "W_V", "b_V", "W_O"):
            getattr(attn, name)[1] = getattr(attn, name)[0]
    toks = torch.randint(0, 20, (9, 10), generator=torch.Generator().manual_seed(3))
    out: dict[str, torch.Tensor] = {}
    for key, data, batch_size in (("three", toks, 4), ("one", toks[:3], 8)):
        hs = head_synchronization(model, data, tol=1e-6, batch_size=batch_size)
        ns = neuron_synchronization(model, data, tol=0.0, batch_size=batch_size)
        out |= {f"{key}/distance": torch.as_tensor(hs.distance), f"{key}/value_cov": hs.value_cov,
                f"{key}/input_rank": torch.as_tensor(hs.input_rank), f"{key}/n_samples": torch.tensor(hs.n_samples),
                f"{key}/extra": torch.tensor(hs.extra_freedom), f"{key}/neuron_distance": torch.as_tensor(ns.distance),
                f"{key}/neuron_value_gram": ns.value_gram, f"{key}/neuron_samples": torch.tensor(ns.n_samples),
                f"{key}/neuron_input_rank": torch.as_tensor(ns.input_rank),
                # the even-numbered sequences' input ranks and blocks: reduced over the ranks too
                f"{key}/input_rank_half": torch.as_tensor(hs.input_rank_half),
                f"{key}/neuron_input_rank_half": torch.as_tensor(ns.input_rank_half),
                f"{key}/changing": torch.tensor([hs.changing_blocks, ns.changing_blocks]),
                # the block's second pass (what its pattern passes on) and the per-sample maximum's reduction
                f"{key}/same_pattern": torch.as_tensor(hs.same_pattern),
                f"{key}/pattern_input": hs.pattern_inputs[0, (0, 1)].input_moment,
                f"{key}/pattern_values": hs.pattern_inputs[0, (0, 1)].value_moment}
    return out


if __name__ == "__main__":
    from tests.fixtures.distributed import worker_main

    worker_main(compute, sys.argv[1])
